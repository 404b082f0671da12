"""ComfyUI as a host of the core closed-loop probe (:func:`hyca.probing.probe_host`).

The probe asks for whole generations with an engine installed. Inside a sampling run
(ComfyUI's ``SAMPLER_SAMPLE`` wrapper: conditioning processed, model loaded) this host
runs :func:`hyca.probing.euler_sample` over the run's own sigmas and guidance scale, with
the model call ``comfy/samplers.py`` ``calc_cond_batch`` on the run's processed positive
(``cond_or_uncond`` 0) or negative (1) conditioning, at a reduced latent size (a fixed
seeded noise, so the same engine gives the same latent). The engine is installed as a
:class:`~hyca.adapters.webui.session.PassSession` of the node's own patches, exactly as
a sampling run installs its cache.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from ...engine.cache import BranchState
from ...probing import CALIBRATION_SAMPLES
from ..webui.session import PassSession

#: Spatial size of the probe's latent relative to the run's (per side).
PROBE_SCALE = 0.5
#: Smallest probe latent side (latent pixels).
MIN_SIDE = 16


def _spatial_conditioning(conds: dict, shape: Sequence[int]) -> bool:
    """Whether a condition carries a tensor laid out like the latent (inpaint / i2v concat,
    masks, areas): those are made for the run's size, so the probe keeps that size."""
    for entries in conds.values():
        for cond in entries or []:
            if "area" in cond or "mask" in cond:
                return True
            for value in (cond.get("model_conds") or {}).values():
                tensor = getattr(value, "cond", None)
                if isinstance(tensor, torch.Tensor) and tensor.ndim == len(shape) and \
                        tuple(tensor.shape[2:]) == tuple(shape[2:]):
                    return True
    return False


def probe_size(shape: Sequence[int], conds: dict) -> tuple[int, ...]:
    """The probe's latent shape: the run's with each spatial side scaled by
    :data:`PROBE_SCALE` (at least :data:`MIN_SIDE`, even), a batch of the core's
    ``CALIBRATION_SAMPLES`` noises (one image's noise alone lets it decide the choice); the
    run's own spatial size when the conditioning is laid out like the latent. ComfyUI repeats
    each condition to the call's batch (``comfy/conds.py`` ``process_cond``)."""
    if _spatial_conditioning(conds, shape):
        return (CALIBRATION_SAMPLES, *shape[1:])
    *lead, height, width = shape
    side = lambda n: n if n <= MIN_SIDE else max(MIN_SIDE, int(n * PROBE_SCALE) // 2 * 2)  # noqa: E731
    return (CALIBRATION_SAMPLES, *lead[1:], side(height), side(width))


class RecorderEngine:
    """The probe's recorder (``hyca.probing.SketchRecorder``) as a :class:`PassSession`
    engine: it makes the branch states a session asks for, and hands the recorder the input
    shape as the call's signature (a session's signature is ``(branch hint, shape)``, and
    ComfyUI names each call's branch; the recorder checks that one shape runs through both
    branches). Everything else is the recorder's own (the engine contract)."""

    def __init__(self, recorder: Any) -> None:
        self.recorder = recorder

    def new_state(self) -> BranchState:
        return BranchState()

    def begin_step(self, state: BranchState, position: float | None, signature: Any,
                   total_steps: int | None = None, step: int | None = None) -> bool:
        shape = signature[1] if isinstance(signature, tuple) and len(signature) >= 2 else signature
        return self.recorder.begin_step(state, position, shape, total_steps, step)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.recorder, name)


class ComfyProbeHost:
    """:class:`hyca.probing.ProbeHost` over one ComfyUI sampling run; it offers the model
    output (``apply_model``'s, :mod:`hyca.adapters.webui.model_call`) as a target.

    ``guider``: the run's ``CFGGuider`` inside its ``SAMPLER_SAMPLE`` wrapper (``inner_model``
    and processed ``conds`` set); ``model_options``: that run's ``extra_args["model_options"]``;
    ``latent_image``: the run's processed starting latent (zeros for txt2img);
    ``install(session)``: makes ``session`` the node's active session for the calls inside
    (``None``: no HyCa)."""

    def __init__(self, guider: Any, model_options: dict, sigmas: Sequence[float], latent_image: torch.Tensor,
                 num_blocks: int, hidden_size: int, install: Callable[[PassSession | None], Any],
                 guidance_scale: float | None, seed: int = 0) -> None:
        import comfy.utils

        self.model_output = True
        self.num_blocks, self.hidden_size = num_blocks, hidden_size
        self.guider, self.model_options, self.install = guider, model_options, install
        self.sigmas = [float(s) for s in sigmas]
        self.guidance_scale = guidance_scale
        shape = probe_size(tuple(latent_image.shape), guider.conds)
        start = latent_image[:1]
        if tuple(start.shape[1:]) != shape[1:]:
            start = comfy.utils.common_upscale(start, shape[-1], shape[-2], "bilinear", "disabled")
        start = start.expand(shape)  # the run's first image, under each calibration noise
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(latent_image)
        sampling = guider.inner_model.model_sampling
        self.start = sampling.noise_scaling(torch.tensor(self.sigmas[0]), noise, start)
        self.shape = shape

    def denoise(self, x: torch.Tensor, sigma: float, branch: str) -> torch.Tensor:
        """dx/dsigma of the run's model at ``sigma`` for ``branch`` ("cond" / "uncond"):
        ``(x - denoised) / sigma`` (k-diffusion's ``to_d``)."""
        import comfy.samplers

        index = 0 if branch == "cond" else 1
        conds: list = [None, None]
        conds[index] = self.guider.conds.get("positive" if index == 0 else "negative")
        timestep = torch.full((x.shape[0],), sigma, dtype=x.dtype, device=x.device)
        denoised = comfy.samplers.calc_cond_batch(self.guider.inner_model, conds, x, timestep, self.model_options)[index]
        return (x - denoised) / sigma

    def sample(self, engine: Any) -> torch.Tensor:
        """One probe generation with ``engine`` (None: full compute) on the node's patches."""
        from ...probing import euler_sample

        from ...probing.recorder import SketchRecorder

        if isinstance(engine, SketchRecorder):
            engine = RecorderEngine(engine)
        session = PassSession(engine, list(self.sigmas), "probe") if engine is not None else None
        with self.install(session):
            with torch.inference_mode():
                return euler_sample(self.denoise, self.start.clone(), self.sigmas, self.guidance_scale)
