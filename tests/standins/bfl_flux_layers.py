"""FLUX's layers as Forge's and Forge Neo's ``backend/nn/flux.py`` compute them (Black Forest
Labs' layout and maths), shared by the weight-carrying stand-ins ``bfl_flux_forge.py`` and
``bfl_flux_neo.py``. Unlike ``standin_layers.py`` (simplified maths, random weights), these
load real FLUX weights in BFL key layout and compute what upstream computes:

* Forge: lllyasviel/stable-diffusion-webui-forge ``backend/nn/flux.py`` (read at
  10e4a3779d436cb4a1c75308bfd7b7e7e0903f30; the conformance commit dfdcbab6 has the same
  classes): ``rope``, ``apply_rope``, ``timestep_embedding``, ``EmbedND``, ``MLPEmbedder``,
  ``RMSNorm``, ``QKNorm``, ``SelfAttention``, ``Modulation``, ``DoubleStreamBlock``,
  ``SingleStreamBlock``, ``LastLayer``, with the same module names (so the same state-dict
  keys) and the same order of operations;
* Neo: Haoming02/sd-webui-forge-classic ``backend/nn/flux.py`` at
  06d6af9a9b98436d013b398ab35f0b0bf8a888ce: the same maths, ``F.rms_norm`` for RMSNorm,
  blocks that add into ``img`` / ``txt`` / ``x`` in place (``in_place=True`` here).

Upstream's ``attention_function(q, k, v, heads, skip_reshape=True)`` (``backend/attention.py``)
is PyTorch's scaled-dot-product attention on ``(B, H, L, D)`` returning ``(B, L, H * D)``;
that is what :func:`attention` does. ``fp16_fix`` (Neo) clamps fp16 only: a no-op in fp32.
Written from the upstream files' behaviour, not copied.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def rope(pos: torch.Tensor, dim: int, theta: int) -> torch.Tensor:
    """``(B, L)`` positions -> ``(B, L, dim / 2, 2, 2)`` rotation matrices (upstream ``rope``)."""
    scale = torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim
    omega = 1.0 / (theta ** scale)
    angles = pos.to(torch.float64).unsqueeze(-1) * omega.unsqueeze(0)
    cos, sin = torch.cos(angles), torch.sin(angles)
    out = torch.stack([cos, -sin, sin, cos], dim=-1)
    return out.reshape(*out.shape[:-1], 2, 2).float()


def apply_rope(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    def one(x):
        x_ = x.float().reshape(*x.shape[:-1], -1, 1, 2)
        out = freqs_cis[..., 0] * x_[..., 0] + freqs_cis[..., 1] * x_[..., 1]
        return out.reshape(*x.shape).type_as(x)

    return one(xq), one(xk)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    q, k = apply_rope(q, k, pe)
    b, h, length, d = q.shape
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, length, h * d)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: int = 10000, time_factor: float = 1000.0) -> torch.Tensor:
    t = time_factor * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return embedding.to(t) if torch.is_floating_point(t) else embedding


class EmbedND(nn.Module):
    def __init__(self, dim: int, theta: int, axes_dim: list[int]):
        super().__init__()
        self.dim, self.theta, self.axes_dim = dim, theta, axes_dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.cat([rope(ids[..., i], self.axes_dim[i], self.theta) for i in range(ids.shape[-1])],
                         dim=-3).unsqueeze(1)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, x):
        return self.out_layer(self.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, self.scale.shape, weight=self.scale.to(x.dtype), eps=1e-6)


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm, self.key_norm = RMSNorm(dim), RMSNorm(dim)

    def forward(self, q, k, v):
        q, k = self.query_norm(q), self.key_norm(k)
        return q.to(v), k.to(v)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)


class Modulation(nn.Module):
    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim)

    def forward(self, vec):
        return self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)


def _mlp(hidden: int, mlp_hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(hidden, mlp_hidden), nn.GELU(approximate="tanh"), nn.Linear(mlp_hidden, hidden))


def _heads(qkv: torch.Tensor, heads: int):
    b, length, _ = qkv.shape
    return qkv.view(b, length, 3, heads, -1).permute(2, 0, 3, 1, 4)


class DoubleStreamBlock(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, in_place: bool):
        super().__init__()
        self.num_heads, self.hidden_size, self.in_place = num_heads, hidden_size, in_place
        mlp_hidden = int(hidden_size * mlp_ratio)
        for side in ("img", "txt"):
            setattr(self, f"{side}_mod", Modulation(hidden_size, double=True))
            setattr(self, f"{side}_norm1", nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{side}_attn", SelfAttention(hidden_size, num_heads, qkv_bias))
            setattr(self, f"{side}_norm2", nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{side}_mlp", _mlp(hidden_size, mlp_hidden))

    def _qkv(self, side: str, x: torch.Tensor, shift, scale):
        q, k, v = _heads(getattr(self, f"{side}_attn").qkv((1 + scale) * getattr(self, f"{side}_norm1")(x) + shift),
                         self.num_heads)
        q, k = getattr(self, f"{side}_attn").norm(q, k, v)
        return q, k, v

    def _update(self, side: str, x: torch.Tensor, attn: torch.Tensor, mod) -> torch.Tensor:
        _, _, gate1, shift2, scale2, gate2 = mod
        a = gate1 * getattr(self, f"{side}_attn").proj(attn)
        if self.in_place:  # Neo: img += ..., txt += ...
            x += a
            x += gate2 * getattr(self, f"{side}_mlp")((1 + scale2) * getattr(self, f"{side}_norm2")(x) + shift2)
            return x
        x = x + a
        return x + gate2 * getattr(self, f"{side}_mlp")((1 + scale2) * getattr(self, f"{side}_norm2")(x) + shift2)

    def forward(self, img, txt, vec, pe, attn_mask=None, modulation_dims_img=None, modulation_dims_txt=None,
                transformer_options={}):  # noqa: B006 - upstream's signature (Neo; Forge takes the first four)
        img_mod, txt_mod = self.img_mod(vec), self.txt_mod(vec)
        img_q, img_k, img_v = self._qkv("img", img, img_mod[0], img_mod[1])
        txt_q, txt_k, txt_v = self._qkv("txt", txt, txt_mod[0], txt_mod[1])
        attn = attention(torch.cat((txt_q, img_q), 2), torch.cat((txt_k, img_k), 2), torch.cat((txt_v, img_v), 2), pe)
        txt_attn, img_attn = attn[:, :txt.shape[1]], attn[:, txt.shape[1]:]
        img = self._update("img", img, img_attn, img_mod)
        txt = self._update("txt", txt, txt_attn, txt_mod)
        return img, txt


class SingleStreamBlock(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, in_place: bool):
        super().__init__()
        self.hidden_size, self.num_heads, self.in_place = hidden_size, num_heads, in_place
        self.mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.linear1 = nn.Linear(hidden_size, hidden_size * 3 + self.mlp_hidden_dim)
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden_dim, hidden_size)
        self.norm = QKNorm(hidden_size // num_heads)
        self.pre_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(hidden_size, double=False)

    def forward(self, x, vec, pe, attn_mask=None, modulation_dims=None, transformer_options={}):  # noqa: B006
        shift, scale, gate = self.modulation(vec)
        qkv, mlp = torch.split(self.linear1((1 + scale) * self.pre_norm(x) + shift),
                               [3 * self.hidden_size, self.mlp_hidden_dim], dim=-1)
        q, k, v = _heads(qkv, self.num_heads)
        q, k = self.norm(q, k, v)
        output = self.linear2(torch.cat((attention(q, k, v, pe), self.mlp_act(mlp)), 2))
        if self.in_place:  # Neo: x += ...
            x += gate * output
            return x
        return x + gate * output


class LastLayer(nn.Module):
    def __init__(self, hidden_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, vec):
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)
        return self.linear((1 + scale[:, None, :]) * self.norm_final(x) + shift[:, None, :])


class FluxBody(nn.Module):
    """The embedders, block lists and final layer of ``IntegratedFluxTransformer2DModel``
    (same attribute names as upstream); the two stand-in classes add their frontend's
    ``forward`` and inner loop."""

    def __init__(self, in_channels: int, vec_in_dim: int, context_in_dim: int, hidden_size: int, mlp_ratio: float,
                 num_heads: int, depth: int, depth_single_blocks: int, axes_dim: list[int], theta: int,
                 qkv_bias: bool, guidance_embed: bool, in_place: bool = False):
        super().__init__()
        self.guidance_embed = guidance_embed
        self.in_channels = self.out_channels = in_channels * 4
        self.hidden_size, self.num_heads = hidden_size, num_heads
        if sum(axes_dim) != hidden_size // num_heads:
            raise ValueError(f"Got {axes_dim} but expected positional dim {hidden_size // num_heads}")
        self.pe_embedder = EmbedND(hidden_size // num_heads, theta, axes_dim)
        self.img_in = nn.Linear(self.in_channels, hidden_size)
        self.time_in = MLPEmbedder(256, hidden_size)
        self.vector_in = MLPEmbedder(vec_in_dim, hidden_size)
        self.guidance_in = MLPEmbedder(256, hidden_size) if guidance_embed else nn.Identity()
        self.txt_in = nn.Linear(context_in_dim, hidden_size)
        self.double_blocks = nn.ModuleList([DoubleStreamBlock(hidden_size, num_heads, mlp_ratio, qkv_bias, in_place)
                                            for _ in range(depth)])
        self.single_blocks = nn.ModuleList([SingleStreamBlock(hidden_size, num_heads, mlp_ratio, in_place)
                                            for _ in range(depth_single_blocks)])
        self.final_layer = LastLayer(hidden_size, self.out_channels)

    def embed(self, img, txt, timesteps, y, guidance):
        img = self.img_in(img)
        vec = self.time_in(timestep_embedding(timesteps, 256).to(img.dtype))
        if self.guidance_embed and guidance is not None:
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256).to(img.dtype))
        return img, self.txt_in(txt), vec + self.vector_in(y)


def patchify(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """``b c (h ph) (w pw) -> b (h w) (c ph pw)`` with 2x2 patches and the image ids
    (0, row, column), as both frontends' ``forward`` do (inputs here are even-sized: no padding)."""
    bs, c, h, w = x.shape
    img = x.reshape(bs, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(bs, (h // 2) * (w // 2), c * 4)
    ids = torch.zeros(h // 2, w // 2, 3, dtype=torch.float32)
    ids[..., 1] = torch.arange(h // 2, dtype=torch.float32)[:, None]
    ids[..., 2] = torch.arange(w // 2, dtype=torch.float32)[None, :]
    return img, ids.reshape(1, -1, 3).expand(bs, -1, -1), h // 2, w // 2


def unpatchify(out: torch.Tensor, h_len: int, w_len: int) -> torch.Tensor:
    """``b (h w) (c ph pw) -> b c (h ph) (w pw)``."""
    bs, _, k = out.shape
    return out.reshape(bs, h_len, w_len, k // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(bs, k // 4, 2 * h_len, 2 * w_len)
