"""Tiny layers shared by the stand-ins (a helper of the test stand-ins, not a stand-in of
any frontend file). The stand-ins copy the frontends' call signatures, block lists and
stream layouts exactly; inside a block the maths is a small modulated attention + MLP with
random weights, enough that every block, every stream and the conditioning matter."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def timestep_embedding(t: torch.Tensor, dim: int, time_factor: float = 1000.0) -> torch.Tensor:
    t = time_factor * t.float().flatten()
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class Modulated(nn.Module):
    """LayerNorm modulated by a conditioning vector (shift, scale, gate)."""

    def __init__(self, dim: int, cond_dim: int | None = None):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.lin = nn.Linear(cond_dim or dim, 3 * dim)

    def forward(self, x, vec):
        shift, scale, gate = self.lin(F.silu(vec)).unsqueeze(1).chunk(3, dim=-1)
        return self.norm(x) * (1 + scale) + shift, gate


class Attention(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, pe=None, mask=None):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        if pe is not None:
            q, k = q + pe, k + pe
        return self.proj(F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


class StreamBlock(nn.Module):
    """Modulated attention + MLP on one stream: the body of every stand-in block."""

    def __init__(self, dim: int, cond_dim: int | None = None):
        super().__init__()
        self.mod1, self.mod2 = Modulated(dim, cond_dim), Modulated(dim, cond_dim)
        self.attn = Attention(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x, vec, pe=None, mask=None, in_place=False):
        """``in_place``: update ``x`` itself and return it (``x += ...``), as Forge Neo's
        FLUX blocks do; the values are the same either way."""
        h, gate = self.mod1(x, vec)
        if in_place:
            x += gate * self.attn(h, pe, mask)
            h, gate = self.mod2(x, vec)
            x += gate * self.mlp(h)
            return x
        x = x + gate * self.attn(h, pe, mask)
        h, gate = self.mod2(x, vec)
        return x + gate * self.mlp(h)


class JointPair(nn.Module):
    """Two streams attending jointly (text first, then image), each with its own weights."""

    def __init__(self, dim: int, cond_dim: int | None = None):
        super().__init__()
        self.txt_mod, self.img_mod = Modulated(dim, cond_dim), Modulated(dim, cond_dim)
        self.txt_qkv, self.img_qkv = nn.Linear(dim, 3 * dim), nn.Linear(dim, 3 * dim)
        self.txt_out, self.img_out = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.txt_mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.img_mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, img, txt, vec, pe=None, in_place=False):
        """``in_place``: update ``img`` and ``txt`` themselves and return them, as Forge
        Neo's FLUX double blocks do (``img += ...``); the values are the same either way."""
        hi, gi = self.img_mod(img, vec)
        ht, gt = self.txt_mod(txt, vec)
        qi, ki, vi = self.img_qkv(hi).chunk(3, -1)
        qt, kt, vt = self.txt_qkv(ht).chunk(3, -1)
        if pe is not None:
            qi, ki = qi + pe, ki + pe
        q, k, v = torch.cat((qt, qi), 1), torch.cat((kt, ki), 1), torch.cat((vt, vi), 1)
        a = F.scaled_dot_product_attention(q, k, v)
        at, ai = a[:, : txt.shape[1]], a[:, txt.shape[1]:]
        if in_place:
            img += gi * self.img_out(ai)
            img += gi * self.img_mlp(img)
            txt += gt * self.txt_out(at)
            txt += gt * self.txt_mlp(txt)
            return img, txt
        img = img + gi * self.img_out(ai)
        img = img + gi * self.img_mlp(img)
        txt = txt + gt * self.txt_out(at)
        txt = txt + gt * self.txt_mlp(txt)
        return img, txt


def scale_gates(model: nn.Module, factor: float = 4.0) -> nn.Module:
    """Random init leaves gates small; scale the modulation layers so every block moves its
    stream enough for a wrong forecast to show in the output."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ("mod" in name and name.endswith("lin.weight")):
                p.mul_(factor)
    return model.eval()


def rope_like(ids: torch.Tensor, dim: int) -> torch.Tensor:
    """A positional term from position ids (stands in for RoPE; only the data flow matters)."""
    freqs = torch.arange(1, dim // ids.shape[-1] + 2, dtype=torch.float32)
    angles = ids.float().unsqueeze(-1) * freqs
    return torch.sin(angles).flatten(-2)[..., :dim]


class LastLayer(nn.Module):
    """FLUX-style final layer: modulated norm, then a linear to patch channels."""

    def __init__(self, hidden_size: int, out_channels: int):
        super().__init__()
        self.mod = Modulated(hidden_size)
        self.linear = nn.Linear(hidden_size, out_channels)

    def forward(self, x, vec):
        return self.linear(self.mod(x, vec)[0])


def patchify(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, H/2 * W/2, 4C)`` (2x2 patches, as FLUX packs latents)."""
    bs, c, h, w = x.shape
    return x.reshape(bs, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(bs, (h // 2) * (w // 2), c * 4)


def unpatchify(tokens: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    bs, c, h, w = shape
    return tokens.reshape(bs, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(bs, c, h, w)


def flux_ids(bs: int, h: int, w: int, text_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """FLUX's image position ids (row, column per patch) and all-zero text ids."""
    img_ids = torch.zeros(h // 2, w // 2, 3)
    img_ids[..., 1] = torch.arange(h // 2)[:, None]
    img_ids[..., 2] = torch.arange(w // 2)[None, :]
    return img_ids.reshape(1, -1, 3).repeat(bs, 1, 1), torch.zeros(bs, text_tokens, 3)
