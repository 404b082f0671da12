"""The benchmark run: build every method, match the peers' FLOPs to HyCa's, measure all.

Per step count (50 and 28 by default):

1. HyCa is probed once per interval N on one calibration prompt (the selection replays
   the schedule at N, so each N gets its own profile), plus once on the sigma axis.
2. At each matched level (a HyCa interval N), the fixed-schedule peers run the same
   schedule (FORA, TaylorSeer 1/2 from our engine; diffusers' TaylorSeer at the same
   interval and warm-up), the step-reduction baseline runs as many steps as HyCa
   computes, and the threshold-driven peers are searched to HyCa's FLOPs ratio on the
   calibration prompts (:mod:`.calibrate`).
3. Every method is switched on once, on its own copy of the transformer (timings are of
   steady use, as in an application, not of switching on). On every evaluation prompt,
   every method runs once, timed (garbage collector paused; it collects between
   prompts), in an order rotated per
   prompt (so slow drift of a shared machine spreads over all methods); fidelity is
   against full compute of the same prompt and seed. On the first ``flops_prompts``
   prompts every method runs once more under the FLOPs counter and the cache-bytes probe
   (counting slows a run, so those runs are never timed).
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import gc
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import torch

from ..engine.schedule import Schedule
from . import methods as m
from .calibrate import Found, search
from .flops import TransformerFlops
from .memory import PeakCacheBytes
from .metrics import psnr, ssim
from .overhead import decompose
from .workload import Case, cases, generate, load

PSNR_CAP = 100.0  # dB; an image identical to full compute would otherwise make a mean infinite


@dataclass(frozen=True)
class Settings:
    model: str = "reference"
    model_path: str | None = None  # a reference-model folder other than the shipped one
    prompts: int = 32
    steps: tuple[int, ...] = (50, 28)
    intervals: tuple[int, ...] = (3, 4, 5, 6, 7, 8, 10)  # HyCa's N
    levels: tuple[int, ...] = (4, 5, 7, 10)  # the N at which every peer is matched to HyCa's FLOPs
    sigma_interval: int = 6  # the N at which HyCa also runs on the sigma axis
    overhead_interval: int = 7  # the N at which HyCa's wall-clock is taken apart (first step count only)
    # The step and sigma axes are affine images of each other when sigmas are evenly spaced
    # (the reference scheduler's shift is 1), and the solvers' weights do not change under
    # an affine map of positions: the axes can only differ on an uneven schedule. So the
    # axis comparison is repeated with the scheduler shifted as FLUX's is (shift 3).
    axis_shift: float | None = 3.0
    flops_prompts: int = 4
    calibration_prompts: int = 2
    clusters: int = 4
    threads: int = 1
    search_iterations: int = 7
    cache_dit: bool = True

    def check(self) -> None:
        missing = [n for n in (*self.levels, self.sigma_interval, self.overhead_interval) if n not in self.intervals]
        if missing:
            raise ValueError(f"levels and sigma_interval must be among the HyCa intervals {self.intervals}; "
                             f"{missing} are not")
        if self.prompts < 1 or self.flops_prompts < 1 or self.calibration_prompts < 1:
            raise ValueError("prompts, flops_prompts and calibration_prompts must be >= 1")


QUICK = Settings(prompts=4, steps=(50,), intervals=(4, 7), levels=(4, 7), sigma_interval=7, flops_prompts=1,
                 calibration_prompts=1, search_iterations=6)
DEFAULT = Settings()


@dataclass
class Run:
    """One method on one prompt."""

    image: torch.Tensor
    seconds: float | None = None
    flops: int | None = None
    cache_bytes: int | None = None


@dataclass
class Row:
    """One method, aggregated over prompts."""

    family: str
    setting: str
    steps: int
    level: int | None
    flops_speedup: float
    wall_speedup: float
    psnr: float
    ssim: float
    cache_bytes: int | None
    note: str = ""
    psnr_per_prompt: list[float] = field(default_factory=list)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def prepare(pipe: Any, method: m.Method) -> torch.nn.Module:
    """``method`` switched on, once, on its own copy of the transformer: each run then
    only swaps it in, so timings are of steady use (enable once, generate many), as in
    an application, not of switching on (hooks, masks, first-use tables)."""
    original = pipe.transformer
    pipe.transformer = copy.deepcopy(original)
    try:
        method.enable(pipe)
        return pipe.transformer
    finally:
        pipe.__dict__.pop("_bench_original_transformer", None)  # cache-dit's own swap: keep its copy
        pipe.transformer = original


@contextlib.contextmanager
def switched_on(pipe: Any, method: m.Method, prepared: torch.nn.Module | None) -> Iterator[None]:
    """``method`` active on ``pipe`` for the duration: its prepared transformer swapped in,
    or (none prepared) enabled and disabled around it."""
    if prepared is not None:
        original, pipe.transformer = pipe.transformer, prepared
        try:
            yield
        finally:
            pipe.transformer = original
        return
    method.enable(pipe)
    try:
        yield
    finally:
        method.disable(pipe)


def execute(pipe: Any, method: m.Method, case: Case, steps: int, counted: bool = False,
            prepared: torch.nn.Module | None = None) -> Run:
    """Generate ``case`` with ``method`` on; timed, or counted (FLOPs and cache bytes)."""
    with switched_on(pipe, method, prepared):
        if counted:
            flops, peak = TransformerFlops(), PeakCacheBytes()
            with flops.attached(pipe.transformer), peak.attached(pipe.transformer):
                image = generate(pipe, case, method.steps(steps))
            return Run(image, flops=flops.total, cache_bytes=peak.peak)
        collecting = gc.isenabled()
        gc.disable()  # as timeit does: no collector pause lands inside one method's timing
        try:
            started = time.perf_counter()
            image = generate(pipe, case, method.steps(steps))
            seconds = time.perf_counter() - started
        finally:
            if collecting:
                gc.enable()
        return Run(image, seconds=seconds)


def probe_profiles(pipe: Any, case: Case, steps: int, settings: Settings) -> tuple[dict, Any, float]:
    """One probed profile per interval (step axis) and one on the sigma axis; seconds spent."""
    from ..adapters.diffusers.probe import probe

    def one(interval: int, positions: str):
        return probe(pipe, prompt=case.prompt, height=32, width=32, steps=steps, interval=interval,
                     warmup=m.WARMUP, positions=positions, clusters=settings.clusters, seed=case.seed,
                     progress=False, output_type="pt")

    started = time.perf_counter()
    profiles = {n: one(n, "step") for n in settings.intervals}
    sigma = one(settings.sigma_interval, "sigma")
    return profiles, sigma, time.perf_counter() - started


def build_methods(pipe: Any, steps: int, settings: Settings,
                  calibration: list[Case]) -> tuple[list[m.Method], dict, dict]:
    """Every method for one step count, the peers matched to HyCa at each level; run
    information; HyCa's profiles by interval."""
    log(f"{steps} steps: probing HyCa at N={list(settings.intervals)} and sigma axis at N={settings.sigma_interval}")
    profiles, sigma_profile, probe_seconds = probe_profiles(pipe, calibration[0], steps, settings)
    full_flops = sum(execute(pipe, m.full(), c, steps, counted=True).flops for c in calibration)

    def ratio_of(method: m.Method) -> float:
        return sum(execute(pipe, method, c, steps, counted=True).flops for c in calibration) / full_flops

    hyca_methods = [m.engine(m.HYCA, profiles[n], n) for n in settings.intervals]
    methods = [m.full(), *hyca_methods, m.engine(m.HYCA_SIGMA, sigma_profile, settings.sigma_interval, "sigma")]
    ratios = {mm.level: mm for mm in hyca_methods}
    mag_ratios = calibrate_magcache(pipe, calibration, steps)
    skip_cache_dit = m.cache_dit_available() if settings.cache_dit else "cache-dit disabled by --no-cache-dit"
    searches: dict[str, dict] = {}
    for level in settings.levels:
        target = ratio_of(ratios[level])
        computed = sum(Schedule(level, m.WARMUP).plan(steps))
        methods += [m.fewer_steps(computed, level), m.fora(level), m.taylor(1, level), m.taylor(2, level),
                    m.diffusers_taylorseer(level, 1), m.diffusers_taylorseer(level, 2)]
        makers: dict[str, Callable[[float], m.Method]] = {
            m.DIFFUSERS_FBCACHE: m.first_block_cache,
            m.DIFFUSERS_MAGCACHE: lambda t: m.mag_cache(t, mag_ratios, steps),
        }
        if skip_cache_dit is None:
            makers[m.DBCACHE] = lambda t: m.dbcache(t, steps)
            makers[m.DBCACHE_TAYLOR] = lambda t: m.dbcache(t, steps, taylorseer=True)
        for family, make in makers.items():
            found = search(make, ratio_of, target, iterations=settings.search_iterations)
            found.method.level = level
            found.method.note = describe_search(found)
            searches[f"{family} @ N={level}"] = {"target": target, "ratio": found.ratio,
                                                 "evaluations": found.evaluations, "knob": found.method.knob}
            log(f"  {family} at N={level}: {found.method.setting}, {describe_search(found)}")
            methods.append(found.method)
    info = {"probe_seconds": probe_seconds, "mag_ratios": mag_ratios, "searches": searches,
            "cache_dit": skip_cache_dit or "used",
            "profiles": {n: profile_summary(p) for n, p in profiles.items()},
            "sigma_profile": profile_summary(sigma_profile)}
    return methods, info, profiles


def compare_axes(pipe: Any, eval_cases: list[Case], calibration: Case, steps: int, settings: Settings) -> dict:
    """HyCa at ``sigma_interval`` on the step and on the sigma axis, each with its own
    probe, with the pipeline's scheduler shifted by ``axis_shift``; fidelity against full
    compute on the same shifted schedule."""
    from ..adapters.diffusers.probe import probe

    original = pipe.scheduler
    pipe.scheduler = type(original).from_config(original.config, shift=settings.axis_shift)
    try:
        n = settings.sigma_interval
        methods = [m.full()] + [
            m.engine(f"{m.HYCA} ({axis} axis)", probe(pipe, prompt=calibration.prompt, height=32, width=32,
                                                      steps=steps, interval=n, warmup=m.WARMUP, positions=axis,
                                                      clusters=settings.clusters, seed=calibration.seed,
                                                      progress=False, output_type="pt"), n, axis)
            for axis in ("step", "sigma")]
        images = {mm.family: [execute(pipe, mm, case, steps).image for case in eval_cases] for mm in methods}
    finally:
        pipe.scheduler = original
    full = images[m.FULL]
    out = {"shift": settings.axis_shift, "interval": settings.sigma_interval, "steps": steps}
    for family, own in images.items():
        if family != m.FULL:
            out[family] = {"psnr": sum(min(psnr(a, b), PSNR_CAP) for a, b in zip(own, full)) / len(full),
                           "ssim": sum(ssim(a, b) for a, b in zip(own, full)) / len(full)}
    return out


def describe_search(found: Found) -> str:
    text = f"calibration FLOPs ratio {found.ratio:.3f} for target {found.target:.3f}"
    if not found.reachable:
        return text + " (not reachable at any threshold: fastest setting shown)"
    return text if found.matched else text + " (closest the search found)"


def calibrate_magcache(pipe: Any, calibration: list[Case], steps: int) -> list[float]:
    """Per-step magnitude ratios from diffusers' own calibration, averaged over the calibration prompts."""
    runs = [m.calibrate_mag_ratios(pipe, lambda c=c: generate(pipe, c, steps), steps) for c in calibration]
    return [sum(r[i] for r in runs) / len(runs) for i in range(steps)]


def profile_summary(profile: Any) -> dict:
    """Which solvers a probed profile uses, and on what share of the dimensions."""
    from ..math.solvers import pool_names

    dim_solvers = profile.dim_solvers()
    ids, counts = torch.unique(dim_solvers, return_counts=True)
    names = pool_names()
    return {names[int(i)]: round(int(c) / dim_solvers.numel(), 4) for i, c in zip(ids, counts)}


def measure(pipe: Any, methods: list[m.Method], eval_cases: list[Case], steps: int,
            settings: Settings) -> dict[str, list[Run]]:
    """Every method on every prompt, timed, interleaved; counted runs on the first prompts."""
    runs: dict[str, list[Run]] = {mm.key: [] for mm in methods}
    prepared = {mm.key: prepare(pipe, mm) for mm in methods}
    try:
        for i, case in enumerate(eval_cases):
            gc.collect()  # once per prompt (a collection takes ~0.5 s here), paused in between
            gc.disable()
            measure_case(pipe, methods, prepared, runs, i, case, steps, settings)
            log(f"  {steps} steps: prompt {i + 1}/{len(eval_cases)} done")
    finally:
        gc.enable()
    m.forget_copies()
    return runs


def measure_case(pipe: Any, methods: list[m.Method], prepared: dict[str, torch.nn.Module],
                 runs: dict[str, list[Run]], i: int, case: Case, steps: int, settings: Settings) -> None:
    """Prompt ``i``: every method once, timed, in an order rotated by ``i``; counted runs
    on the first prompts."""
    order = methods[i % len(methods):] + methods[: i % len(methods)]
    for method in order:
        runs[method.key].append(execute(pipe, method, case, steps, prepared=prepared[method.key]))
    if i < settings.flops_prompts:
        # full compute is the denominator on every counted prompt; fixed schedules
        # are counted on the first prompt only (their FLOPs do not depend on it)
        for method in (mm for mm in methods if i == 0 or mm.adaptive or mm.family == m.FULL):
            counted = execute(pipe, method, case, steps, counted=True, prepared=prepared[method.key])
            timed = runs[method.key][-1]
            timed.flops, timed.cache_bytes = counted.flops, counted.cache_bytes


def aggregate(methods: list[m.Method], runs: dict[str, list[Run]], steps: int) -> list[Row]:
    full_runs = runs[m.full().key]
    full_seconds = sum(r.seconds for r in full_runs)
    rows = []
    for method in methods:
        own = runs[method.key]
        counted = [(f, r) for f, r in zip(full_runs, own) if r.flops is not None]
        psnrs = [min(psnr(r.image, f.image), PSNR_CAP) for f, r in zip(full_runs, own)]
        rows.append(Row(
            family=method.family, setting=method.setting, steps=steps, level=method.level,
            flops_speedup=sum(f.flops for f, _ in counted) / sum(r.flops for _, r in counted),
            wall_speedup=full_seconds / sum(r.seconds for r in own),
            psnr=sum(psnrs) / len(psnrs),
            ssim=sum(ssim(r.image, f.image) for f, r in zip(full_runs, own)) / len(own),
            cache_bytes=max(r.cache_bytes for _, r in counted),
            note=method.note, psnr_per_prompt=[round(p, 3) for p in psnrs],
        ))
    return rows


SAMPLE_PROMPTS = 4


def samples(methods: list[m.Method], runs: dict[str, list[Run]], level: int) -> dict[str, list[torch.Tensor]]:
    """Images of the first prompts: full compute, then every family at one level (not
    written to the JSON; drawn as a grid)."""
    chosen = [mm for mm in methods if mm.family == m.FULL or (mm.level == level and mm.family != m.HYCA_SIGMA)]
    return {mm.name: [r.image for r in runs[mm.key][:SAMPLE_PROMPTS]] for mm in chosen}


def environment(settings: Settings) -> dict:
    import diffusers

    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
        "cache_dit": _version_of("cache_dit"), "machine": platform.machine(), "cpus": _cpus(),
        "torch_threads": torch.get_num_threads(), "settings": asdict(settings),
    }


def weights_digest(settings: Settings) -> str | None:
    """SHA-256 of the reference transformer's weights file: which model the numbers are for."""
    import hashlib
    from pathlib import Path

    if settings.model != "reference":
        return None
    from ..reference import shipped_path

    folder = Path(settings.model_path) if settings.model_path else shipped_path()
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    return hashlib.sha256(weights.read_bytes()).hexdigest() if weights.is_file() else None


def _version_of(package: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(package.replace("_", "-"))
    except Exception:  # not installed: reported as None
        return None


def _cpus() -> int | None:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def run(settings: Settings, pipe: Any = None) -> dict:
    """The whole benchmark; returns a JSON-able dict of rows and run information."""
    settings.check()
    torch.set_num_threads(settings.threads)
    started = time.perf_counter()
    pipe = pipe if pipe is not None else load(settings.model, settings.model_path)
    eval_cases = cases(settings.prompts)
    calibration = cases(settings.calibration_prompts, calibration=True)
    result = {"environment": {**environment(settings), "model_weights_sha256": weights_digest(settings)},
              "rows": [], "runs": {}}
    for steps in settings.steps:
        step_started = time.perf_counter()
        methods, info, profiles = build_methods(pipe, steps, settings, calibration)
        build_seconds = time.perf_counter() - step_started
        log(f"{steps} steps: measuring {len(methods)} methods on {len(eval_cases)} prompts")
        runs = measure(pipe, methods, eval_cases, steps, settings)
        result["rows"] += [asdict(r) for r in aggregate(methods, runs, steps)]
        result.setdefault("samples", {})[steps] = samples(methods, runs, settings.overhead_interval)
        if steps == settings.steps[0] and settings.axis_shift:
            log(f"{steps} steps: step vs sigma axis on a schedule shifted by {settings.axis_shift}")
            info["axes_shifted"] = compare_axes(pipe, eval_cases, calibration[0], steps, settings)
        if steps == settings.steps[0]:
            log(f"{steps} steps: timing HyCa's calls at N={settings.overhead_interval}")
            info["overhead"] = decompose(pipe, eval_cases[0], steps, settings.overhead_interval,
                                         profiles[settings.overhead_interval])
        result["runs"][str(steps)] = {**info, "build_seconds": round(build_seconds, 1),
                                      "seconds": round(time.perf_counter() - step_started, 1)}
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


__all__ = ["DEFAULT", "QUICK", "Row", "Run", "Settings", "aggregate", "execute", "measure", "run"]
