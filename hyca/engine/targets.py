"""What a profile forecasts (its ``target``), and the model-output target's layout.

* ``"residual"``: the blocks' summed residuals, added to the first block's input stream at
  a skip step (the paper's feature caching, NOTES §4).
* ``"output"``: the output head's input (the last hidden state before the final norm and
  projection), one "block" x hidden dim.
* ``"model_output"``: the transformer's output itself, the denoiser's prediction, one
  "block" x output channels. A skip step runs no block and replaces the whole output
  with the forecast: the strategy of diffusers' TaylorSeer "lite" mode
  (``diffusers/hooks/taylorseer_cache.py``, 0.42.1: it zeroes every block and forecasts
  ``proj_out``), of FORA-style reuse of the whole model output, and of a k-diffusion
  sampler reusing its last model call. Clustering is over output channels.

A model output comes token-major ``(batch, tokens, channels)`` (FLUX, Chroma, QwenImage)
or channel-first ``(batch, channels, *spatial)`` (SD3, Sana, PixArt, Wan: unpatchified
latents); :func:`as_tokens` gives the engine its ``(batch, tokens, channels)`` view and
:func:`from_tokens` undoes it.
"""

from __future__ import annotations

from typing import Any

import torch

RESIDUAL, OUTPUT, MODEL_OUTPUT = "residual", "output", "model_output"
#: Every target a profile may name (metadata ``target``; absent means ``"residual"``).
TARGETS = (RESIDUAL, OUTPUT, MODEL_OUTPUT)
#: Each target in the words users read (console, warnings, stats).
TARGET_WORDS = {RESIDUAL: "blocks' residuals", OUTPUT: "output head's input", MODEL_OUTPUT: "model output"}


def target_of(metadata: dict[str, Any]) -> str:
    """The target a profile's metadata names (``"residual"`` when it names none: every
    profile made before targets existed). Raises ``ValueError`` for an unknown one."""
    target = metadata.get("target", RESIDUAL)
    if target not in TARGETS:
        raise ValueError(f"profile target must be one of {TARGETS}, got {target!r}")
    return target


def as_tokens(output: torch.Tensor) -> torch.Tensor:
    """A model output as ``(batch, tokens, channels)``: 3-D outputs are token-major
    already; ``(batch, channels, *spatial)`` (4-D images, 5-D videos) are flattened over
    their spatial axes with channels last (a view where possible). Raises ``ValueError``
    for fewer than 3 dimensions."""
    if output.dim() == 3:
        return output
    if output.dim() < 3:
        raise ValueError(f"a model output needs a batch, token and channel axis; got shape {tuple(output.shape)}")
    return output.movedim(1, -1).flatten(1, -2)


def output_tokens(sample: Any, profile: Any) -> torch.Tensor:
    """A transformer's output as an engine records it, ``(batch, tokens, channels)``;
    ``TypeError`` when it is not one tensor, ``ValueError`` when ``profile`` (None: any)
    forecasts another channel count."""
    if not isinstance(sample, torch.Tensor):  # Z-Image: one tensor per image
        raise TypeError(f"the model output is a {type(sample).__name__}, not one tensor, so a model-output "
                        "profile cannot forecast it; use a residual profile")
    tokens = as_tokens(sample)
    dim = profile.dim if profile is not None else tokens.shape[-1]
    if dim != tokens.shape[-1]:
        raise ValueError(f"the profile forecasts {dim} output channels, the model gives {tokens.shape[-1]}: "
                         "make a profile for this model")
    return tokens


def from_tokens(tokens: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Undo :func:`as_tokens`: ``tokens (batch, tokens, channels)`` in the layout, dtype
    and device of ``like`` (an output of the same call shape)."""
    tokens = tokens.to(device=like.device, dtype=like.dtype)
    if like.dim() == 3:
        return tokens.reshape(like.shape)
    spatial = like.shape[2:]
    return tokens.reshape(like.shape[0], *spatial, like.shape[1]).movedim(-1, 1)


def require_target(profile_metadata: dict[str, Any], supported: tuple[str, ...], host: str) -> None:
    """Raise ``ValueError`` saying so when a profile's target is one ``host`` cannot apply
    (a WebUI or ComfyUI session hooks the blocks only)."""
    target = target_of(profile_metadata)
    if target not in supported:
        raise ValueError(f"HyCa: this profile forecasts the {TARGET_WORDS[target]}, which {host} cannot apply here "
                         f"(it applies the {' and the '.join(TARGET_WORDS[t] for t in supported)}); use another "
                         f"profile, or let {host} probe its own")
