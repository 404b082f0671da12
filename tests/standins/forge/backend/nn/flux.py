"""Stand-in of Forge's ``backend/nn/flux.py`` (lllyasviel/stable-diffusion-webui-forge,
main at dfdcbab685e57677014f05a3309b48cc87383167; see tests/standins/CONFORMANCE.md): ``IntegratedFluxTransformer2DModel`` with the real class name,
``forward(x, timestep, context, y, guidance=None, **kwargs)`` patchifying 2x2 and calling
``inner_forward(img, img_ids, txt, txt_ids, timesteps, y, guidance=None)``, which loops
``img, txt = block(img=img, txt=txt, vec=vec, pe=pe)`` over ``double_blocks``, then
``img = block(img, vec=vec, pe=pe)`` over ``single_blocks`` on ``cat((txt, img), 1)``,
slices the text off and applies ``final_layer(img, vec)``. ``transformer_options`` does
not reach ``inner_forward``. Blocks are out of place, like upstream. Tiny random
weights; block internals simplified."""

from __future__ import annotations

import torch
from torch import nn

from flux_block_loops import forge_blocks
from standin_layers import (JointPair, LastLayer, StreamBlock, flux_ids, patchify, rope_like, scale_gates,
                            timestep_embedding, unpatchify)


class DoubleStreamBlock(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.pair = JointPair(hidden_size)

    def forward(self, img, txt, vec, pe):
        return self.pair(img, txt, vec, pe[:, txt.shape[1]:])


class SingleStreamBlock(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.body = StreamBlock(hidden_size)

    def forward(self, x, vec, pe):
        return self.body(x, vec, pe)


class IntegratedFluxTransformer2DModel(nn.Module):
    def __init__(self, in_channels=4, vec_in_dim=12, context_in_dim=16, hidden_size=32, depth=2,
                 depth_single_blocks=3, guidance_embed=True, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.in_channels, self.out_channels = in_channels * 4, in_channels * 4
        self.hidden_size = hidden_size
        self.img_in = nn.Linear(self.in_channels, hidden_size)
        self.time_in = nn.Linear(256, hidden_size)
        self.vector_in = nn.Linear(vec_in_dim, hidden_size)
        self.guidance_in = nn.Linear(256, hidden_size) if guidance_embed else nn.Identity()
        self.guidance_embed = guidance_embed
        self.txt_in = nn.Linear(context_in_dim, hidden_size)
        self.double_blocks = nn.ModuleList([DoubleStreamBlock(hidden_size) for _ in range(depth)])
        self.single_blocks = nn.ModuleList([SingleStreamBlock(hidden_size) for _ in range(depth_single_blocks)])
        self.final_layer = LastLayer(hidden_size, self.out_channels)
        scale_gates(self)

    def inner_forward(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None):
        img = self.img_in(img)
        vec = self.time_in(timestep_embedding(timesteps, 256))
        if self.guidance_embed and guidance is not None:
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256))
        vec = vec + self.vector_in(y)
        txt = self.txt_in(txt)
        ids = torch.cat((txt_ids, img_ids), dim=1)
        pe = rope_like(ids, self.hidden_size)
        img = forge_blocks(self, img, txt, vec, pe)
        return self.final_layer(img, vec)

    def forward(self, x, timestep, context, y, guidance=None, **kwargs):
        img = patchify(x)
        img_ids, txt_ids = flux_ids(x.shape[0], x.shape[2], x.shape[3], context.shape[1])
        out = self.inner_forward(img, img_ids, context, txt_ids, timestep, y, guidance)
        return unpatchify(out, x.shape)
