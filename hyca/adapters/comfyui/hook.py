"""HyCa on a ComfyUI ``ModelPatcher``, through ComfyUI's own extension points only.

:meth:`HyCaPatch.install` clones the patcher and adds
- ``patches_replace["dit"]`` block replace patches (``set_model_patch_replace``), one per
  block, each chained with a patch already on that key;
- an ``OUTER_SAMPLE`` wrapper: one sampling run (a KSampler / SamplerCustom call). It
  opens a :class:`~hyca.adapters.webui.session.PassSession` over the run's sigmas (the
  schedule ``comfy/samplers.py`` ``CFGGuider.outer_sample`` gets, so denoise < 1, custom
  sigmas and a second (hires) sampler each bring their own) and closes it in ``finally``;
- a ``SAMPLER_SAMPLE`` wrapper: where a run without a profile is probed, once its
  conditioning is processed and its model loaded (:mod:`.probe_host`);
- an ``APPLY_MODEL`` wrapper: one model call (``comfy/model_base.py``
  ``BaseModel.apply_model``, ``t`` is sigma). Its branches come from
  ``transformer_options["cond_or_uncond"]`` (0 cond, 1 uncond per batch chunk; each chunk
  of a batched call is its own branch, :mod:`.chunks`) and its step from sigma (Heun's
  and DPM2's extra calls land on a step already begun).

``ModelPatcher.clone()`` deep-copies ``model_options`` but copies wrapper lists and hands
functions on by reference, so the patches and wrappers are plain closures over one
:class:`HyCaPatch`, which holds no tensors: a run's history lives in its session, which
exists only while the run does, in a context variable (a run on another thread never
sees it). A LoRA loaded after the node clones the patched model: the closures come along.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from ...engine.cache import HybridCache
from ...engine.schedule import Schedule, interval_for_speedup
from ...engine.targets import MODEL_OUTPUT, RESIDUAL, require_target
from ...profiles.settings import RunSettings
from ..samplers import Renoising, expect_renoising, renoising, replaces_noise
from ..webui import kinds
from ..webui.adapter import Adapter
from ..webui.fingerprint import fingerprint
from ..webui.profiles import Chosen, ProfileBook, for_sampler, nothing_forecast
from ..webui.results import PassStats
from ..webui.session import PassSession
from ..webui.settings import Settings, torch_dtype
from .chunks import ChunkedSession
from .probe_host import ComfyProbeHost

logger = logging.getLogger("hyca.comfyui")

#: The forecast targets the node applies: the blocks' residuals, and the model call's output
#: (``apply_model``'s denoised latent, :mod:`hyca.adapters.webui.model_call`).
APPLIED = (RESIDUAL, MODEL_OUTPUT)
#: The wrapper key HyCa's wrappers are filed under (``add_wrapper_with_key``).
WRAPPER_KEY = "hyca"

#: id(HyCaPatch) -> the sampling run in progress in this context.
_RUNS: contextvars.ContextVar[dict[int, "Active"]] = contextvars.ContextVar("hyca_comfyui_runs", default={})


def console(message: str) -> None:
    print(f"[HyCa] {message}")
    logger.info(message)


def _interrupted(error: BaseException) -> bool:
    """Whether ``error`` is ComfyUI's Cancel (``comfy.model_management.InterruptProcessingException``,
    which clears the interrupt flag as it is raised: swallowing it would sample the run anyway)."""
    try:
        from comfy.model_management import InterruptProcessingException
    except ImportError:
        return False
    return isinstance(error, InterruptProcessingException)


def lora_identity(patcher: Any) -> str:
    """Which weight patches (LoRAs) the run's model carries; ``""`` for none. ComfyUI gives a
    patcher a new ``patches_uuid`` whenever ``add_patches`` changes its weights."""
    patches = getattr(patcher, "patches", None) or {}
    return str(getattr(patcher, "patches_uuid", "")) if patches else ""


@dataclass
class RunReport:
    """What one sampling run did."""

    label: str
    profile: str
    stats: PassStats
    failed: bool = False
    notes: list[str] = field(default_factory=list)
    scheduled: int | None = None  # the run's step count (its sigmas), when known

    def describe(self) -> str:
        steps = self.stats.steps
        text = (f"{self.label}: {steps.computed} of {steps.total} steps computed, {steps.forecast} forecast; "
                f"{self.stats.flops_saving:.0%} of block compute skipped (profile: {self.profile})")
        if self.failed:
            rest = f" (the other {self.scheduled - steps.total} of {self.scheduled} steps)" \
                if self.scheduled is not None and steps.total < self.scheduled else ""
            why = f": {self.stats.stopped}" if self.stats.stopped else " (see the console)"
            text += f"; HyCa stopped caching{why}, the rest of the run was sampled uncached{rest}"
        elif self.scheduled is not None and steps.total < self.scheduled:
            text += f"; stopped after {steps.total} of {self.scheduled} steps (interrupted, or an error)"
        if self.stats.switches:
            text += f"; the guard switched {self.stats.describe_switches()}"
        return text


def already_applied(patcher: Any) -> bool:
    """Whether ``patcher`` carries HyCa's wrappers (an earlier HyCa node's clone)."""
    import comfy.patcher_extension as extension

    return WRAPPER_KEY in patcher.wrappers.get(extension.WrappersMP.OUTER_SAMPLE, {})


@dataclass
class Run:
    """What a sampling run was started with, for when it ends."""

    chosen: Chosen
    settings: RunSettings
    probe_fp: dict | None   # the model's fingerprint, when the run probes
    schedule: Schedule | None = None
    sigmas: list[float] = field(default_factory=list)
    closed_loop: bool = False  # settled before sampling (SAMPLER_SAMPLE), probed if need be, then this run caches
    renoising: Renoising | None = None  # the sampler adds fresh noise every step: why (:mod:`..samplers`)


@dataclass
class Active:
    """The session HyCa's patches serve in this context (``None``: they stay out of the way)."""

    session: PassSession | None
    run: Run | None = None


class HyCaPatch:
    """One HyCa node's settings, model family and profiles; shared by reference by every
    clone of the model it patched."""

    def __init__(self, settings: Settings, adapter: Adapter, book: ProfileBook | None = None) -> None:
        self.settings = settings
        self.adapter = adapter
        self.book = book or ProfileBook()
        self.reports: list[RunReport] = []
        self._said: set[str] = set()

    def say_once(self, message: str) -> None:
        if message not in self._said:
            self._said.add(message)
            console(message)

    def current(self) -> PassSession | None:
        """The session of the run in progress in this context, if HyCa runs in it."""
        active = _RUNS.get().get(id(self))
        return active.session if active is not None else None

    @contextlib.contextmanager
    def installed(self, session: PassSession | None, run: Run | None = None) -> Iterator[Active]:
        """``session`` serves this node's patches in this context until the block ends."""
        active = Active(session, run)
        runs = dict(_RUNS.get())
        runs[id(self)] = active
        token = _RUNS.set(runs)
        try:
            yield active
        finally:
            _RUNS.reset(token)

    # --- installing ---------------------------------------------------------------------

    def install(self, patcher: Any) -> Any:
        """A clone of ``patcher`` with HyCa's replace patches and wrappers; ``patcher``
        itself is left as it was. Raises ``ValueError`` when HyCa is already on it
        (:func:`already_applied`: the node gives such a model back unchanged)."""
        import comfy.patcher_extension as extension

        if already_applied(patcher):
            raise ValueError("HyCa is already applied to this model (two HyCa nodes in a row)")
        clone = patcher.clone()
        model = clone.model.diffusion_model
        replace = clone.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
        for index, (spec, i, _) in enumerate(self.adapter.blocks(model)):
            existing = replace.get((spec.dit_key, i))
            patch = kinds.PATCHES[spec.layout](self.current, index, existing)
            clone.set_model_patch_replace(patch, "dit", spec.dit_key, i)

        def outer_sample(executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
            return self._run(executor, noise, latent_image, sampler, sigmas, *args, **kwargs)

        def sampler_sample(executor, guider, sigmas, extra_args, callback, noise, latent_image=None, *args, **kwargs):
            self._probe_if_pending(guider, extra_args, latent_image)
            return executor(guider, sigmas, extra_args, callback, noise, latent_image, *args, **kwargs)

        def apply_model(executor, x, t, *args, **kwargs):
            return self._call(executor, x, t, *args, **kwargs)

        clone.add_wrapper_with_key(extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, outer_sample)
        clone.add_wrapper_with_key(extension.WrappersMP.SAMPLER_SAMPLE, WRAPPER_KEY, sampler_sample)
        clone.add_wrapper_with_key(extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, apply_model)
        return clone

    # --- one sampling run ---------------------------------------------------------------

    def _run(self, executor: Any, noise: torch.Tensor, latent_image: torch.Tensor, sampler: Any,
             sigmas: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        guider = executor.class_obj
        try:
            session, run = self._start(guider, sigmas, getattr(getattr(sampler, "sampler_function", None), "__name__",
                                                                None))
        except Exception as error:  # noqa: BLE001 - HyCa must never break the host
            console(f"could not start ({type(error).__name__}: {error}); this run is sampled uncached")
            return executor(noise, latent_image, sampler, sigmas, *args, **kwargs)
        with self.installed(session, run) as active:
            try:
                return executor(noise, latent_image, sampler, sigmas, *args, **kwargs)
            finally:
                try:
                    self._finish(active.session, run)
                except Exception as error:  # noqa: BLE001 - a report must never replace the run's result
                    console(f"could not report this run ({type(error).__name__}: {error})")

    def _start(self, guider: Any, sigmas: torch.Tensor, sampler: str | None = None) -> tuple[PassSession | None, Run]:
        schedule_sigmas = [float(s) for s in sigmas.flatten()]
        steps = len(schedule_sigmas) - 1
        settings = self.settings
        if settings.speedup:
            interval, reached = interval_for_speedup(steps, settings.warmup, settings.speedup, settings.compute_last)
            reach = "" if reached >= settings.speedup else f" (the most this run allows: {reached:.2f}x)"
            self.say_once(f"target speed-up {settings.speedup:g}x over {steps} steps: N={interval}, "
                          f"{reached:.2f}x fewer block passes{reach}")
            settings = dataclasses.replace(settings, interval=interval)
        model = guider.model_patcher.model.diffusion_model
        chosen = self.book.choose(model, self.adapter, settings.profile, settings.hub_repo, settings.interval,
                                  lora_identity(guider.model_patcher), settings.lora_reuse)
        for note in chosen.notes:
            self.say_once(note)
        schedule = Schedule(interval=settings.interval, warmup=settings.warmup, compute_last=settings.compute_last)
        noisy = renoising(sampler)
        if chosen.profile is None and (all(schedule.plan(steps)) or replaces_noise(noisy)):
            # nothing forecast (the schedule, or a sampler that replaces the noise): nothing to probe for
            chosen = (nothing_forecast(self.adapter, model, "the sampler replaces the noise every step")
                      if replaces_noise(noisy) else nothing_forecast(self.adapter, model))
        run_settings = RunSettings(steps=steps, guidance_scale=float(getattr(guider, "cfg", 1.0)),
                                   sigmas=tuple(schedule_sigmas), interval=settings.interval, warmup=settings.warmup,
                                   compute_last=settings.compute_last, positions="step")
        probe_fp = fingerprint(model, self.adapter) if chosen.profile is None else None
        run = Run(chosen, run_settings, probe_fp, schedule, schedule_sigmas, renoising=noisy)
        if chosen.profile is None:
            # automatic (or a LoRA set's own profile): settled for this run's settings once its
            # conditioning is processed (SAMPLER_SAMPLE), probed closed loop if none was made for them
            run.closed_loop = True
            return None, run
        run.chosen = chosen = for_sampler(chosen, self.adapter, model, run.renoising, self.say_once)
        engine = self._engine(chosen.profile, schedule)
        self._note_mismatch(chosen, run_settings, engine, run.renoising)
        return self._session(engine, run), run

    def _engine(self, profile: Any, schedule: Schedule) -> HybridCache:
        require_target(profile.metadata, APPLIED, "the ComfyUI node")
        return HybridCache(profile, schedule, cache_dtype=torch_dtype(self.settings.cache_dtype),
                           guard=None if self.settings.guard else False,
                           compare_settings=False, log_notes=False)  # the run's report says its notes

    def _session(self, engine: Any, run: Run) -> PassSession:
        # a callable schedule: the session prepares a probing engine for the step count
        return ChunkedSession(engine, lambda: run.sigmas, f"run {len(self.reports) + 1}")

    def _probe_if_pending(self, guider: Any, extra_args: dict, latent_image: torch.Tensor | None) -> None:
        """Before a run without a profile samples: the profile chosen for its settings (this
        session's, the cache's, the Hub's) or the core closed-loop probe's, over the run's
        sigmas and guidance at a reduced latent size; the run then caches with it. Any failure
        leaves the run uncached, said on the console."""
        active = _RUNS.get().get(id(self))
        if active is None or active.run is None or not active.run.closed_loop:
            return
        run = active.run
        run.closed_loop = False
        try:
            host = self._probe_host(guider, extra_args["model_options"], latent_image, run)
            chosen = self.book.for_settings(run.chosen, run.settings, host.shape, lambda: self._probe(host, run),
                                            APPLIED, self.say_once, output_channels=int(host.shape[1]))
            chosen = for_sampler(chosen, self.adapter, guider.model_patcher.model.diffusion_model, run.renoising,
                                 self.say_once)
            engine = self._engine(chosen.profile, run.schedule)
        except Exception as error:  # noqa: BLE001 - the run still samples, uncached
            if _interrupted(error):  # the user's Cancel (raised by every comfy.ops layer): ComfyUI's to handle
                raise
            console(f"no profile for this run ({type(error).__name__}: {error}); this run is sampled uncached")
            return
        run.chosen = chosen
        for note in chosen.notes:
            self.say_once(note)
        console(f"profile ready ({chosen.source})")
        if run.renoising:  # made for these settings, not for this sampler
            self._note_mismatch(chosen, run.settings, engine, run.renoising)
        active.session = self._session(engine, run)

    def _probe_host(self, guider: Any, model_options: dict, latent_image: torch.Tensor | None,
                    run: Run) -> ComfyProbeHost:
        model = guider.model_patcher.model.diffusion_model
        if latent_image is None:
            raise ValueError("the sampler gave no latent to size the probe by")
        return ComfyProbeHost(guider, model_options, run.sigmas, latent_image, len(self.adapter.blocks(model)),
                              self.adapter.hidden_size(model), self.installed, run.settings.guidance_scale)

    def _probe(self, host: ComfyProbeHost, run: Run) -> Any:
        from ...probing import probe_host

        console(f"probing {self.adapter.name} closed loop (latent {list(host.shape)}, this run's "
                f"{run.settings.steps} steps, guidance {run.settings.guidance_scale:g})")
        return probe_host(host, run.settings, run.schedule, fingerprint=run.probe_fp,
                          facts={"frontend": "comfyui", "latent": list(host.shape)})

    def _note_mismatch(self, chosen: Chosen, run: RunSettings, engine: HybridCache, renoising: str | None = None
                       ) -> None:
        """A profile chosen for other settings, or a sampler that re-noises every step
        (``renoising``): the engine takes the off-settings path (:mod:`hyca.profiles.off_settings`)
        and its note is said once."""
        if chosen.profile is None:
            return
        off = expect_renoising(engine, run, renoising)
        if off is not None:
            self.say_once(off.describe())

    def _finish(self, session: PassSession | None, run: Run) -> None:
        if session is None:  # the run ended before it sampled
            return
        stats = session.stats()
        report = RunReport(session.label, run.chosen.source, stats, session.failed, list(stats.notes),
                           scheduled=len(run.sigmas) - 1 if run.sigmas else None)
        self.reports.append(report)
        console(report.describe())
        for note in stats.notes:
            self.say_once(note)

    # --- one model call -----------------------------------------------------------------

    def _call(self, executor: Any, x: torch.Tensor, t: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        session = self.current()
        if session is None:
            return executor(x, t, *args, **kwargs)
        options = kwargs.get("transformer_options")
        if options is None and len(args) >= 4:  # (c_concat, c_crossattn, control, transformer_options)
            options = args[3]
        hint = (options or {}).get("cond_or_uncond")
        hint = tuple(hint) if hint is not None else None
        ids = (options or {}).get("uuids")  # comfy/samplers.py _calc_cond_batch: one per chunk, stable over a run
        return session.run_call(x, t, hint, lambda: executor(x, t, *args, **kwargs), "denoised",
                                tuple(ids) if ids else None)

    # --- results ------------------------------------------------------------------------

    def describe(self) -> str:
        """What ran so far, one line per sampling run (the node's STRING output at the time)."""
        return "\n".join(r.describe() for r in self.reports)
