"""What a host (diffusers, a WebUI, the app, ComfyUI) gives the closed-loop probe, and a
sampling loop a host can build its ``sample`` on.

The probe (:func:`hyca.probing.probe.probe_host`) never sees a model: it asks the host for
generations at the probe's settings with an engine installed (its recorder, then each
candidate's :class:`~hyca.engine.cache.HybridCache`) and compares their final latents. A
host whose own sampler cannot be run on demand (a WebUI pass, a ComfyUI node) runs
:func:`euler_sample` over its sigmas with its model call as ``denoise``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Protocol, Sequence

import torch

if TYPE_CHECKING:  # the engine's hook-facing interface: HybridCache or SketchRecorder
    from ..engine.cache import HybridCache
    from .recorder import SketchRecorder

    Engine = HybridCache | SketchRecorder

#: The two branches of classifier-free guidance, in the order :func:`euler_sample` calls them.
BRANCHES = ("cond", "uncond")


class ProbeHost(Protocol):
    """What a host gives the closed-loop probe.

    Optional: ``output_head: bool`` (read with ``getattr``, default False): the host can
    record and forecast the output head's input (an engine whose ``target`` is
    ``"output"``, one block), so the probe can try that target: when asked for by name, or
    where the host offers no model output (the head maps its input linearly to that output).
    ``model_output: bool`` (default False): likewise for the model's output (target ``"model_output"``, one
    block of output channels: the host records its model call's output at computed steps
    and returns the engine's forecast in its place at skip steps)."""

    num_blocks: int          # blocks the host's engine records (or 1 for an output-head target)
    hidden_size: int         # feature dimension D of a residual

    def sample(self, engine: "Engine | None") -> torch.Tensor:
        """One generation at the probe's settings with ``engine`` installed on the host's model
        (None: full compute; the probe's recorder: a recording pass), returning the final latent."""
        ...


def euler_sample(denoise: Callable[[torch.Tensor, float, str], torch.Tensor], x: torch.Tensor,
                 sigmas: Sequence[float], guidance_scale: float | None) -> torch.Tensor:
    """k-diffusion-style Euler over ``sigmas`` (descending, last usually 0). ``denoise(x, sigma,
    branch)`` with branch in ("cond", "uncond") returns dx/dsigma (flow matching: the velocity;
    k-diffusion: (x - denoised) / sigma). With guidance > 1: d = d_u + g (d_c - d_u), cond first then
    uncond at each step. Without: only "cond" is called.

    ``x``: the starting latent at ``sigmas[0]`` (any shape, batch first); one step per
    consecutive pair of sigmas, ``x <- x + (sigma_next - sigma) d`` (k-diffusion's
    ``sample_euler`` without churn). Returns the latent at ``sigmas[-1]``. Raises
    ``ValueError`` for fewer than two sigmas."""
    sigmas = [float(s) for s in sigmas]
    if len(sigmas) < 2:
        raise ValueError(f"euler_sample needs at least two sigmas (one step), got {len(sigmas)}")
    guided = guidance_scale is not None and float(guidance_scale) > 1.0
    for sigma, following in zip(sigmas[:-1], sigmas[1:]):
        d = denoise(x, sigma, "cond")
        if guided:
            d_uncond = denoise(x, sigma, "uncond")
            d = d_uncond + float(guidance_scale) * (d - d_uncond)
        x = x + (following - sigma) * d
    return x
