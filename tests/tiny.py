"""Tiny FLUX-architecture transformers and a plain Euler sampling loop, for tests.

Real diffusers classes built from small configs: nothing is mocked or downloaded.
"""

from __future__ import annotations

import copy

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

TINY_FLUX = dict(
    patch_size=1, in_channels=16, num_layers=2, num_single_layers=3, attention_head_dim=16,
    num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=24, axes_dims_rope=[4, 6, 6],
)


def tiny_flux(seed: int = 0, **overrides) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**{**TINY_FLUX, **overrides}).eval()
    # Random init leaves AdaLN gates at small values; scale them up so residuals are
    # large enough that a wrong forecast shows in the output.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("linear.weight"):
                p.mul_(20)
    return model


def fresh_copy(model: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(model)


class Inputs:
    """Fixed conditioning and noise for a tiny model, side length ``side`` tokens."""

    def __init__(self, side: int = 6, batch: int = 1, text: int = 5, seed: int = 1):
        g = torch.Generator().manual_seed(seed)
        self.batch, self.tokens = batch, side * side
        self.noise = torch.randn(batch, self.tokens, TINY_FLUX["in_channels"], generator=g)
        self.text = torch.randn(batch, text, TINY_FLUX["joint_attention_dim"], generator=g)
        self.pooled = torch.randn(batch, TINY_FLUX["pooled_projection_dim"], generator=g)
        ids = torch.zeros(self.tokens, 3)
        ids[:, 1] = torch.arange(self.tokens) // side
        ids[:, 2] = torch.arange(self.tokens) % side
        self.img_ids, self.txt_ids = ids, torch.zeros(text, 3)

    def call(self, model, x, sigma):
        return model(hidden_states=x, encoder_hidden_states=self.text, pooled_projections=self.pooled,
                     timestep=sigma.expand(self.batch), img_ids=self.img_ids, txt_ids=self.txt_ids,
                     return_dict=False)[0]


def sigmas(steps: int, shift: float = 3.0) -> torch.Tensor:
    """A shifted flow-matching schedule (uneven spacing, as FLUX uses), ending at 0."""
    s = torch.linspace(1.0, 1.0 / steps, steps)
    s = shift * s / (1 + (shift - 1) * s)
    return torch.cat([s, torch.zeros(1)])


@torch.no_grad()
def euler_sample(model, inputs: Inputs, steps: int, velocity=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Plain Euler flow-matching loop; ``velocity(model, x, sigma, step)`` overrides the model call.
    Returns the final sample and every step's model output."""
    sig = sigmas(steps)
    x, outputs = inputs.noise.clone(), []
    for i in range(steps):
        v = inputs.call(model, x, sig[i]) if velocity is None else velocity(model, x, sig[i], i)
        outputs.append(v)
        x = x + (sig[i + 1] - sig[i]) * v
    return x, outputs


def conditioning(seed: int = 0) -> dict:
    """Random prompt embeddings for the tiny FLUX pipeline (5 text tokens), in place of a text encoder."""
    g = torch.Generator().manual_seed(seed)
    return dict(prompt_embeds=torch.randn(1, 5, 32, generator=g), pooled_prompt_embeds=torch.randn(1, 24, generator=g))


def tiny_pipeline(model) -> FluxPipeline:
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None,
                        tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=model)
