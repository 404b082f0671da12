"""The closed-loop probe, for any host: one recorded fully computed run -> a
:class:`~hyca.profiles.Profile` chosen by running its candidates.

:func:`probe_host` asks a :class:`~hyca.probing.host.ProbeHost` for generations at the
probe's settings (its own conditioning, seed and sigmas) with an engine installed:

1. once with a :class:`~hyca.probing.recorder.SketchRecorder` (both guidance branches when
   the run is guided): indicators and replay errors -> k-means clusters -> eq. 5's
   per-cluster solvers (:func:`~hyca.probing.analysis.analyse`), on the schedule and on
   its short start;
2. when the host offers the model output (``model_output``), once more recording the
   model's output (:mod:`hyca.engine.targets`), analysed the same way; the output head's
   input (``output_head``) likewise, when asked for (``target="output"``) or where the host
   offers no model output (the head is a linear map away from it: :data:`_SUBSUMED_BY_MODEL_OUTPUT`);
3. the tracks of candidates (:mod:`hyca.probing.closed_loop`): each one run by
   ``host.sample(HybridCache(candidate, ...))``, the one nearest the recorded run kept.

Hosts: :mod:`hyca.adapters.diffusers.probe` (the pipeline call), the WebUI
(:mod:`hyca.adapters.webui.probe`: :func:`~hyca.probing.host.euler_sample` over the pass's
sigmas), the app, ComfyUI.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import numbers
import time
from dataclasses import replace
from typing import Any, Callable, Mapping, Sequence, TypedDict

import torch
from tqdm.auto import tqdm

from ..engine.cache import HybridCache
from ..engine.schedule import Schedule
from ..math.solvers import POOL_VERSION, Solver, get_solver
from ..profiles.profile import Profile
from ..profiles.settings import RunSettings
from . import closed_loop
from . import selection as picking
from .analysis import analyse, assign, candidate_solvers
from .host import ProbeHost
from .recorder import SketchRecorder

CLOSED_LOOP, EQ5 = "closed-loop", "eq5"
#: How the probe chooses: validated on cached runs of its own prompt (default), or eq. 5 alone.
SELECTIONS = (CLOSED_LOOP, EQ5)
TARGETS = (None, "residual", "output", "model_output")
#: Per target recorded besides the residuals: the host attribute that offers it, and the
#: prefix of its tracks' candidates.
_OTHER_TARGETS = {"output": ("output_head", "output"), "model_output": ("model_output", "model")}
_DESCRIBED = {"output": "the output head", "model_output": "the model output"}
#: Targets the closed loop leaves out unless asked for by name where the host offers the model
#: output: the output head is a linear map away from it (:attr:`hyca.adapters.diffusers.families.Family.head`),
#: so a solver (a linear extrapolator whose weights sum to one) forecasts the same image on
#: either, up to where the guard judges; its tracks cost one more recording and several runs.
#: What leaving them out measured: docs/bench.md (``python -m hyca.bench.selection_transfer``).
_SUBSUMED_BY_MODEL_OUTPUT = ("output",)
#: Solvers the model-output tracks always try: the strategies of peers that forecast the
#: model output (FORA-style reuse, diffusers' TaylorSeer lite orders 1 and 2).
MODEL_OUTPUT_SOLVERS = ("reuse", "taylor-1", "taylor-2")
#: Tried on the model output with TaylorSeer lite's schedule and the guard off too: lite's
#: own strategy exactly (it has no guard), so a guarded probe cannot lose to it on its run.
LITE_UNGUARDED = ("taylor-1", "taylor-2")
#: Single solvers the closed loop tries alone by default: the short-history ones (at most three
#: cached values, exact for lines: FORA's reuse, TaylorSeer 1 and 2, AM2, BDF2). Every
#: candidate the loop adds is one more chance for a calibration caption's noise to pick a
#: winner that does not carry over; on the settings grid, fewer candidates scored on more
#: captions carried over better (``python -m hyca.bench.selection_transfer``, rule "eq. 5 and
#: SINGLES", bench/results/selection_transfer.md). The longer-history solvers stay in eq. 5's pool,
#: chosen per cluster on the recorded trajectory.
SINGLES = ("reuse", "taylor-1", "taylor-2", "am2", "bdf2")
#: Calibration samples a host's default probe scores each candidate on (captions, or the
#: user's conditioning with that many noises). With two, one caption's noise could decide a
#: choice that the next caption does not share; four carried over better on the settings grid
#: (the same study as :data:`SINGLES`; fewer single candidates pay for most of the extra runs).
CALIBRATION_SAMPLES = 4

logger = logging.getLogger("hyca")


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


class ProbeOptions(TypedDict, total=False):
    """The probe's settings a host hands on unchanged (their meaning and defaults are
    :func:`probe_host`'s); a host's own probe function takes them as ``**options``."""

    positions: str
    clusters: int
    shared: bool
    seed: int
    rows: int
    spectral_rows: int | None
    n_init: int
    candidates: Sequence[str] | None
    singles: Sequence[str] | None
    branch: str
    accumulate_on: str | torch.device | None
    selection: str
    guard: bool
    progress: bool
    on_progress: Callable[[float, str], None] | None
    tolerance: str | float
    halving: bool
    refine: bool


def check_options(options: Mapping[str, Any]) -> None:
    """The probe's own options (:class:`ProbeOptions`) that can be told wrong before anything
    runs: ``ValueError`` saying what each expects (a host checks them when they are given, so
    a wrong one fails there rather than minutes later inside a probe)."""
    for name in ("candidates", "singles"):
        names = options.get(name)
        if names is None:
            continue
        if isinstance(names, str):
            raise ValueError(f"{name} must be a list of solver names, e.g. [{names!r}], not a string")
        if not isinstance(names, Sequence):
            raise ValueError(f"{name} must be a list of solver names, e.g. ['reuse', 'taylor-1'], got {names!r}")
        wrong = [n for n in names if not isinstance(n, str)]
        if wrong:
            raise ValueError(f"{name} must be solver names (strings), got {wrong[0]!r} among them")
    solvers = candidate_solvers(options.get("candidates"))
    _singles(solvers, options.get("singles"))
    tolerance = options.get("tolerance", TOLERANCE)
    if tolerance not in (picking.BEST, picking.STANDARD_ERROR) and not (
            isinstance(tolerance, numbers.Real) and not isinstance(tolerance, bool) and 0 <= tolerance < math.inf):
        raise ValueError(f"tolerance must be {picking.BEST!r}, {picking.STANDARD_ERROR!r} or a margin in dB >= 0, "
                         f"got {tolerance!r}")
    for name in ("halving", "refine", "shared", "guard"):
        if name in options and not isinstance(options[name], bool):
            raise ValueError(f"{name} must be True or False, got {options[name]!r}")
    for name, smallest in (("clusters", 1), ("rows", 1), ("n_init", 1), ("seed", 0)):
        value = options.get(name, smallest)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < smallest:
            raise ValueError(f"{name} must be an integer >= {smallest}, got {value!r}")
    spectral = options.get("spectral_rows")
    if spectral is not None and (isinstance(spectral, bool) or not isinstance(spectral, numbers.Integral)
                                 or spectral < 0):
        raise ValueError(f"spectral_rows must be None or an integer >= 0, got {spectral!r}")
    for name, allowed in (("selection", SELECTIONS), ("target", TARGETS), ("positions", ("step", "sigma"))):
        if name in options and options[name] not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {options[name]!r}")
    if "branch" in options and not (isinstance(options["branch"], str) and options["branch"]):
        raise ValueError(f"branch must be the cond branch's context name, e.g. 'cond', got {options['branch']!r}")
    if options.get("on_progress") is not None and not callable(options["on_progress"]):
        raise ValueError(f"on_progress must be a callable (fraction, text) or None, got {options['on_progress']!r}")
    where = options.get("accumulate_on")
    if where is not None:
        try:
            torch.device(where)
        except (RuntimeError, TypeError):
            raise ValueError(f"accumulate_on must be None or a torch device such as 'cpu', got {where!r}") from None


#: The closed loop's default rule: the best mean. The simplest-within-noise rules and halving
#: are opt-in: over the cells of bench/results/probe_cost.md they bought nothing on average
#: (the rules) or cost held-out quality (halving) against the probe as it was.
TOLERANCE = picking.BEST


def probe_host(
    host: ProbeHost,
    run: RunSettings,
    schedule: Schedule,
    *,
    positions: str = "step",
    clusters: int = 4,
    shared: bool = False,
    seed: int = 0,
    rows: int = 8,
    spectral_rows: int | None = 2,
    n_init: int = 1,
    candidates: Sequence[str] | None = None,
    singles: Sequence[str] | None = None,
    branch: str = "cond",
    accumulate_on: str | torch.device | None = "cpu",
    selection: str = CLOSED_LOOP,
    guard: bool = True,
    target: str | None = None,
    batched_guidance: str | None = None,
    progress: bool = True,
    on_progress: Callable[[float, str], None] | None = None,
    tolerance: str | float = TOLERANCE,
    halving: bool = False,
    refine: bool = False,
    fingerprint: Mapping[str, Any] | None = None,
    facts: Mapping[str, Any] | None = None,
) -> Profile:
    """Choose a profile for ``schedule`` (N, warm-up, last step) on the host's run.

    ``run``: the settings of the host's generation: ``steps`` (transformer calls per
    branch, required) and ``guidance_scale`` (above 1 both branches are recorded and every
    score is on the guided output); the rest (shift, sigmas) is stored, with ``schedule``
    and ``positions``, as the profile's ``chosen_for``. ``clusters`` per block (or shared
    by all blocks), k-means seeded by ``seed``; sketches of ``rows`` rows (the spectral
    indicators use the first ``spectral_rows``); ``accumulate_on``: where the recording's
    sums live. ``candidates``: solver names to choose from (default: the pool).
    ``singles``: those the closed loop also tries alone, every cluster on one solver
    (default: :data:`SINGLES` when ``candidates`` is not given, else every candidate).
    ``branch``: the cond branch's context name, for hosts that name branches.
    ``batched_guidance``: ``"uncond-first"`` / ``"cond-first"`` when one call carries both
    halves (:class:`~hyca.probing.recorder.SketchRecorder`).

    ``selection``: ``"closed-loop"`` (default) runs every candidate with ``guard`` as it
    will run and keeps the nearest to full compute; ``"eq5"``: the paper's open-loop choice
    alone. ``target``: None (the closed loop chooses), ``"residual"``, ``"output"`` (the
    output head's input; needs a host with ``output_head`` and the closed loop) or
    ``"model_output"`` (the model's output; needs a host with ``model_output`` and the
    closed loop).

    ``tolerance``: how the closed loop picks among its scored candidates (``"best"``, the
    default; ``"se"``: the simplest within one standard error of the best, or a margin in dB;
    :func:`hyca.probing.selection.pick`). ``halving`` (off by default): when the host runs calibration samples
    separately (``host.samples`` > 1), screen every candidate on a quarter of them and run
    only the finalists on the rest (:func:`hyca.probing.selection.screen_for`). ``refine`` (off by
    default): also try the greedy refinements of each track's mixed assignment
    (:func:`hyca.probing.closed_loop.handed_over`); measured on held-out captions they barely
    change what the probe's choice gives (``python -m hyca.bench.selection_transfer``,
    docs/bench.md) and cost about one run in seven.

    ``progress``: tqdm bars; ``on_progress(fraction, text)``: after each recorded step and
    each candidate run. ``fingerprint`` and ``facts`` (prompt, size, frontend, ...) go into
    the metadata. ``host.sample`` must give the same latent for the same engine (a fixed
    seed). Raises ``ValueError`` on bad settings, ``RuntimeError`` when a recording fails.
    """
    check_options(dict(candidates=candidates, singles=singles, tolerance=tolerance, halving=halving, refine=refine,
                       shared=shared, guard=guard, clusters=clusters, rows=rows, n_init=n_init, seed=seed,
                       spectral_rows=spectral_rows, selection=selection, target=target, positions=positions,
                       branch=branch, on_progress=on_progress, accumulate_on=accumulate_on))
    clusters = int(clusters)  # numpy integers too
    if clusters > host.hidden_size:
        raise ValueError(f"clusters ({clusters}) must be at most the hidden size ({host.hidden_size}): "
                         "a cluster is a group of feature dimensions")
    offered = [name for name, (attribute, _) in _OTHER_TARGETS.items() if getattr(host, attribute, False)]
    if target in _OTHER_TARGETS and (selection != CLOSED_LOOP or target not in offered):
        raise ValueError(f"target={target!r} needs selection='closed-loop' and a host that offers "
                         f"{_DESCRIBED[target]} ({_OTHER_TARGETS[target][0]})")
    steps = run.steps
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be the run's number of sampling steps (a positive integer), got {steps!r}")
    beyond = schedule.interval_beyond(steps)
    if beyond is not None:  # a profile for it can still be made, but the user should hear why it forecasts so much
        logger.warning("HyCa probe: %s", beyond)
    guidance_scale = run.guidance_scale
    solvers = candidate_solvers(candidates)
    alone = _singles(solvers, singles if singles is not None else (SINGLES if candidates is None else None))
    closing = selection == CLOSED_LOOP
    if not closing and singles is not None:
        logger.warning("HyCa probe: singles are tried alone by the closed loop only; selection=%r ignores them",
                       selection)
    screen = None
    short = schedule.short_start(steps) if closing else None  # the other start the closed loop tries
    others = (short,) if short is not None else ()
    # the model-output tracks also replay diffusers TaylorSeer's schedule (lite mode's, exactly)
    lite = schedule.lite_start(steps) if closing else None

    def recorder(num_blocks: int, bar_progress: Any, starts: tuple[Schedule, ...] = others) -> SketchRecorder:
        return SketchRecorder(num_blocks, steps, schedule, positions, rows, spectral_rows, seed, branch, solvers,
                              bar_progress, accumulate_on, guidance_scale=guidance_scale,
                              batched_guidance=batched_guidance, other_schedules=starts)

    with tqdm(total=steps, desc="HyCa probe", unit="step", disable=not progress) as bar:
        residuals = recorder(host.num_blocks, _Progress(bar, on_progress, steps, closing))
        started = time.perf_counter()
        reference = host.sample(residuals)
        recorded = time.perf_counter()
        indicator_values, replay = residuals.finish()
        profile, report = analyse(indicator_values, replay, clusters, shared, seed, n_init)
        timing = {"record_s": round(recorded - started, 3), "analysis_s": round(time.perf_counter() - recorded, 3)}
    report["branches"] = sorted(residuals.branches_seen)
    if closing and reference is None:
        logger.warning("HyCa probe: the run returned no output to compare, so the choice is eq. 5's alone "
                       "(open loop); return the final latent from run() for a closed-loop choice")
        report["closed_loop"] = {"skipped": "the run returned no output"}
    elif closing:
        reference = reference.detach().float().cpu()
        tracks = [closed_loop.Track("", profile)]
        if short is not None:
            tracks.append(_start_track(profile.labels, residuals, short, clusters, shared, {}))
        other_reports = {}
        for name in offered:  # the head's input, the model output: each its own recording
            if target not in (None, name) or (target is None and name in _SUBSUMED_BY_MODEL_OUTPUT
                                              and "model_output" in offered):
                continue
            started = time.perf_counter()
            starts = others + ((lite,) if name == "model_output" and lite is not None else ())
            try:
                more, other_reports[name] = _target_tracks(host, name, recorder(1, None, starts), starts, clusters,
                                                           shared, seed, n_init)
            except RuntimeError as error:  # e.g. Z-Image's model output, one tensor per image: no such track
                if target == name:
                    raise
                logger.warning("HyCa probe: leaving out the candidates that forecast %s: %s", _DESCRIBED[name],
                               str(error))
                report.setdefault("left_out", {})[name] = str(error)
                continue
            tracks += more
            timing[f"record_{name}_s"] = round(time.perf_counter() - started, 3)
        if not guard:  # every candidate runs without the guard already
            tracks = [replace(t, unguarded=()) for t in tracks]
        if target in _OTHER_TARGETS:  # the residual tracks are left out; the first track tries every single solver
            tracks = [replace(t, singles=None if i == 0 else t.singles)
                      for i, t in enumerate(t for t in tracks if t.eq5.metadata.get("target") == target)]
        screen = picking.screen_for(int(getattr(host, "samples", None) or 1)) if halving else None
        if halving and screen is None:
            logger.warning("HyCa probe: halving needs calibration samples the host can run apart (a list of "
                           "prompts with per-sample latents); every candidate runs on the whole calibration batch")
        profile, report["closed_loop"], seconds = _closed_loop(host, schedule, positions, guard, tracks, reference,
                                                                progress, alone, on_progress, tolerance, screen,
                                                                refine)
        timing["closed_loop_s"] = round(seconds, 3)
        chosen = profile.metadata.get("target")
        if chosen in other_reports:  # the eq. 5 report that describes the chosen profile
            report = {**report, **{k: v for k, v in other_reports[chosen].items() if k != "branches"},
                      "residual_eq5": {k: report[k] for k in ("blocks", "replay_error")}}
    first_interval, chosen_target = profile.metadata.get("first_interval"), profile.metadata.get("target")
    skip_last = profile.metadata.get("skip_last") is True
    unguarded = profile.metadata.get("guard") is False
    chosen_for = run.merged(RunSettings(interval=schedule.interval, warmup=schedule.warmup,
                                        compute_last=schedule.compute_last, positions=positions))
    profile.metadata = {
        "method": "hyca",
        **({"fingerprint": dict(fingerprint)} if fingerprint is not None else {}),
        "interval": schedule.interval,
        "warmup": schedule.warmup,
        "compute_last": schedule.compute_last,
        "positions": positions,
        **({"first_interval": first_interval} if first_interval is not None else {}),
        **({"skip_last": True} if skip_last else {}),
        **({"guard": False} if unguarded else {}),
        **({"target": chosen_target} if chosen_target is not None else {}),
        "chosen_for": chosen_for.to_json(),
        "probe": {**(facts or {}), "steps": steps, "clusters": clusters, "shared": shared, "seed": seed,
                  "rows": rows, "spectral_rows": spectral_rows, "n_init": n_init, "branch": branch,
                  "candidates": [s.name for s in solvers] if candidates is not None else None,
                  "singles": [s.name for s in alone] if closing else None,  # eq. 5 tries none alone
                  "selection": selection, "guard": guard, "tolerance": tolerance,
                  "halving": list(screen.first) if screen is not None else None, "refine": refine},
        "pool_version": POOL_VERSION,
        "hyca_version": _version(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "selection": report,
        "timing": timing,
    }
    return profile


def _singles(solvers: Sequence[Solver], names: Sequence[str] | None) -> tuple[Solver, ...]:
    """The solvers of ``solvers`` named in ``names`` (None: all), in pool order; ``ValueError``
    when ``names`` holds a solver that is not a candidate."""
    if names is None:
        return tuple(solvers)
    if isinstance(names, str):
        raise ValueError(f"singles must be a list of solver names, e.g. [{names!r}], not a string")
    wanted = {get_solver(name).name for name in names}
    missing = wanted - {s.name for s in solvers}
    if missing:
        raise ValueError(f"singles {sorted(missing)} are not among the candidates {[s.name for s in solvers]}")
    return tuple(s for s in solvers if s.name in wanted)


def _target_tracks(host: ProbeHost, name: str, recording: SketchRecorder, starts: tuple[Schedule, ...], clusters: int,
                   shared: bool, seed: int, n_init: int) -> tuple[list[closed_loop.Track], dict[str, Any]]:
    """The tracks of target ``name`` (``"output"``, ``"model_output"``): ``recording`` (a
    one-"block" recorder whose other schedules are ``starts``) records it on one more fully
    computed run, eq. 5 is chosen on the schedule and on each of ``starts``. Returns the
    tracks and eq. 5's report."""
    recording.target = name
    host.sample(recording)
    values, replay = recording.finish()
    profile, report = analyse(values, replay, clusters, shared, seed, n_init)
    always = MODEL_OUTPUT_SOLVERS if name == "model_output" else ()
    prefix = _OTHER_TARGETS[name][1]
    tracks = [closed_loop.Track(f"{prefix}:", closed_loop.with_metadata(profile, target=name),
                                closed_loop.OTHER_TRACK_SINGLES, always)]
    for index, start in enumerate(starts):
        tracks.append(_start_track(profile.labels, recording, start, clusters, shared, {"target": name}, always, index))
    return tracks, report


def _start_track(labels: torch.Tensor, recorder: SketchRecorder, start: Schedule, clusters: int, shared: bool,
                 metadata: dict[str, Any], always: tuple[str, ...] = (), index: int = 0) -> closed_loop.Track:
    """Eq. 5 replayed on another start of the schedule (the recorder's ``index``-th other
    schedule: the short start, or TaylorSeer's, whose last step is forecast), for the
    clustering ``labels``."""
    profile = assign(labels, recorder.other_replays()[index], clusters, shared)
    target = metadata.get("target")
    skip_last = not start.compute_last
    prefix = ((f"{_OTHER_TARGETS[target][1]}," if target in _OTHER_TARGETS else "")
              + ("lite:" if skip_last else f"start{start.first_interval}:"))
    extra = {"skip_last": True} if skip_last else {}
    lite = skip_last and target == "model_output"  # TaylorSeer lite's strategy: also as lite runs it
    return closed_loop.Track(prefix, closed_loop.with_metadata(profile, first_interval=start.first_interval,
                                                               **extra, **metadata),
                             closed_loop.OTHER_TRACK_SINGLES, always, LITE_UNGUARDED if lite else ())


def _closed_loop(host: ProbeHost, schedule: Schedule, positions: str, guard: bool, tracks: list[closed_loop.Track],
                 reference: torch.Tensor, progress: bool, solvers: Sequence[Solver],
                 on_progress: Callable[[float, str], None] | None = None, tolerance: str | float = TOLERANCE,
                 screen: picking.Screen | None = None, refine: bool = False) -> tuple[Profile, dict[str, Any], float]:
    """:func:`hyca.probing.closed_loop.choose` with cached runs on ``host`` (of the
    calibration ``samples`` only, when halving)."""

    def generate(candidate: Profile, samples: tuple[int, ...] | None = None) -> torch.Tensor:
        metadata = candidate.metadata
        start = schedule.with_start(metadata.get("first_interval"), metadata.get("skip_last") is True)
        engine = HybridCache(candidate, start, positions, guard=None if guard else False)  # None: as the candidate says
        output = host.sample(engine) if samples is None else host.sample(engine, samples)
        return output.detach().float().cpu() if isinstance(output, torch.Tensor) else output

    started = time.perf_counter()
    # per track: eq. 5, its single solvers, refinements at most (one per solver group)
    expected = sum(1 + (len(solvers) if t.singles is None else t.singles + len(t.always)) + len(t.unguarded)
                   + (len(torch.unique(t.eq5.solvers)) if refine else 0)
                   for t in tracks) + (screen.finalists + 1 if screen is not None and screen.rest else 0)
    done = 0  # counted here: a disabled tqdm bar (progress=False, the app's case) does not count
    with tqdm(desc="HyCa probe: closed-loop runs", unit="run", total=expected, disable=not progress) as bar:
        def tick(_: Any) -> None:
            nonlocal done
            done += 1
            bar.update(1)
            if on_progress is not None:
                on_progress(_Progress.SHARE + (1 - _Progress.SHARE) * min(done, expected) / expected,
                            f"probe: closed-loop run {done} (of at most {expected})")

        def plan(total: int) -> None:  # known once the first track ran: the bar's total from then on
            nonlocal expected
            expected = bar.total = max(total, done)
            bar.refresh()

        chosen, trials, winner = closed_loop.choose(tracks, generate, reference, solvers, refine=refine, on_trial=tick,
                                                    tolerance=tolerance, screen=screen, on_plan=plan)
        bar.total = done  # the most expected was an upper bound (runs shared, refinements not needed)
        bar.refresh()
    if on_progress is not None:  # fewer runs than the most expected: refinements that were not needed
        on_progress(1.0, f"probe: chose {winner} after {len(trials)} closed-loop runs")
    seconds = time.perf_counter() - started
    logger.info("HyCa probe: closed loop chose %s (%s) after %d cached runs in %.1f s", winner,
                ", ".join(f"{t.name} {t.fidelity_db:.1f} dB" for t in trials), len(trials), seconds)
    return chosen, {"chosen": winner, "trials": [t.to_json() for t in trials]}, seconds


def _version() -> str:
    from .. import __version__

    return __version__
