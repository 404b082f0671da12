"""Stand-in of Forge Neo's ``backend/nn/flux.py`` (Haoming02/sd-webui-forge-classic, neo
branch; mirrors the file as stored at 06d6af9a9b98436d013b398ab35f0b0bf8a888ce, checked
against tests/standins/CONFORMANCE.md): ``IntegratedFluxTransformer2DModel`` whose
``forward`` calls ``forward_orig(img, img_ids, txt, txt_ids, timesteps, y, guidance=None,
control=None, transformer_options={}, attn_mask=None)``. Blocks take ``attn_mask=`` and
``transformer_options=``; ``transformer_options["patches_replace"]["dit"]`` entries keyed
``("double_block", i)`` / ``("single_block", i)`` replace a block call with
``patch(args_dict, {"original_block": block_wrap})``.

In place, like upstream: ``DoubleStreamBlock.forward`` updates ``img`` and ``txt``
themselves (``img += ...``, ``txt += ...``) and returns them; ``SingleStreamBlock.forward``
does ``x += ...`` and returns ``x``. A residual taken as "output minus input" after the
call is zero for these blocks. Tiny random weights; block internals simplified."""

from __future__ import annotations

import torch
from torch import nn

from flux_block_loops import neo_blocks
from standin_layers import (JointPair, LastLayer, StreamBlock, flux_ids, patchify, rope_like, scale_gates,
                            timestep_embedding, unpatchify)


class DoubleStreamBlock(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.pair = JointPair(hidden_size)

    def forward(self, img, txt, vec, pe, attn_mask=None, modulation_dims_img=None, modulation_dims_txt=None,
                transformer_options={}):  # noqa: B006
        return self.pair(img, txt, vec, pe[:, txt.shape[1]:], in_place=True)  # img += ..., txt += ...


class SingleStreamBlock(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.body = StreamBlock(hidden_size)

    def forward(self, x, vec, pe, attn_mask=None, modulation_dims=None, transformer_options={}):  # noqa: B006
        return self.body(x, vec, pe, in_place=True)  # x += ...


class IntegratedFluxTransformer2DModel(nn.Module):
    def __init__(self, in_channels=4, vec_in_dim=12, context_in_dim=16, hidden_size=32, depth=2,
                 depth_single_blocks=3, guidance_embed=True, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.in_channels = self.out_channels = in_channels * 4
        self.hidden_size = hidden_size
        self.img_in = nn.Linear(self.in_channels, hidden_size)
        self.time_in = nn.Linear(256, hidden_size)
        self.vector_in = nn.Linear(vec_in_dim, hidden_size)
        self.guidance_in = nn.Linear(256, hidden_size)
        self.guidance_embed = guidance_embed
        self.txt_in = nn.Linear(context_in_dim, hidden_size)
        self.double_blocks = nn.ModuleList([DoubleStreamBlock(hidden_size) for _ in range(depth)])
        self.single_blocks = nn.ModuleList([SingleStreamBlock(hidden_size) for _ in range(depth_single_blocks)])
        self.final_layer = LastLayer(hidden_size, self.out_channels)
        scale_gates(self)

    def forward_orig(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None, control=None,
                     transformer_options={}, attn_mask=None):  # noqa: B006
        img = self.img_in(img)
        vec = self.time_in(timestep_embedding(timesteps, 256))
        if self.guidance_embed and guidance is not None:
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256))
        vec = vec + self.vector_in(y)
        txt = self.txt_in(txt)
        pe = rope_like(torch.cat((txt_ids, img_ids), dim=1), self.hidden_size)
        img = neo_blocks(self, img, txt, vec, pe, attn_mask, transformer_options)
        return self.final_layer(img, vec)

    def forward(self, x, timestep, context, y=None, guidance=None, control=None, transformer_options={}, **kwargs):  # noqa: B006
        img = patchify(x)
        img_ids, txt_ids = flux_ids(x.shape[0], x.shape[2], x.shape[3], context.shape[1])
        out = self.forward_orig(img, img_ids, context, txt_ids, timestep, y, guidance, control,
                                transformer_options=transformer_options)
        return unpatchify(out, x.shape)
