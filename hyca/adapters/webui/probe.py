"""Probing inside a WebUI generation: the core's closed-loop probe
(:func:`hyca.probing.probe_host`) run at a pass's first model call, on the user's own
conditioning (its first :data:`PROBE_SAMPLES` images), over the pass's own sigmas with its CFG
scale, at a reduced latent size.

The frontend's model call (Forge / Neo: the unet's ``apply_model`` as the
``model_function_wrapper`` receives it; A1111: the diffusion model's ``forward``) is the
probe's ``denoise``; :func:`~hyca.probing.host.euler_sample` walks the sigmas, and each
generation runs through a :class:`~.session.PassSession` with the probe's engine (its
recorder, then each candidate's cache), so calls reach the blocks exactly as in a pass.
The chosen profile then caches the pass that asked for it, from its first step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch

from ...engine.schedule import Schedule
from ...probing import CALIBRATION_SAMPLES
from ...probing.host import euler_sample

if TYPE_CHECKING:
    from .adapter import Adapter
    from .profiles import Chosen
    from .settings import Settings

#: The probe's latent has at most this many cells per side (FLUX: 32 latent cells, 256 px):
#: its cost grows with the token count, and the choice carries over to larger images.
PROBE_SIDE = 32
#: Images the probe samples at once: the core's calibration count, as the diffusers probe's
#: captions, so both hosts score a candidate by the same number of samples. They are the
#: user's first images of the batch (their own prompts), repeated with other noises when the
#: batch is smaller. One sample alone let one caption's noise decide
#: (bench/results/webui_path.md).
PROBE_SAMPLES = CALIBRATION_SAMPLES
#: Forge / Neo ``cond_or_uncond`` values (ComfyUI's convention): 0 = cond, 1 = uncond.
HINT_OF = {"cond": 0, "uncond": 1}


def _take(value: Any, batch: int, indices: list[int]) -> Any:
    """The images ``indices`` of a call's batch: every tensor whose first axis is the call's
    ``batch``, dicts, lists and tuples item by item; anything else as it is."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0 or value.shape[0] != batch:
            return value
        if indices == list(range(indices[0], indices[0] + len(indices))):
            return value[indices[0]:indices[0] + len(indices)]
        return value[torch.tensor(indices, device=value.device)]
    if isinstance(value, Mapping):
        return {k: _take(v, batch, indices) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in value):
        return type(value)(_take(v, batch, indices) for v in value)
    return value


def _images(start: int, available: int, samples: int) -> list[int]:
    """``samples`` image indices from the ``available`` ones at ``start``: the first
    ``samples`` when there are that many, else the available ones again in turn (the probe
    then draws another noise for each repeat)."""
    return [start + i % max(1, available) for i in range(samples)]


def branches_in_call(x: torch.Tensor, hint: Any, conditioning: dict[str, Any], guided: bool,
                     samples: int = PROBE_SAMPLES) -> dict[str, dict]:
    """The guidance branches one model call carries, each as the conditioning of
    ``samples`` images (the call's first ones, repeated in turn when it has fewer). Forge /
    Neo name a call's chunks (``hint`` = ``cond_or_uncond``, one chunk of
    ``batch / len(hint)`` images per entry; the branch's own ``transformer_options`` say
    which it is); A1111 batches cond then uncond in one call and names nothing (``hint``
    None: the first half is cond when guided)."""
    batch = x.shape[0]
    found: dict[str, dict] = {}
    if hint is not None:
        chunks = list(hint)
        size = batch // max(1, len(chunks))
        for branch, which in HINT_OF.items():
            if which in chunks:
                part = _take(conditioning, batch, _images(chunks.index(which) * size, size, samples))
                options = dict(part.get("transformer_options") or {})
                options["cond_or_uncond"] = [which]
                part["transformer_options"] = options
                found[branch] = part
        return found
    halves = guided and batch % 2 == 0 and batch >= 2
    size = batch // 2 if halves else batch
    found["cond"] = _take(conditioning, batch, _images(0, size, samples))
    if halves:
        found["uncond"] = _take(conditioning, batch, _images(size, size, samples))
    return found


def probe_shape(shape: tuple[int, ...], conditioning: Mapping[str, Any], side: int = PROBE_SIDE) -> tuple[int, ...]:
    """One image's latent ``shape[1:]`` with its last two (spatial) axes scaled down, aspect
    kept and even, to at most ``side`` cells; the full size when a conditioning tensor has
    the latent's spatial size (an inpainting mask, a reference latent), which must match."""
    per_image = tuple(shape[1:])
    spatial = [v for v in _tensors(conditioning) if v.dim() >= 3 and tuple(v.shape[-2:]) == per_image[-2:]]
    height, width = per_image[-2:]
    scale = min(1.0, side / max(height, width))
    if spatial or scale >= 1.0:
        return per_image
    return (*per_image[:-2], max(2, round(height * scale / 2) * 2), max(2, round(width * scale / 2) * 2))


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


@dataclass
class WebUIHost:
    """A WebUI pass as a :class:`~hyca.probing.ProbeHost`.

    ``model_call(x, t, conditioning)``: the frontend's model call; ``output``: what it
    returns (:data:`.model_call.OUTPUTS`); ``timestep_per_sigma``: the ``t`` the frontend passes per
    unit of sigma (Forge: 1, A1111's SD3: 1000); ``conditioning``: branch -> the
    conditioning of ``samples`` images (:func:`branches_in_call`; the probe's calls carry no
    hint: the session tells the branches apart by their order, cond first, as the recorder
    does); ``open_session(engine, sigmas)``: installs a
    :class:`~.session.PassSession` where the blocks find it and returns it (None removes
    it). ``latent``: one image's probe latent shape; ``samples``: the images of each
    probe generation (noise ``(samples, *latent)`` from ``seed``)."""

    model_call: Callable[[torch.Tensor, torch.Tensor, dict], Any]
    output: str
    timestep_per_sigma: float
    conditioning: dict[str, dict]
    sigmas: list[float]
    guidance_scale: float | None
    latent: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    open_session: Callable[[Any, list[float]], Any]
    num_blocks: int
    hidden_size: int
    seed: int = 0
    samples: int = PROBE_SAMPLES
    #: the model's output head is hooked (:func:`.kinds.gate_head`): the probe also tries
    #: forecasting its input (``target="output"``), as on diffusers
    output_head: bool = False
    #: the session records and forecasts the model call's output (:mod:`.model_call`): the
    #: probe also tries that target (TaylorSeer lite's strategy), as on diffusers
    model_output: bool = True
    failures: list[str] = field(default_factory=list)

    def sample(self, engine: Any) -> torch.Tensor:
        session = self.open_session(engine, self.sigmas) if engine is not None else None
        generator = torch.Generator().manual_seed(self.seed)
        noise = torch.randn(self.samples, *self.latent, generator=generator).to(self.device, self.dtype)
        try:
            return euler_sample(lambda x, sigma, branch: self._denoise(session, x, sigma, branch),
                                noise * self.sigmas[0], self.sigmas, self.guidance_scale)
        finally:
            self.open_session(None, self.sigmas)
            if session is not None and session.failed:
                raise RuntimeError("a probe run fell back to uncached sampling (see the console)")

    def _denoise(self, session: Any, x: torch.Tensor, sigma: float, branch: str) -> torch.Tensor:
        if interrupted():  # the probe runs inside one of the sampler's calls, which checks only between them
            raise ProbeInterrupted("the generation was interrupted (Interrupt or Skip) while HyCa probed")
        conditioning = self.conditioning[branch]
        s = torch.full((x.shape[0],), float(sigma), device=x.device, dtype=torch.float32)
        t = s * self.timestep_per_sigma

        def call() -> Any:
            return self.model_call(x, t, conditioning)

        out = (call() if session is None else session.run_call(x, s, None, call, self.output)).to(x.dtype)
        if self.output == "velocity":
            return out
        return (x - out) / float(sigma)


@dataclass
class PendingPass:
    """A pass whose profile is settled at its first model call(s), for its own settings.
    Blocks see no active call (``active`` None) and run as they are meanwhile."""

    chosen: Chosen
    settings: Settings
    schedule: Schedule
    label: str
    sigmas: Callable[[], list[float] | None]
    guidance: float | None
    adapter: Adapter
    model: torch.nn.Module
    conditioning: dict[str, dict] = field(default_factory=dict)
    #: the sigma of calls that ran uncached while gathering: the session starts after it
    gathered_at: float | None = None
    active: None = None
    failed: bool = False
    #: model calls run under HyCa: none while the profile is pending (Forge starts a hires pass
    #: twice, either side of a unet reset, and asks whether the first start ran any)
    calls_computed: int = 0
    calls_forecast: int = 0


class ProbeInterrupted(RuntimeError):
    """The user pressed Interrupt or Skip while the probe ran: it stops, nothing is saved."""


def stopped_by_user() -> str | None:
    """Which of the frontend's buttons stopped the generation: ``"Interrupt"`` or ``"Skip"``
    (``modules.shared.state.interrupted`` / ``skipped``, which A1111's and Forge's denoisers
    check at each of their calls, returning the latent so far); None when neither was
    pressed or there is no frontend."""
    try:
        from modules import shared

        if getattr(shared.state, "interrupted", False):
            return "Interrupt"
        return "Skip" if getattr(shared.state, "skipped", False) else None
    except Exception:  # noqa: BLE001 - not inside a WebUI (tests of the core, other hosts)
        return None


def interrupted() -> bool:
    """Whether the frontend's Interrupt or Skip was pressed (:func:`stopped_by_user`)."""
    return stopped_by_user() is not None


def guidance_of(value: Any) -> float | None:
    """A frontend's CFG scale as a float (None when it gives none)."""
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def progress_bar(fraction: float, text: str) -> None:
    """The probe's progress on the WebUI's progress bar (``shared.state.textinfo``)."""
    try:
        from modules import shared

        shared.state.textinfo = f"HyCa {text} ({fraction:.0%})"
    except Exception:  # noqa: BLE001 - no progress bar to show it on (tests, other hosts)
        pass


def run_probe(host: WebUIHost, run: Any, schedule: Any, guard: bool, fp: Mapping[str, Any],
              on_progress: Callable[[float, str], None] | None = None) -> Any:
    """:func:`hyca.probing.probe_host` on ``host`` for the pass's settings ``run``
    (a :class:`~hyca.profiles.settings.RunSettings`); progress on the console (tqdm) and
    through ``on_progress``."""
    from ...probing.probe import probe_host

    return probe_host(host, run, schedule, guard=guard, progress=True, on_progress=on_progress, fingerprint=fp,
                      facts={"frontend": "webui", "latent": list(host.latent)})
