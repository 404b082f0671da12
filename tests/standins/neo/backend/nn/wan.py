"""Stand-in of ``backend/nn/wan.py`` of Forge Neo (Haoming02/sd-webui-forge-classic, neo branch; compared with the Neo tree vendored in
exo101/sd-webui-forge-neo-v3 at 5692d2d1e6c293faf5486f7cb18c27c9a3faa758, see tests/standins/CONFORMANCE.md): ``WanModel.forward(x, timestep, context, clip_fea=None,
time_dim_concat=None, transformer_options={}, **kw)`` -> ``forward_orig``; blocks in
``self.blocks`` are called as ``block(x, e=e0, freqs=freqs, context=context,
context_img_len=..., transformer_options=...)`` and return ``x``; the ``dit``
``("double_block", i)`` replace patch is honoured; the output goes through ``self.head``, a
``Head`` whose linear is ``head.head``. Tiny random weights."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from standin_layers import StreamBlock, scale_gates, timestep_embedding


class WanAttentionBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.body = StreamBlock(dim)
        self.cross_q, self.cross_kv = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim)

    def forward(self, x, e, freqs, context, context_img_len=257, transformer_options={}):  # noqa: B006
        x = self.body(x, e, freqs)
        k, v = self.cross_kv(context).chunk(2, -1)
        return x + F.scaled_dot_product_attention(self.cross_q(x), k, v)


class Head(nn.Module):
    """Upstream's ``Head`` module names (``wan.py:213``): ``norm``, the output linear ``head``
    and a ``modulation`` parameter; ``head(norm(x) * (1 + e[1]) + e[0])``."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, 1e-6, elementwise_affine=False)
        self.head = nn.Linear(dim, out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) * 0.1)

    def forward(self, x, e):
        e = (self.modulation + e.unsqueeze(1)).chunk(2, dim=1)
        return self.head(self.norm(x) * (1 + e[1]) + e[0])


class WanModel(nn.Module):
    def __init__(self, in_dim=4, dim=32, text_dim=16, num_layers=4, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.dim, self.out_dim = dim, in_dim
        self.patch_embedding = nn.Conv3d(in_dim, dim, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.text_embedding = nn.Linear(text_dim, dim)
        self.time_embedding = nn.Linear(256, dim)
        self.blocks = nn.ModuleList([WanAttentionBlock(dim) for _ in range(num_layers)])
        self.head = Head(dim, in_dim * 4)
        scale_gates(self)

    def forward_orig(self, x, t, context, clip_fea=None, freqs=None, transformer_options={}, **kwargs):  # noqa: B006
        bs, _, frames, h, w = x.shape
        x = self.patch_embedding(x).flatten(2).transpose(1, 2)
        e0 = self.time_embedding(timestep_embedding(t, 256))
        context = self.text_embedding(context)
        blocks_replace = transformer_options.get("patches_replace", {}).get("dit", {})
        for i, block in enumerate(self.blocks):
            if ("double_block", i) in blocks_replace:
                def block_wrap(args, block=block):
                    return {"img": block(args["img"], context=args["txt"], e=args["vec"], freqs=args["pe"],
                                         context_img_len=None, transformer_options=args["transformer_options"])}

                out = blocks_replace[("double_block", i)](
                    {"img": x, "txt": context, "vec": e0, "pe": freqs, "transformer_options": transformer_options},
                    {"original_block": block_wrap})
                x = out["img"]
            else:
                x = block(x, e=e0, freqs=freqs, context=context, context_img_len=None,
                          transformer_options=transformer_options)
        x = self.head(x, e0)  # upstream passes the unprojected time embedding e; the stand-in has e0 only
        c = self.out_dim
        x = x.reshape(bs, frames, h // 2, w // 2, c, 2, 2).permute(0, 4, 1, 2, 5, 3, 6)
        return x.reshape(bs, c, frames, h, w)

    def forward(self, x, timestep, context, clip_fea=None, time_dim_concat=None, transformer_options={}, **kwargs):  # noqa: B006
        return self.forward_orig(x, timestep, context, clip_fea=clip_fea, transformer_options=transformer_options)
