"""The probe on a diffusers pipeline: one fully computed low-resolution run -> a
:class:`~hyca.profiles.Profile`.

Record (sketches of every block's residual, through HyCa's own hooks), then analyse:
indicators -> k-means labels -> per-cluster solver with the least error when the run is
replayed under the schedule the profile is for. HyCa's caching hooks, if enabled on the
transformer, are set aside for the run and put back afterwards; the recording hooks are
removed whatever happens, so the model computes exactly as before.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import operator
import time
from typing import Any, Callable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from ...engine.cache import HybridCache
from ...engine.schedule import Schedule
from ...math.solvers import POOL_VERSION, Solver
from ...probing import closed_loop
from ...probing.analysis import analyse, assign, candidate_solvers
from ...probing.recorder import SketchRecorder
from ...profiles.profile import Profile
from ...profiles.settings import RunSettings
from . import hooks
from .families import blocks_of, family_of, head_of
from .fingerprint import fingerprint
from .settings import guidance_of, schedule_shift

DEFAULT_PROMPT = "a photo of a cat"
CLOSED_LOOP, EQ5 = "closed-loop", "eq5"
#: How the probe chooses: validated on cached runs of its own prompt (default), or eq. 5 alone.
SELECTIONS = (CLOSED_LOOP, EQ5)

logger = logging.getLogger("hyca")


@contextlib.contextmanager
def _hooked(transformer: torch.nn.Module, engine: Any, steps: int) -> Iterator[Any]:
    """Hook ``engine`` (a :class:`SketchRecorder` or a :class:`HybridCache`) in place of
    HyCa's own for the duration; HyCa's hooks, if enabled, are restored afterwards with the
    same engine and settings."""
    if getattr(transformer, "is_cache_enabled", False):
        raise RuntimeError(f"{type(transformer).__name__} has a diffusers cache enabled; the probe needs "
                           "every step computed: call transformer.disable_cache() first")
    family = family_of(transformer)
    blocks = blocks_of(transformer, family)
    previous = hooks.root_hook(transformer)
    if previous is not None and isinstance(previous.engine, SketchRecorder):
        previous = None  # left over from a probe that could not clean up: do not restore it
    hooks.unregister(transformer)
    try:
        hooks.register(transformer, blocks, engine, family, lambda *_: steps)
        yield hooks.root_hook(transformer)
    finally:
        hooks.unregister(transformer)
        if previous is not None:
            hooks.register(transformer, blocks, previous.engine, previous.family, previous.total_steps)


@contextlib.contextmanager
def recording(transformer: torch.nn.Module, recorder: SketchRecorder) -> Iterator[None]:
    """Hook ``recorder`` in place of HyCa's engine for the duration (see :func:`_hooked`)."""
    with _hooked(transformer, recorder, recorder.steps) as hook:
        recorder.states = hook.states
        yield


def output_tensor(output: Any) -> torch.Tensor | None:
    """The final sample a run returned, as a float tensor: a tensor; a diffusers output's
    ``images`` / ``frames`` (tensor, array, or list of PIL images / arrays); the first item
    of a tuple. ``None`` when there is nothing to compare (a run that returns nothing)."""
    if output is None:
        return None
    if isinstance(output, torch.Tensor):
        return output.detach().float().cpu()
    for name in ("images", "frames"):
        if hasattr(output, name):
            return output_tensor(getattr(output, name))
    if isinstance(output, tuple) and output:
        return output_tensor(output[0])
    if isinstance(output, list) and output:
        return torch.stack([output_tensor(item) for item in output])
    try:
        import numpy as np

        return torch.from_numpy(np.asarray(output, dtype=np.float32))
    except (TypeError, ValueError):
        return None


def probe_transformer(
    transformer: torch.nn.Module,
    run: Callable[[], Any],
    steps: int,
    interval: int = 5,
    warmup: int = 3,
    compute_last: bool = True,
    positions: str = "step",
    clusters: int = 4,
    shared: bool = False,
    seed: int = 0,
    rows: int = 8,
    spectral_rows: int | None = 2,
    n_init: int = 1,
    candidates: Sequence[str] | None = None,
    branch: str = "cond",
    progress: bool = True,
    settings: dict[str, Any] | None = None,
    accumulate_on: str | torch.device | None = "cpu",
    guidance_scale: float | None = None,
    selection: str = CLOSED_LOOP,
    guard: bool = True,
    chosen_for: RunSettings | None = None,
    on_progress: Callable[[float, str], None] | None = None,
    target: str | None = None,
) -> Profile:
    """Probe ``transformer`` while ``run()`` makes one fully computed generation of
    ``steps`` transformer calls per branch (a hand-written sampling loop, a frontend's
    sampler). The profile is chosen for ``interval``/``warmup``/``compute_last`` and the
    ``positions`` axis, as :func:`hyca.enable` will use them; ``clusters`` per block (or
    shared by all blocks), k-means seeded by ``seed``; sketches of ``rows`` rows (the
    spectral indicators use the first ``spectral_rows``). ``settings``: extra facts for the
    metadata's ``probe`` entry (prompt, resolution, ...). ``accumulate_on``: where the
    recording's running sums live, ``"cpu"`` or None for the residuals' device.

    ``candidates``: the solvers to choose from (default: the whole pool), both per cluster
    and as single-solver candidates of the closed loop.
    ``guidance_scale``: the run's classifier-free guidance scale; above 1 both branches
    are recorded and eq. 5 scores the guided output (:mod:`hyca.probing.recorder`).
    ``selection``: ``"closed-loop"`` (default) re-runs ``run()`` with HyCa on for each
    candidate assignment and keeps the one whose final output is nearest the fully computed
    one (:mod:`hyca.probing.closed_loop`; ``run`` must return that output, the same on
    every call, e.g. from a fixed seed) -- with ``guard`` as it will run; ``"eq5"``: the
    paper's open-loop choice alone. ``chosen_for``: the run settings the profile is for
    (stored as its ``chosen_for``; N, warm-up, last step, axis, steps and guidance are
    filled in from the arguments). ``on_progress(fraction, description)``: called after each
    recorded step and each closed-loop run (an app's progress bar). ``target``: what the
    profile may forecast: None (the closed loop chooses), ``"residual"`` (the blocks'
    residuals, the paper's), or ``"output"`` (the output head's input; closed loop only).
    Profiles to be compared by their clustering (a LoRA's against its base model's) must
    share a target."""
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    if target not in (None, "residual", "output"):
        raise ValueError(f"target must be None, 'residual' or 'output', got {target!r}")
    if target == "output" and (selection != CLOSED_LOOP or head_of(transformer, family_of(transformer)) is None):
        raise ValueError("target='output' needs selection='closed-loop' and a model whose family offers an output "
                         "head (hyca.adapters.diffusers.families)")
    schedule = Schedule(interval=interval, warmup=warmup, compute_last=compute_last)
    family = family_of(transformer)
    blocks = blocks_of(transformer, family)
    timing: dict[str, float] = {}
    closing = selection == CLOSED_LOOP
    short = schedule.short_start(steps) if closing else None  # the other start the closed loop tries
    with tqdm(total=steps, desc="HyCa probe", unit="step", disable=not progress) as bar:
        recorder = SketchRecorder(len(blocks), steps, schedule, positions, rows, spectral_rows, seed, branch,
                                  candidate_solvers(candidates), _Progress(bar, on_progress, steps, closing),
                                  accumulate_on, guidance_scale=guidance_scale, batched_guidance=family.batched_guidance,
                                  other_schedules=(short,) if short is not None else ())
        started = time.perf_counter()
        with recording(transformer, recorder):
            reference = output_tensor(run())
        recorded = time.perf_counter()
        indicator_values, replay = recorder.finish()
        profile, report = analyse(indicator_values, replay, clusters, shared, seed, n_init)
        analysed = time.perf_counter()
        timing = {"record_s": round(recorded - started, 3), "analysis_s": round(analysed - recorded, 3)}
    report["branches"] = sorted(recorder.branches_seen)
    if selection == CLOSED_LOOP and reference is None:
        logger.warning("HyCa probe: the run returned no output to compare, so the choice is eq. 5's alone "
                       "(open loop); return the final latent from run() for a closed-loop choice")
        report["closed_loop"] = {"skipped": "the run returned no output"}
    elif selection == CLOSED_LOOP:
        tracks = [closed_loop.Track("", profile)]
        if short is not None:
            tracks.append(_start_track(profile.labels, recorder, short, clusters, shared, {}))
        if target != "residual" and head_of(transformer, family) is not None:  # its own recording
            started = time.perf_counter()
            head = SketchRecorder(1, steps, schedule, positions, rows, spectral_rows, seed, branch,
                                  candidate_solvers(candidates), None, accumulate_on, guidance_scale=guidance_scale,
                                  batched_guidance=family.batched_guidance,
                                  other_schedules=(short,) if short is not None else ())
            head.target = "output"
            with recording(transformer, head):
                run()
            head_values, head_replay = head.finish()
            head_profile, head_report = analyse(head_values, head_replay, clusters, shared, seed, n_init)
            tracks.append(closed_loop.Track("output:", closed_loop.with_metadata(head_profile, target="output"),
                                            closed_loop.OTHER_TRACK_SINGLES))
            if short is not None:
                tracks.append(_start_track(head_profile.labels, head, short, clusters, shared, {"target": "output"}))
            if target == "output":  # the residual tracks are left out; the first track tries every single solver
                tracks = [closed_loop.Track(t.prefix, t.eq5, None if i == 0 else t.singles)
                          for i, t in enumerate(t for t in tracks if t.eq5.metadata.get("target") == "output")]
            timing["record_output_s"] = round(time.perf_counter() - started, 3)
        profile, report["closed_loop"], seconds = _closed_loop(transformer, run, steps, schedule, positions, guard,
                                                                tracks, reference, progress,
                                                                candidate_solvers(candidates), on_progress)
        timing["closed_loop_s"] = round(seconds, 3)
        if profile.metadata.get("target") == "output":  # the eq. 5 report that describes the chosen profile
            report = {**report, **{k: v for k, v in head_report.items() if k != "branches"},
                      "residual_eq5": {k: report[k] for k in ("blocks", "replay_error")}}
    first_interval, target = profile.metadata.get("first_interval"), profile.metadata.get("target")
    settings_for = (chosen_for or RunSettings()).merged(RunSettings(
        steps=steps, guidance_scale=guidance_scale if guidance_scale is not None else None, interval=interval,
        warmup=warmup, compute_last=compute_last, positions=positions))
    profile.metadata = {
        "method": "hyca",
        "fingerprint": fingerprint(transformer),
        "interval": interval,
        "warmup": warmup,
        "compute_last": compute_last,
        "positions": positions,
        **({"first_interval": first_interval} if first_interval is not None else {}),
        **({"target": target} if target is not None else {}),
        "chosen_for": settings_for.to_json(),
        "probe": {**(settings or {}), "steps": steps, "clusters": clusters, "shared": shared, "seed": seed,
                  "rows": rows, "spectral_rows": spectral_rows, "n_init": n_init, "branch": branch,
                  "selection": selection, "guard": guard},
        "pool_version": POOL_VERSION,
        "hyca_version": _version(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "selection": report,
        "timing": timing,
    }
    return profile


class _Progress:
    """The recorder's progress: the tqdm bar, and ``on_progress`` for the recording's share."""

    SHARE = 0.3  # of the whole probe, when closed-loop runs follow the recording

    def __init__(self, bar: Any, on_progress: Callable[[float, str], None] | None, steps: int, closing: bool) -> None:
        self.bar, self.on_progress, self.steps, self.done = bar, on_progress, steps, 0
        self.share = self.SHARE if closing else 1.0

    def update(self, n: int) -> None:
        self.bar.update(n)
        self.done += n
        if self.on_progress is not None:
            self.on_progress(self.share * self.done / self.steps, f"probe: step {self.done}/{self.steps}")


def _start_track(labels: torch.Tensor, recorder: SketchRecorder, short: Schedule, clusters: int, shared: bool,
                 metadata: dict[str, Any]) -> "closed_loop.Track":
    """Eq. 5 replayed on the short-start schedule, for the clustering ``labels``."""
    profile = assign(labels, recorder.other_replays()[0], clusters, shared)
    prefix = ("output," if metadata.get("target") == "output" else "") + f"start{short.first_interval}:"
    return closed_loop.Track(prefix, closed_loop.with_metadata(profile, first_interval=short.first_interval, **metadata),
                             closed_loop.OTHER_TRACK_SINGLES)


def _closed_loop(transformer: torch.nn.Module, run: Callable[[], Any], steps: int, schedule: Schedule,
                 positions: str, guard: bool, tracks: list["closed_loop.Track"], reference: torch.Tensor,
                 progress: bool, solvers: Sequence[Solver], on_progress: Callable[[float, str], None] | None = None,
                 ) -> tuple[Profile, dict[str, Any], float]:
    """:func:`hyca.probing.closed_loop.choose` with cached runs of ``run`` on ``transformer``."""

    def generate(candidate: Profile) -> torch.Tensor:
        start = schedule.with_first_interval(candidate.metadata.get("first_interval"))
        engine = HybridCache(candidate, start, positions, guard=guard)
        with _hooked(transformer, engine, steps):
            return output_tensor(run())

    started = time.perf_counter()
    # per track: eq. 5, its single solvers, refinements at most (one per solver group)
    expected = sum(1 + (len(solvers) if t.singles is None else t.singles) + len(torch.unique(t.eq5.solvers))
                   for t in tracks)
    with tqdm(desc="HyCa probe: closed-loop runs", unit="run", disable=not progress) as bar:
        def tick(_: Any) -> None:
            bar.update(1)
            if on_progress is not None:
                done = min(bar.n, expected)
                on_progress(_Progress.SHARE + (1 - _Progress.SHARE) * done / expected,
                            f"probe: closed-loop run {bar.n} (of at most {expected})")

        chosen, trials, winner = closed_loop.choose(tracks, generate, reference, solvers, on_trial=tick)
    seconds = time.perf_counter() - started
    logger.info("HyCa probe: closed loop chose %s (%s) after %d cached runs in %.1f s", winner,
                ", ".join(f"{t.name} {t.fidelity_db:.1f} dB" for t in trials), len(trials), seconds)
    return chosen, {"chosen": winner, "trials": [t.to_json() for t in trials]}, seconds


def _version() -> str:
    from ... import __version__

    return __version__


@contextlib.contextmanager
def _quiet(pipe: Any) -> Iterator[None]:
    """The pipeline's own progress bar off (the probe shows one), as it was afterwards."""
    missing = object()
    saved = getattr(pipe, "_progress_bar_config", missing)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    try:
        yield
    finally:
        if saved is missing:
            pipe.__dict__.pop("_progress_bar_config", None)
        else:
            pipe._progress_bar_config = saved


def _pixels(name: str, value: Any) -> int:
    """A positive whole number of pixels (numpy integers too), else ``ValueError``."""
    try:
        pixels = operator.index(value) if not isinstance(value, bool) else 0
    except TypeError:
        pixels = 0
    if pixels < 1:
        raise ValueError(f"{name} must be a positive number of pixels, got {value!r}")
    return pixels


def probe(
    pipe: Any,
    prompt: str | list[str] | None = None,
    height: int | None = None,
    width: int | None = None,
    steps: int = 28,
    interval: int = 5,
    warmup: int = 3,
    positions: str = "step",
    clusters: int = 4,
    shared: bool = False,
    seed: int = 0,
    progress: bool = True,
    **options: Any,
) -> Profile:
    """Probe a diffusers pipeline: one fully computed ``height`` x ``width`` generation of
    ``prompt`` in ``steps`` steps (latents only, no decoding), recorded and analysed into
    a :class:`Profile` for ``hyca.enable(pipe, profile, interval=interval, warmup=warmup,
    positions=positions)``; then, by default, the choice is validated closed loop: a
    cached run of the same prompt and seed per candidate assignment (every single solver
    of the pool, eq. 5's, and refinements), the nearest to full compute kept
    (:mod:`hyca.probing.closed_loop`). Run it at the settings you sample with: step count,
    guidance (``guidance_scale`` / ``true_cfg_scale`` with a ``negative_prompt``), N,
    warm-up; the profile records them (``chosen_for``) and ``hyca.enable`` prefers a
    profile made for the run's settings.

    Defaults: ``prompt`` "a photo of a cat" at 256 x 256, latent output, unless the
    pipeline names its own in a ``hyca_probe_defaults`` dict (the shipped reference model
    does: captions it knows, its 32 x 32 pixels).

    ``options``: settings of :func:`probe_transformer` (``compute_last``, ``rows``,
    ``spectral_rows``, ``n_init``, ``candidates``, ``branch``, ``accumulate_on``,
    ``selection``, ``guard``, ``target``, ``on_progress``); everything else goes to the
    pipeline call (e.g. ``guidance_scale``, or ``prompt_embeds`` instead of a prompt).
    """
    own = dict(getattr(pipe, "hyca_probe_defaults", None) or {})
    given = {"prompt": prompt, "height": height, "width": width}
    fallback = {"prompt": DEFAULT_PROMPT, "height": 256, "width": 256}
    prompt, height, width = (v if v is not None else own.get(k, fallback[k]) for k, v in given.items())
    height, width = (_pixels(name, value) for name, value in (("height", height), ("width", width)))
    options = {**{k: v for k, v in own.items() if k not in given}, **options}
    probe_keys = ("compute_last", "rows", "spectral_rows", "n_init", "candidates", "branch", "accumulate_on",
                  "selection", "guard", "on_progress", "target")
    probe_options = {k: options.pop(k) for k in probe_keys if k in options}
    call = {"output_type": "latent", **options}
    if "prompt_embeds" not in call:
        call["prompt"] = prompt
    transformer = getattr(pipe, "transformer", None)
    if not isinstance(transformer, torch.nn.Module):
        raise TypeError(f"{type(pipe).__name__} has no transformer to probe; for a bare transformer and "
                        "your own sampling loop use hyca.adapters.diffusers.probe.probe_transformer")
    settings = {"prompt": prompt if "prompt_embeds" not in call else None, "height": height, "width": width}
    guidance = guidance_of(pipe, call)
    if guidance is not None:
        settings["guidance_scale"] = guidance
    sigmas = call.get("sigmas")
    chosen_for = RunSettings(steps=steps, guidance_scale=guidance, shift=schedule_shift(getattr(pipe, "scheduler", None)),
                             sigmas=tuple(float(s) for s in sigmas) if sigmas is not None else None)

    def run() -> Any:
        generator = torch.Generator().manual_seed(seed)
        return pipe(height=height, width=width, num_inference_steps=steps, generator=generator, **call)

    with _quiet(pipe):
        return probe_transformer(transformer, run, steps, interval=interval, warmup=warmup, positions=positions,
                                 clusters=clusters, shared=shared, seed=seed, progress=progress,
                                 settings=settings, guidance_scale=guidance, chosen_for=chosen_for,
                                 **probe_options)
