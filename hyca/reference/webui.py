"""The reference model in a WebUI frontend's own FLUX class.

Forge's and Forge Neo's ``backend/nn/flux.py`` ``IntegratedFluxTransformer2DModel`` load
FLUX in Black Forest Labs' key layout (``double_blocks.N.img_attn.qkv``, ``single_blocks.N
.linear1``, ``final_layer.adaLN_modulation.1`` ...) and patchify a ``(B, C, H, W)`` latent in
2 x 2 patches themselves. The shipped reference model (:mod:`hyca.reference`) is a diffusers
``FluxTransformer2DModel`` over 4 x 4 RGB pixel patches. This module does the two things that
put one into the other without changing what it computes:

* :func:`to_bfl_state_dict` renames and fuses the diffusers weights into the BFL layout: the
  inverse of diffusers' ``convert_flux_transformer_checkpoint_to_diffusers``
  (``src/diffusers/loaders/single_file_utils.py``): q, k, v concatenated into one ``qkv``,
  the single blocks' q, k, v and MLP input into ``linear1``, and the output norm's (scale,
  shift) halves swapped back to BFL's (shift, scale);
* :func:`tokens_to_latent` / :func:`latent_to_tokens` lay the model's 48-channel tokens out as a
  ``(B, 12, 2 h, 2 w)`` "latent" whose 2 x 2 patchify (``b c (h ph) (w pw) -> b (h w) (c ph pw)``,
  the frontends' ``forward``) gives back the same tokens in the same order, so the frontend's
  image position ids (row, column per patch) are the diffusers pipeline's too.

:func:`bfl_config` gives the frontend class's constructor arguments, and
:class:`FrontendSimpleSchedule` lets the diffusers pipeline step through the sigmas a WebUI
run of the same step count uses. Nothing here imports a frontend; the caller builds the class
(the tests' ``tests/standins/bfl_flux_forge.py`` / ``bfl_flux_neo.py``, or a frontend's own
``backend/nn/flux.py``) and loads the state dict into it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

#: The frontends' patchify: 2 x 2 latent pixels per token (Forge / Neo ``forward``).
FRONTEND_PATCH = 2


def bfl_config(transformer: Any) -> dict[str, Any]:
    """Constructor arguments of BFL's / Forge's ``IntegratedFluxTransformer2DModel`` for a
    diffusers ``FluxTransformer2DModel`` ``transformer`` (its ``config``). ``in_channels`` is
    per latent channel: the frontend multiplies it by 4 (2 x 2 patches). Raises ValueError for
    a transformer the frontend class cannot express (patch_size != 1, channels not a multiple
    of 4, output channels other than input)."""
    c = transformer.config
    if c.patch_size != 1 or c.in_channels % FRONTEND_PATCH ** 2:
        raise ValueError(f"the frontend's FLUX patchifies 2x2 itself: needs patch_size 1 and in_channels a multiple "
                         f"of 4, got patch_size {c.patch_size}, in_channels {c.in_channels}")
    if c.out_channels not in (None, c.in_channels):
        raise ValueError(f"the frontend's FLUX outputs as many channels as it takes, got {c.out_channels}")
    hidden = c.num_attention_heads * c.attention_head_dim
    mlp = transformer.transformer_blocks[0].ff.net[0].proj.out_features if c.num_layers else 4 * hidden
    return dict(in_channels=c.in_channels // FRONTEND_PATCH ** 2, vec_in_dim=c.pooled_projection_dim,
                context_in_dim=c.joint_attention_dim, hidden_size=hidden, mlp_ratio=mlp / hidden,
                num_heads=c.num_attention_heads, depth=c.num_layers, depth_single_blocks=c.num_single_layers,
                axes_dim=list(c.axes_dims_rope), theta=10000, qkv_bias=True, guidance_embed=bool(c.guidance_embeds))


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    """diffusers' ``AdaLayerNormContinuous`` chunks (scale, shift); BFL's ``LastLayer`` (shift, scale)."""
    scale, shift = t.chunk(2, dim=0)
    return torch.cat([shift, scale], dim=0)


def _linear(out: dict, new: str, sd: dict, old: str) -> None:
    out[f"{new}.weight"] = sd.pop(f"{old}.weight")
    if f"{old}.bias" in sd:
        out[f"{new}.bias"] = sd.pop(f"{old}.bias")


def _fused(out: dict, new: str, sd: dict, olds: list[str]) -> None:
    """Several diffusers linears on the same input as one BFL linear (rows concatenated)."""
    out[f"{new}.weight"] = torch.cat([sd.pop(f"{o}.weight") for o in olds], dim=0)
    out[f"{new}.bias"] = torch.cat([sd.pop(f"{o}.bias") for o in olds], dim=0)


def to_bfl_state_dict(transformer: Any) -> dict[str, torch.Tensor]:
    """The diffusers ``FluxTransformer2DModel`` ``transformer``'s weights under BFL / Forge key
    names, cloned (the result shares no storage with the model). Raises KeyError when a
    diffusers weight is left unconverted (a layout this converter does not know)."""
    sd = {k: v.detach().clone() for k, v in transformer.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    _linear(out, "img_in", sd, "x_embedder")
    _linear(out, "txt_in", sd, "context_embedder")
    _linear(out, "time_in.in_layer", sd, "time_text_embed.timestep_embedder.linear_1")
    _linear(out, "time_in.out_layer", sd, "time_text_embed.timestep_embedder.linear_2")
    _linear(out, "vector_in.in_layer", sd, "time_text_embed.text_embedder.linear_1")
    _linear(out, "vector_in.out_layer", sd, "time_text_embed.text_embedder.linear_2")
    if transformer.config.guidance_embeds:
        _linear(out, "guidance_in.in_layer", sd, "time_text_embed.guidance_embedder.linear_1")
        _linear(out, "guidance_in.out_layer", sd, "time_text_embed.guidance_embedder.linear_2")
    for i in range(transformer.config.num_layers):
        d, b = f"transformer_blocks.{i}", f"double_blocks.{i}"
        _linear(out, f"{b}.img_mod.lin", sd, f"{d}.norm1.linear")
        _linear(out, f"{b}.txt_mod.lin", sd, f"{d}.norm1_context.linear")
        _fused(out, f"{b}.img_attn.qkv", sd, [f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v"])
        _fused(out, f"{b}.txt_attn.qkv", sd, [f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj"])
        out[f"{b}.img_attn.norm.query_norm.scale"] = sd.pop(f"{d}.attn.norm_q.weight")
        out[f"{b}.img_attn.norm.key_norm.scale"] = sd.pop(f"{d}.attn.norm_k.weight")
        out[f"{b}.txt_attn.norm.query_norm.scale"] = sd.pop(f"{d}.attn.norm_added_q.weight")
        out[f"{b}.txt_attn.norm.key_norm.scale"] = sd.pop(f"{d}.attn.norm_added_k.weight")
        _linear(out, f"{b}.img_attn.proj", sd, f"{d}.attn.to_out.0")
        _linear(out, f"{b}.txt_attn.proj", sd, f"{d}.attn.to_add_out")
        _linear(out, f"{b}.img_mlp.0", sd, f"{d}.ff.net.0.proj")
        _linear(out, f"{b}.img_mlp.2", sd, f"{d}.ff.net.2")
        _linear(out, f"{b}.txt_mlp.0", sd, f"{d}.ff_context.net.0.proj")
        _linear(out, f"{b}.txt_mlp.2", sd, f"{d}.ff_context.net.2")
    for i in range(transformer.config.num_single_layers):
        d, b = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        _linear(out, f"{b}.modulation.lin", sd, f"{d}.norm.linear")
        _fused(out, f"{b}.linear1", sd, [f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v", f"{d}.proj_mlp"])
        _linear(out, f"{b}.linear2", sd, f"{d}.proj_out")
        out[f"{b}.norm.query_norm.scale"] = sd.pop(f"{d}.attn.norm_q.weight")
        out[f"{b}.norm.key_norm.scale"] = sd.pop(f"{d}.attn.norm_k.weight")
    out["final_layer.adaLN_modulation.1.weight"] = _swap_halves(sd.pop("norm_out.linear.weight"))
    out["final_layer.adaLN_modulation.1.bias"] = _swap_halves(sd.pop("norm_out.linear.bias"))
    _linear(out, "final_layer.linear", sd, "proj_out")
    if sd:  # popped as converted: what is left has no counterpart here
        left = sorted(sd)
        raise KeyError(f"diffusers weights with no BFL counterpart here: {left[:5]}{' ...' if len(left) > 5 else ''}")
    return out


def tokens_to_latent(tokens: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``(B, rows * cols, 4 C)`` row-major tokens -> ``(B, C, 2 rows, 2 cols)``: the latent whose
    frontend patchify returns ``tokens`` unchanged (channel ``c * 4 + ph * 2 + pw`` of token
    ``(i, j)`` sits at latent ``[c, 2 i + ph, 2 j + pw]``). Raises ValueError on a token count
    that is not ``rows * cols`` or a width not divisible by 4."""
    b, n, k = tokens.shape
    p = FRONTEND_PATCH
    if n != rows * cols or k % (p * p):
        raise ValueError(f"tokens {tuple(tokens.shape)} do not fit {rows}x{cols} patches of {p}x{p}")
    x = tokens.reshape(b, rows, cols, k // (p * p), p, p)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(b, k // (p * p), rows * p, cols * p)


def latent_to_tokens(latent: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`tokens_to_latent`: ``(B, C, H, W)`` -> ``(B, H/2 * W/2, 4 C)``."""
    b, c, h, w = latent.shape
    p = FRONTEND_PATCH
    x = latent.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), c * p * p)


def images_to_latent(images: torch.Tensor, pixel_patch: int) -> torch.Tensor:
    """``(B, 3, H, W)`` pixels in [-1, 1] -> the frontend latent of the model's tokens
    (:func:`hyca.reference.model.pack`, then :func:`tokens_to_latent`)."""
    from .model import pack

    _, _, h, w = images.shape
    return tokens_to_latent(pack(images, pixel_patch), h // pixel_patch, w // pixel_patch)


def latent_to_images(latent: torch.Tensor, pixel_patch: int) -> torch.Tensor:
    """Inverse of :func:`images_to_latent`: the frontend latent -> ``(B, 3, H, W)`` pixels."""
    from .model import unpack

    rows, cols = latent.shape[-2] // FRONTEND_PATCH, latent.shape[-1] // FRONTEND_PATCH
    return unpack(latent_to_tokens(latent), pixel_patch, rows * pixel_patch, cols * pixel_patch)



class FrontendSimpleSchedule(FlowMatchEulerDiscreteScheduler):
    """diffusers' flow-matching Euler scheduler walking the sigmas Forge / Neo's "Simple"
    schedule gives a flow model: ``sigma_i = shift s / (1 + (shift - 1) s)`` at ``s = 1 - i / N``
    (i = 0 .. N-1), then 0 (``simple_scheduler`` over ``ModelSamplingFlux``'s sigmas, ComfyUI
    ``comfy/samplers.py``, which both frontends carry). diffusers' own ``set_timesteps(N)``
    ends at the shifted ``sigma_min`` instead of ``shift(1 / N)``, so the same step count is a
    slightly different schedule; this one makes a diffusers run and a WebUI run of N steps
    step through the same sigmas. ``sigmas=`` or ``timesteps=`` passed by a caller still win."""

    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None, timesteps=None):
        if sigmas is None and timesteps is None and num_inference_steps:
            sigmas = np.linspace(1.0, 1.0 / num_inference_steps, num_inference_steps)
        return super().set_timesteps(num_inference_steps, device=device, sigmas=sigmas, mu=mu, timesteps=timesteps)


def frontend_scheduler(shift: float) -> FrontendSimpleSchedule:
    """:class:`FrontendSimpleSchedule` at scheduler shift ``shift`` (FLUX samples at 3)."""
    return FrontendSimpleSchedule(shift=shift)
