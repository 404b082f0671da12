"""The SD3 MMDiT layout shared by the Forge (``backend/nn/mmditx.py``) and A1111
(``modules/models/sd3/mmdit.py``) stand-ins: ``PatchEmbed`` with a ``proj`` conv,
``JointBlock`` made of a ``context_block`` and an ``x_block`` (``DismantledBlock`` with a
``pre_only`` flag), ``forward_core_with_concat`` looping
``context, x = block(context, x, c=c_mod)`` over ``joint_blocks``; the last block is
``pre_only`` and hands back ``None`` for the context. Helper of the stand-ins."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from standin_layers import Modulated, scale_gates, timestep_embedding


class PatchEmbed(nn.Module):
    def __init__(self, in_chans: int, embed_dim: int, patch_size: int = 2):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class DismantledBlock(nn.Module):
    def __init__(self, hidden_size: int, pre_only: bool = False):
        super().__init__()
        self.pre_only = pre_only
        self.mod = Modulated(hidden_size)
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        if not pre_only:
            self.proj = nn.Linear(hidden_size, hidden_size)
            self.mlp = nn.Sequential(nn.Linear(hidden_size, 2 * hidden_size), nn.GELU(),
                                     nn.Linear(2 * hidden_size, hidden_size))


class JointBlock(nn.Module):
    def __init__(self, hidden_size: int, pre_only: bool = False):
        super().__init__()
        self.context_block = DismantledBlock(hidden_size, pre_only=pre_only)
        self.x_block = DismantledBlock(hidden_size)

    @staticmethod
    def _post(block, x, attn, gate):
        x = x + gate * block.proj(attn)
        return x + gate * block.mlp(x)

    def forward(self, *args, **kwargs):  # upstream: return block_mixing(*args, context_block=..., x_block=..., **kwargs)
        return self._mixing(*args, **kwargs)

    def _mixing(self, context, x, c):
        hc, gc = self.context_block.mod(context, c)
        hx, gx = self.x_block.mod(x, c)
        qc, kc, vc = self.context_block.qkv(hc).chunk(3, -1)
        qx, kx, vx = self.x_block.qkv(hx).chunk(3, -1)
        a = F.scaled_dot_product_attention(torch.cat((qc, qx), 1), torch.cat((kc, kx), 1), torch.cat((vc, vx), 1))
        ac, ax = a[:, : context.shape[1]], a[:, context.shape[1]:]
        context = None if self.context_block.pre_only else self._post(self.context_block, context, ac, gc)
        return context, self._post(self.x_block, x, ax, gx)


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, out: int):
        super().__init__()
        self.mod = Modulated(hidden_size)
        self.linear = nn.Linear(hidden_size, out)

    def forward(self, x, c):
        return self.linear(self.mod(x, c)[0])


class MMDiTLayout(nn.Module):
    def __init__(self, in_channels=4, depth=4, adm_in_channels=12, context_dim=16, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        hidden_size = 8 * depth
        self.in_channels, self.out_channels, self.patch_size = in_channels, in_channels, 2
        self.x_embedder = PatchEmbed(in_channels, hidden_size)
        self.pos_embed = nn.Parameter(torch.randn(1, 64, hidden_size) * 0.1)
        self.t_embedder = nn.Linear(256, hidden_size)
        self.y_embedder = nn.Linear(adm_in_channels, hidden_size)
        self.context_embedder = nn.Linear(context_dim, hidden_size)
        self.joint_blocks = nn.ModuleList([JointBlock(hidden_size, pre_only=i == depth - 1) for i in range(depth)])
        self.final_layer = FinalLayer(hidden_size, 4 * in_channels)
        scale_gates(self)

    def forward_core_with_concat(self, x, c_mod, context=None):
        for block in self.joint_blocks:
            context, x = block(context, x, c=c_mod)
        return self.final_layer(x, c_mod)

    def _run(self, x, t, y, context, *core_args):
        bs, ch, h, w = x.shape
        tokens = self.x_embedder(x)
        tokens = tokens + self.pos_embed[:, : tokens.shape[1]]
        c = self.t_embedder(timestep_embedding(t, 256, time_factor=1.0)) + self.y_embedder(y)
        out = self.forward_core_with_concat(tokens, c, self.context_embedder(context), *core_args)
        return out.reshape(bs, h // 2, w // 2, ch, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(bs, ch, h, w)
