"""The reference transformer's configuration, pixel packing and rectified-flow objective.

The transformer is a stock diffusers ``FluxTransformer2DModel``; pixels are packed into
tokens the way FLUX packs latents (``patch`` x ``patch`` pixels x 3 channels per token),
so there is no VAE: the model denoises RGB in [-1, 1] directly.
"""

from __future__ import annotations

import torch
from diffusers import FluxTransformer2DModel

from .text import CaptionEncoder, caption_vocabulary

PATCH = 4
TEXT_LENGTH = 16


def transformer_config(patch: int = PATCH, heads: int = 4, head_dim: int = 32, double: int = 2,
                       single: int = 4, text_dim: int = 64) -> dict:
    rope_t = head_dim // 4
    rope_xy = (head_dim - rope_t) // 2
    return dict(patch_size=1, in_channels=3 * patch * patch, out_channels=None, num_layers=double,
                num_single_layers=single, attention_head_dim=head_dim, num_attention_heads=heads,
                joint_attention_dim=text_dim, pooled_projection_dim=text_dim, guidance_embeds=False,
                axes_dims_rope=(head_dim - 2 * rope_xy, rope_xy, rope_xy))


def build(seed: int = 0, patch: int = PATCH, **sizes) -> tuple[FluxTransformer2DModel, CaptionEncoder]:
    """Fresh (untrained) transformer and caption encoder."""
    torch.manual_seed(seed)
    config = transformer_config(patch=patch, **sizes)
    text_dim = config["joint_attention_dim"]
    transformer = FluxTransformer2DModel(**config)
    encoder = CaptionEncoder(vocabulary=caption_vocabulary(), max_length=TEXT_LENGTH,
                             joint_dim=text_dim, pooled_dim=text_dim)
    return transformer, encoder


def patch_of(transformer: FluxTransformer2DModel) -> int:
    return int(round((transformer.config.in_channels / 3) ** 0.5))


def pack(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(b, 3, H, W) -> (b, H/p * W/p, 3 p p), row-major tokens, as FLUX packs latents."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // patch) * (w // patch), c * patch * patch)


def unpack(tokens: torch.Tensor, patch: int, height: int, width: int) -> torch.Tensor:
    b = tokens.shape[0]
    x = tokens.reshape(b, height // patch, width // patch, 3, patch, patch)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(b, 3, height, width)


def image_ids(height: int, width: int, patch: int) -> torch.Tensor:
    """RoPE positions (0, row, column) per image token."""
    rows, cols = height // patch, width // patch
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(cols)[None, :]
    return ids.reshape(rows * cols, 3)


def text_ids(length: int) -> torch.Tensor:
    return torch.zeros(length, 3)


def velocity(transformer: FluxTransformer2DModel, x: torch.Tensor, sigma: torch.Tensor,
             hidden: torch.Tensor, pooled: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The model's prediction of (noise - clean) at noise level ``sigma`` (shape (b,))."""
    patch = patch_of(transformer)
    return transformer(hidden_states=x, encoder_hidden_states=hidden, pooled_projections=pooled,
                       timestep=sigma, img_ids=image_ids(height, width, patch).to(x.device),
                       txt_ids=text_ids(hidden.shape[1]).to(x.device), return_dict=False)[0]


def flow_loss(transformer: FluxTransformer2DModel, clean: torch.Tensor, hidden: torch.Tensor,
              pooled: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Rectified flow: x_t = (1 - t) x0 + t noise, regress noise - x0. t is logit-normal,
    which spends most samples at intermediate noise where the layout is decided."""
    b, _, h, w = clean.shape
    x0 = pack(clean, patch_of(transformer))
    noise = torch.randn(x0.shape, generator=generator)
    t = torch.sigmoid(torch.randn(b, generator=generator))
    xt = (1 - t)[:, None, None] * x0 + t[:, None, None] * noise
    return torch.nn.functional.mse_loss(velocity(transformer, xt, t, hidden, pooled, h, w), noise - x0)
