"""The glue between a WebUI generation and the engine: one :class:`PassSession` per
sampling pass, hooked in through the frontend's own extension points, and dropped when
the pass ends whatever happened.

Forge / Forge Neo: ``p.sd_model.forge_objects.unet`` is cloned with a model-function
wrapper (chained with any existing one) that opens each model call, plus, where the
frontend has them, ``patches_replace["dit"]`` block patches. Models without replace
hooks get gated blocks (gates.py). A1111: the diffusion model's instance ``forward``
opens each call (sigma from ``on_cfg_denoiser``) and its blocks are gated; everything
is removed when the generation ends.

A pass whose profile is "automatic" (or a LoRA set's own) starts as a :class:`probe.PendingPass`:
at its first model call that carries the branches the probe needs, the profile for the
pass's settings is looked up or probed on that call's conditioning (:mod:`.probe`), and
the pass runs cached from there.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

import torch

from ...engine.cache import HybridCache
from ...engine.schedule import Schedule, interval_for_speedup
from ...engine.targets import MODEL_OUTPUT, OUTPUT, RESIDUAL, require_target, target_of
from ...profiles.settings import RunSettings
from . import gates, kinds, probe
from ..samplers import Renoising, expect_renoising, renoising, replaces_noise
from .adapter import Adapter
from .fingerprint import fingerprint
from .processing import diffusion_model_of, lora_identity, pass_sigmas, pass_steps
from .profiles import AUTOMATIC, Chosen, ProfileBook, for_sampler, menu_label, nothing_forecast
from .registry import recognise, supported
from .results import PassStats, infotext
from .session import PassSession, step_of
from .settings import ERROR_KEY, INFOTEXT_KEYS, RESULT_KEYS, Settings, torch_dtype

logger = logging.getLogger("hyca.webui")


def console(message: str) -> None:
    print(f"[HyCa] {message}")
    logger.info(message)


def applied_targets(head: bool) -> tuple[str, ...]:
    """What a WebUI pass can forecast: the blocks' residuals, the model call's output
    (:mod:`.model_call`), and the output head's input when the adapter knows the model's head."""
    return (RESIDUAL, MODEL_OUTPUT, OUTPUT) if head else (RESIDUAL, MODEL_OUTPUT)


class Controller:
    """Process-wide: at most one pass runs at a time in a WebUI."""

    def __init__(self) -> None:
        self.session: PassSession | None = None
        self.pass_key: tuple | None = None
        self.passes: list[tuple[str, PassStats]] = []
        self.gated: list[torch.nn.Module] = []
        self.noted_sigma: float | None = None
        self.book = ProfileBook()
        self.chosen: Chosen | None = None
        self.renoising: Renoising | None = None  # the pass's sampler adds fresh noise every step: why (:mod:`..samplers`)
        self.hires_off_said: tuple | None = None  # the hires pass "off (as set)" was said for
        self.batch_key: tuple | None = None
        self.reported = 0
        self.run_settings: RunSettings | None = None
        self._said: set[str] = set()

    # --- messages ---------------------------------------------------------------------

    def say_once(self, message: str) -> None:
        if message not in self._said:
            self._said.add(message)
            console(message)

    # --- generation lifetime ----------------------------------------------------------

    def reset(self) -> None:
        """Drop every trace of HyCa: session, gates, stats. Safe to call at any time."""
        self.session, self.pass_key, self.noted_sigma, self.chosen = None, None, None, None
        self.passes, self.batch_key, self.reported, self.run_settings = [], None, 0, None
        for module in self.gated:
            gates.remove_all(module)
        self.gated = []

    def finish_pass(self) -> None:
        if isinstance(self.session, PassSession):
            stats = self.session.stats()
            if stats.steps.total or stats.stopped is not None:  # a pass HyCa gave up at its first call says so too
                stats.interrupted = _interruption(stats.steps.total, self.session.total_steps)
                self.passes.append((self.session.label, stats))
        self.session, self.pass_key = None, None

    def start_pass(self, p: Any, settings: Settings, hires: bool | None = None) -> bool:
        """Set up HyCa for the sampling pass about to run; ``True`` when it is on. Never
        raises. ``hires``: whether this is the hires pass (default: ``p.is_hr_pass``)."""
        try:
            return self._start_pass(p, settings, bool(getattr(p, "is_hr_pass", False)) if hires is None else hires)
        except Exception as error:  # noqa: BLE001 - never break the host UI
            self.session = None
            self.say_once(f"could not start ({type(error).__name__}: {error}); its passes run uncached")
            if hasattr(p, "extra_generation_params"):  # the settings keys say what was asked; this, what ran
                p.extra_generation_params[ERROR_KEY] = f"{type(error).__name__}, this pass ran uncached"
            return False

    def _start_pass(self, p: Any, settings: Settings, hires: bool) -> bool:
        key = (id(p), getattr(p, "iteration", 0), hires)
        frontend, unet, model = diffusion_model_of(p)
        if self.session is not None and key == self.pass_key and not (self.session.calls_computed or self.session.calls_forecast):
            if frontend == "forge":  # hires calls this twice, either side of a unet reset
                self._patch_unet(p, unet, self.session_adapter)
            return True
        self.finish_pass()
        if key[:2] != self.batch_key:
            self.passes, self.reported, self.batch_key = [], 0, key[:2]  # a new batch: its own infotext
            if hasattr(p, "extra_generation_params"):  # one dict serves every batch: the last one's results go
                for name in RESULT_KEYS:
                    p.extra_generation_params.pop(name, None)
        if not settings.enabled:
            return False
        if hires and not settings.hires:
            if key != self.hires_off_said:  # (Forge starts the hires pass twice, either side of a unet reset)
                self.hires_off_said = key
                console("off for the hires pass (as set)")
            return False
        adapter = recognise(model)
        if adapter is None:
            self.say_once(f"{type(model).__name__} is not supported, left untouched "
                          f"(supported: {', '.join(supported())})")
            return False
        lora_key = lora_identity(p)
        chosen = self.book.choose(model, adapter, settings.profile, settings.hub_repo, settings.interval,
                                  lora_key, settings.lora_reuse)
        for note in chosen.notes:
            self.say_once(note)
        self.renoising = renoising(getattr(p, "sampler_name", None))
        chosen = for_sampler(chosen, adapter, model, self.renoising, self.say_once)
        ran = AUTOMATIC if chosen.source == AUTOMATIC else menu_label(settings.profile)
        if ran != settings.profile and hasattr(p, "extra_generation_params"):
            p.extra_generation_params[INFOTEXT_KEYS["profile"]] = ran  # what ran: pasting it back asks for that
        if settings.speedup:
            settings = self._interval_for_target(p, settings, hires)
        schedule = Schedule(interval=settings.interval, warmup=settings.warmup, compute_last=settings.compute_last)
        if chosen.profile is None and (all(schedule.plan(pass_steps(p, hires))) or replaces_noise(self.renoising)):
            # nothing forecast (the schedule, or a sampler that replaces the noise): no probe
            chosen = (nothing_forecast(adapter, model, "the sampler replaces the noise every step")
                      if replaces_noise(self.renoising) else nothing_forecast(adapter, model))
        label = "hires pass" if hires else "pass"
        self.chosen, self.noted_sigma, self.run_settings = chosen, None, None
        guidance = probe.guidance_of(getattr(p, "cfg_scale", None))
        if chosen.profile is None:  # settled at the first model call, for this pass's settings
            self.session = probe.PendingPass(chosen, settings, schedule, label, lambda: pass_sigmas(p, hires), guidance,
                                       adapter, model)
        else:
            self.session = self._open(chosen, settings, schedule, label, lambda: pass_sigmas(p, hires), guidance,
                                      head=adapter.head_module(model) is not None)
        self.pass_key, self.session_adapter = key, adapter
        self.say_once(f"{adapter.name}: hooked through "
                      f"{'block replace patches' if adapter.style == 'replace' else 'block wrappers'}")
        # the output head is hooked where its profile may forecast it (a pending one may be probed so)
        self._gate_blocks(model, adapter, chosen.profile is None or target_of(chosen.profile.metadata) == OUTPUT)
        if frontend == "forge":
            self._patch_unet(p, unet, adapter)
        else:
            self._gate_calls(model, int(getattr(p, "batch_size", 1) or 1))
        return True

    def _open(self, chosen: Chosen, settings: Settings, schedule: Schedule, label: str, sigmas: Any,
              guidance: float | None, pass_sigmas_: list[float] | None = None, head: bool = False) -> PassSession:
        """The pass's session with ``chosen``'s profile. ``sigmas``: the schedule the session
        walks (a list, or a callable asked at the first call); ``pass_sigmas_``: the whole
        pass's, when the session starts part-way (its settings are the whole pass's); ``head``:
        the model's output head is known (output-head profiles are accepted)."""
        # the pass's settings are compared with the profile's here, with the real guidance scale
        require_target(chosen.profile.metadata, applied_targets(head), "the WebUI extension")
        engine = HybridCache(chosen.profile, schedule, cache_dtype=torch_dtype(settings.cache_dtype),
                             guard=None if settings.guard else False, compare_settings=False,
                             log_notes=False)  # the pass's report says its notes on the console
        return PassSession(engine, sigmas, label, on_schedule=lambda walked: self._note_settings(
            chosen, settings, pass_sigmas_ if pass_sigmas_ is not None else walked, guidance, engine))

    def _settle(self, pending: probe.PendingPass, x: torch.Tensor, t: Any, sigma: Any, hint: Any,
                conditioning: dict[str, Any], model_call: Callable[[torch.Tensor, torch.Tensor, dict], Any],
                output: str) -> PassSession | None:
        """The first model calls of a pending pass: gather the branches' conditioning; once
        the probe has what it needs, find or probe the profile for the pass's settings and
        open the pass's session from this call on. None: this call runs as it is (still
        gathering, or no profile: the pass runs uncached, as said on the console)."""
        guided = pending.guidance is not None and pending.guidance > 1.0
        here = probe.branches_in_call(x, hint, conditioning, guided)
        needed = {"cond", "uncond"} if guided else {"cond"}
        sigma_now = float(torch.as_tensor(sigma).flatten()[0])
        if pending.gathered_at is None and not needed <= set(pending.conditioning) and not needed <= set(here):
            # split calls: the branches are gathered over this step's calls, which run uncached; the
            # session opens at the next step
            pending.gathered_at = sigma_now
        for branch, found in here.items():
            pending.conditioning.setdefault(branch, found)
        same_step = pending.gathered_at is not None and \
            abs(sigma_now - pending.gathered_at) <= 1e-5 * max(1.0, abs(sigma_now))
        if not needed <= set(pending.conditioning) and pending.gathered_at is not None and not same_step:
            self.session = None  # a whole step went by without a call telling the uncond branch apart
            console(f"cannot probe with guidance: this {pending.label}'s model calls do not tell cond from uncond; "
                    "it runs uncached (choose a profile file or a solver in the HyCa menu)")
            return None
        if not needed <= set(pending.conditioning) or same_step:
            return None
        sigmas = pending.sigmas()
        if not sigmas:
            self.session = None
            console(f"cannot probe: the frontend does not tell this {pending.label}'s sigmas; it runs uncached")
            return None
        place = step_of(sigma_now, sigmas)
        if place is None or place[1] != 0.0:
            return None  # a midpoint call (DPM2): wait for a call on the schedule
        try:  # a profile this pass cannot run (another target, from the cache or the Hub) is refused too
            chosen = for_sampler(self._probe_for(pending, x, t, sigma_now, sigmas, model_call, output),
                                 pending.adapter, pending.model, self.renoising, self.say_once)
            session = self._open(chosen, pending.settings, pending.schedule, pending.label, sigmas[place[0]:],
                                 pending.guidance, sigmas, pending.adapter.head_module(pending.model) is not None)
        except probe.ProbeInterrupted:  # the sampler stops at its next call, as it would have without HyCa
            self.session = None
            how = probe.stopped_by_user() or "Interrupt"
            console(f"probe stopped: the generation was {'skipped' if how == 'Skip' else 'interrupted'}; nothing was "
                    f"saved, this {pending.label} runs uncached until the frontend stops it, and the next generation "
                    "probes again")
            stopped = PassStats(interrupted=f"{how} during the probe, before any step was cached")
            self.passes.append((pending.label, stopped))  # the image's infotext says so too
            return None
        except Exception as error:  # noqa: BLE001 - no profile: this pass runs uncached, the next one tries again
            self.session = None
            console(f"could not settle a profile ({type(error).__name__}: {error}); this {pending.label} runs uncached")
            return None
        self.chosen = chosen
        if place[0]:
            console(f"the {pending.label} is cached from step {place[0] + 1} (its first calls carried one guidance "
                    "branch each and ran uncached while the probe gathered both)")
        self.session = session
        return session

    def _probe_for(self, pending: probe.PendingPass, x: torch.Tensor, t: Any, sigma: float, sigmas: list[float],
                   model_call: Callable[[torch.Tensor, torch.Tensor, dict], Any], output: str) -> Chosen:
        """The profile for the pending pass's settings: the book's, or a probe on this pass."""
        settings = pending.settings
        run = RunSettings(steps=len(sigmas) - 1, guidance_scale=pending.guidance, sigmas=tuple(sigmas),
                          interval=settings.interval, warmup=settings.warmup, compute_last=settings.compute_last,
                          positions="step")
        latent = probe.probe_shape(tuple(x.shape), pending.conditioning["cond"])
        t_value = float(torch.as_tensor(t).flatten()[0])
        fp = pending.chosen.fp or fingerprint(pending.model, pending.adapter)

        def open_session(engine: Any, walked: list[float]) -> Any:
            self.session = PassSession(engine, walked, "probe") if engine is not None else pending
            return self.session

        def run_probe() -> Any:
            console(f"probing {pending.adapter.name} for this {pending.label}'s settings ({run.describe()}) on its "
                    f"own conditioning ({probe.PROBE_SAMPLES} samples), latent {'x'.join(map(str, latent))}: the "
                    "closed loop runs every candidate")
            host = probe.WebUIHost(model_call, output, t_value / sigma if sigma else 1.0,
                                   {b: pending.conditioning[b] for b in ("cond", "uncond") if b in pending.conditioning},
                                   sigmas, pending.guidance, latent, x.dtype, x.device, open_session,
                                   len(pending.adapter.blocks(pending.model)), int(fp["hidden_size"]),
                                   output_head=pending.adapter.head_module(pending.model) is not None)
            try:
                return probe.run_probe(host, run, pending.schedule, settings.guard, fp, probe.progress_bar)
            finally:
                self.session = pending

        head = pending.adapter.head_module(pending.model) is not None
        chosen = self.book.for_settings(pending.chosen, run, latent, run_probe, applied_targets(head), self.say_once,
                                        output_channels=int(x.shape[1]))
        for note in chosen.notes:  # said as they happened, unless this session settled them earlier
            self.say_once(note)
        self.say_once(f"profile ready ({chosen.source})")
        return chosen

    def _note_settings(self, chosen: Chosen, settings: Settings, sigmas: list[float] | None, guidance: Any,
                       engine: Any = None) -> None:
        """The pass's schedule is known: what it runs with (a probing pass writes it into
        its profile), and, for a profile chosen for other settings, the path the pass takes
        (:mod:`hyca.profiles.off_settings`, said once)."""
        try:
            guidance_scale = float(guidance) if guidance is not None else None
        except (TypeError, ValueError):
            guidance_scale = None
        self.run_settings = RunSettings(
            steps=len(sigmas) - 1 if sigmas else None, guidance_scale=guidance_scale,
            sigmas=tuple(sigmas) if sigmas else None, interval=settings.interval, warmup=settings.warmup,
            compute_last=settings.compute_last, positions="step")
        if chosen.profile is None or not isinstance(engine, HybridCache):
            return
        # the engine decides the path and carries it in the pass's stats (console, infotext)
        off = expect_renoising(engine, self.run_settings, self.renoising)
        if off is not None:
            self.say_once(off.describe())  # the same sentence as the stats note: said once

    def _interval_for_target(self, p: Any, settings: Settings, hires: bool) -> Settings:
        """The N that gives the pass ``settings.speedup`` times fewer block passes (with the
        warm-up as set), from the pass's own step count; said once per distinct choice."""
        steps = pass_steps(p, hires)
        interval, reached = interval_for_speedup(steps, settings.warmup, settings.speedup, settings.compute_last)
        reach = "" if reached >= settings.speedup else f" (the most this pass allows: {reached:.2f}x)"
        self.say_once(f"target speed-up {settings.speedup:g}x over {steps} steps: N={interval}, "
                      f"{reached:.2f}x fewer block passes{reach}")
        return dataclasses.replace(settings, interval=interval)

    # --- hooking ----------------------------------------------------------------------

    def current(self) -> PassSession | None:
        return self.session

    def _gate_blocks(self, model: torch.nn.Module, adapter: Adapter, head: bool) -> None:
        """Wrap the blocks (style "gate") and, with ``head``, the output head (if the adapter has one)."""
        for index, (spec, _, block) in enumerate(adapter.blocks(model) if adapter.style == "gate" else ()):
            gates.install(block, kinds.GATES[spec.layout](self.current, index, block))
        module = adapter.head_module(model) if head else None
        if module is not None:
            gates.install(module, kinds.gate_head(self.current))
        elif head and adapter.head is not None:  # a frontend version that renamed its final layer
            self.say_once(f"{adapter.name}: no output head at {adapter.head}; output-head profiles are not offered")
        if model not in self.gated:
            self.gated.append(model)

    def _gate_calls(self, model: torch.nn.Module, images: int) -> None:
        """A1111: the model's own forward opens each call; a call of ``2 * images`` rows
        carries the cond rows, then the uncond ones (``CFGDenoiser``, at any CFG scale)."""

        def call_gate(original, x, t, *args, **kwargs):
            session = self.session
            if session is None:
                return original(x, t, *args, **kwargs)
            sigma = self.noted_sigma if self.noted_sigma is not None else t
            if isinstance(session, probe.PendingPass):  # A1111's MMDiT returns the flow-matching velocity
                session = self._settle(session, x, t, sigma, None, {"args": args, "kwargs": kwargs},
                                       lambda x2, t2, c: original(x2, t2, *c["args"], **c["kwargs"]), "velocity")
                if session is None:
                    return original(x, t, *args, **kwargs)
            session.halves_of = images
            return session.run_call(x, sigma, None, lambda: original(x, t, *args, **kwargs), "velocity")

        gates.install(model, call_gate)
        if model not in self.gated:
            self.gated.append(model)

    def _patch_unet(self, p: Any, unet: Any, adapter: Adapter) -> None:
        options = getattr(unet, "model_options", {}) or {}
        if getattr(options.get("model_function_wrapper"), "_hyca", False):
            return
        clone = unet.clone()
        previous = clone.model_options.get("model_function_wrapper")

        def wrapper(model_function, kw):
            def ours(x, t, **c):
                session = self.session
                if session is None:
                    return model_function(x, t, **c)
                hint = (c.get("transformer_options") or {}).get("cond_or_uncond", kw.get("cond_or_uncond"))
                hint = tuple(hint) if hint is not None else None
                if isinstance(session, probe.PendingPass):  # apply_model returns the denoised latent
                    session = self._settle(session, x, t, t, hint, c, lambda x2, t2, c2: model_function(x2, t2, **c2),
                                           "denoised")
                    if session is None:
                        return model_function(x, t, **c)
                return session.run_call(x, t, hint, lambda: model_function(x, t, **c), "denoised")

            if previous is not None:  # another extension's wrapper stays in charge of the call
                return previous(ours, kw)
            return ours(kw["input"], kw["timestep"], **kw["c"])

        wrapper._hyca = True  # type: ignore[attr-defined]
        clone.set_model_unet_function_wrapper(wrapper)
        if adapter.style == "replace":
            model = clone.model.diffusion_model
            replace = clone.model_options.setdefault("transformer_options", {}).get("patches_replace", {}).get("dit", {})
            for index, (spec, i, _) in enumerate(adapter.blocks(model)):
                existing = replace.get((spec.dit_key, i))
                clone.set_model_patch_replace(kinds.PATCHES[spec.layout](self.current, index, existing), "dit",
                                              spec.dit_key, i)
        p.sd_model.forge_objects.unet = clone

    # --- results ----------------------------------------------------------------------

    def results(self) -> dict[str, str]:
        """Infotext entries for the passes run since the batch began (keys: :data:`RESULT_KEYS`)."""
        return infotext(self.passes, self.chosen.lora_ari if self.chosen is not None else None)

    def report(self) -> None:
        """Console lines for the passes not reported yet."""
        fresh, self.reported = self.passes[self.reported:], len(self.passes)
        for label, stats in fresh:
            stopped = "; HyCa stopped caching there, the rest ran uncached" if stats.stopped is not None else ""
            ran = (f"stopped by {stats.interrupted}: {stats.steps.computed} computed"
                   if stats.interrupted is not None else f"{stats.steps.computed} of {stats.steps.total} steps computed")
            console(f"{label}: {ran}, {stats.steps.forecast} forecast{stopped}; "
                    f"{stats.flops_saving:.0%} of block compute skipped")
            if stats.switches:
                console(f"{label}: the guard switched {stats.describe_switches()}")
            for note in stats.notes:
                self.say_once(note)


def _interruption(seen: int, planned: int | None) -> str | None:
    """``"Interrupt after 6 of 10 steps"`` when the user's Interrupt or Skip cut the pass
    short (its steps seen fewer than planned, or the plan unknown); None otherwise."""
    how = probe.stopped_by_user()
    if how is None or (planned is not None and seen >= planned):
        return None
    return f"{how} after {seen} of {planned} steps" if planned is not None else f"{how} after {seen} steps"


CONTROLLER = Controller()
