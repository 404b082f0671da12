"""Stand-in of ``backend/nn/lumina.py`` of Forge Neo (Haoming02/sd-webui-forge-classic, neo branch; compared with the Neo tree vendored in
exo101/sd-webui-forge-neo-v3 at 5692d2d1e6c293faf5486f7cb18c27c9a3faa758, see tests/standins/CONFORMANCE.md): ``NextDiT.forward(x, timesteps, context, num_tokens=None,
attention_mask=None, **kw)`` uses ``t = 1 - timesteps``, joins caption and image tokens
(caption first), runs ``x = layer(x, mask, freqs_cis, adaln_input,
transformer_options=...)`` over ``self.layers`` (no replace hook), applies ``self.final_layer``
(a ``FinalLayer`` whose linear is ``final_layer.linear``) to the joint sequence, keeps the
image tokens and returns the negated output. Tiny random weights."""

from __future__ import annotations

import torch
from torch import nn

from standin_layers import StreamBlock, scale_gates, timestep_embedding


class JointTransformerBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.body = StreamBlock(dim)

    def forward(self, x, x_mask, freqs_cis, adaln_input=None, transformer_options={}):  # noqa: B006
        return self.body(x, adaln_input, freqs_cis)


class FinalLayer(nn.Module):
    """Upstream's ``FinalLayer`` module names (``lumina.py:191``): ``norm_final``, ``linear``,
    ``adaLN_modulation``; ``linear(norm_final(x) * (1 + scale))`` with ``scale`` from the
    conditioning."""

    def __init__(self, hidden_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, x, c):
        scale = self.adaLN_modulation(c)
        return self.linear(self.norm_final(x) * (1 + scale.unsqueeze(1)))


class NextDiT(nn.Module):
    def __init__(self, in_channels=4, dim=32, cap_feat_dim=16, n_layers=4, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.dim, self.in_channels, self.patch_size = dim, in_channels, 2
        self.x_embedder = nn.Linear(in_channels * 4, dim)
        self.cap_embedder = nn.Linear(cap_feat_dim, dim)
        self.t_embedder = nn.Linear(256, dim)
        self.layers = nn.ModuleList([JointTransformerBlock(dim) for _ in range(n_layers)])
        self.final_layer = FinalLayer(dim, in_channels * 4)
        scale_gates(self)

    def forward(self, x, timesteps, context, num_tokens=None, attention_mask=None, transformer_options={}, **kwargs):  # noqa: B006
        t = 1.0 - timesteps
        bs, c, h, w = x.shape
        img = x.reshape(bs, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(bs, (h // 2) * (w // 2), c * 4)
        adaln_input = self.t_embedder(timestep_embedding(t, 256))
        cap = self.cap_embedder(context)
        tokens = torch.cat((cap, self.x_embedder(img)), 1)
        for layer in self.layers:
            tokens = layer(tokens, None, None, adaln_input, transformer_options=transformer_options)
        out = self.final_layer(tokens, adaln_input)[:, cap.shape[1]:]
        out = out.reshape(bs, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(bs, c, h, w)
        return -out
