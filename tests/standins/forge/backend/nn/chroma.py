"""Stand-in of Forge's ``backend/nn/chroma.py`` (lllyasviel/stable-diffusion-webui-forge,
main at dfdcbab685e57677014f05a3309b48cc87383167; see tests/standins/CONFORMANCE.md): ``IntegratedChromaTransformer2DModel``. The FLUX layout without
guidance or pooled vector: an approximator turns the timestep into per-block modulations,
``inner_forward(img, img_ids, txt, txt_ids, timesteps)`` runs
``img, txt = block(img=img, txt=txt, pe=pe, mod=...)`` over ``double_blocks`` and
``img = block(img, pe=pe, mod=...)`` over ``single_blocks`` on ``cat((txt, img), 1)``.
Tiny random weights; block internals simplified."""

from __future__ import annotations

import torch
from torch import nn

from standin_layers import (JointPair, LastLayer, StreamBlock, flux_ids, patchify, rope_like, scale_gates,
                            timestep_embedding, unpatchify)


class DoubleStreamBlock(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.pair = JointPair(hidden_size)

    def forward(self, img, txt, mod, pe):
        return self.pair(img, txt, mod, pe[:, txt.shape[1]:])


class SingleStreamBlock(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.body = StreamBlock(hidden_size)

    def forward(self, x, mod, pe):
        return self.body(x, mod, pe)


class IntegratedChromaTransformer2DModel(nn.Module):
    def __init__(self, in_channels=4, context_in_dim=16, hidden_size=32, depth=2, depth_single_blocks=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.in_channels = self.out_channels = in_channels * 4
        self.hidden_size = hidden_size
        self.img_in = nn.Linear(self.in_channels, hidden_size)
        self.txt_in = nn.Linear(context_in_dim, hidden_size)
        n_mods = depth + depth_single_blocks + 1
        self.distilled_guidance_layer = nn.Linear(256, hidden_size * n_mods)
        self.double_blocks = nn.ModuleList([DoubleStreamBlock(hidden_size) for _ in range(depth)])
        self.single_blocks = nn.ModuleList([SingleStreamBlock(hidden_size) for _ in range(depth_single_blocks)])
        self.final_layer = LastLayer(hidden_size, self.out_channels)
        scale_gates(self)

    def inner_forward(self, img, img_ids, txt, txt_ids, timesteps):
        img = self.img_in(img)
        mods = self.distilled_guidance_layer(timestep_embedding(timesteps, 256)).chunk(
            len(self.double_blocks) + len(self.single_blocks) + 1, dim=-1)
        txt = self.txt_in(txt)
        pe = rope_like(torch.cat((txt_ids, img_ids), dim=1), self.hidden_size)
        for i, block in enumerate(self.double_blocks):
            img, txt = block(img=img, txt=txt, pe=pe, mod=mods[i])
        img = torch.cat((txt, img), 1)
        for i, block in enumerate(self.single_blocks):
            img = block(img, pe=pe, mod=mods[len(self.double_blocks) + i])
        img = img[:, txt.shape[1]:, ...]
        return self.final_layer(img, mods[-1])

    def forward(self, x, timestep, context, guidance=None, **kwargs):
        img = patchify(x)
        img_ids, txt_ids = flux_ids(x.shape[0], x.shape[2], x.shape[3], context.shape[1])
        out = self.inner_forward(img, img_ids, context, txt_ids, timestep)
        return unpatchify(out, x.shape)
