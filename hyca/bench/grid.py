"""``python -m hyca.bench --grid``: HyCa at the settings people run, against every single
solver of its own pool and against its peers, cell by cell.

A cell is one sampling setting: step count x guidance scale x scheduler shift x HyCa's
interval N (warm-up fixed). In each cell, on held-out captions of the reference model
(combinations never seen in training) with fixed seeds:

* **HyCa** as a user gets it: the plain call, ``hyca.enable(pipe, interval=N, warmup=W)``
  and nothing else told, then the pipeline called at the cell's steps and guidance (the
  scheduler's shift set as the cell says); the call's settings are read from it and the
  probe it runs on first use is HyCa's default one (its own prompt, not our calibration
  captions), on an empty profile cache of its own;
* **HyCa (probe told the settings)**: the probe run explicitly (closed-loop choice, on
  calibration captions of the training split, at the cell's steps, guidance and N), guard
  on; **HyCa (no guard)**: the same profile with the guard off (what the guard costs or buys
  on a profile chosen for the run's settings);
* **HyCa (eq. 5)**: the paper's open-loop choice, guard off;
* **HyCa (shipped profile)**: the profile shipped for N (chosen at 50 steps, no guidance,
  shift 1), with and without the guard: what a run at other settings gets without a probe;
* **single: <solver>**: every solver of the pool for every dimension, guard off (FORA is
  ``reuse``, TaylorSeer ``taylor-k``), on the paper's schedule, on the one with the short
  first interval after warm-up, and forecasting the output head's input: every choice
  HyCa's probe has, made with one solver;
* **peers**: diffusers' TaylorSeer (lite and full mode, orders 1 and 2, same interval and
  warm-up), diffusers' MagCache (calibrated on the calibration captions, its threshold
  searched to HyCa's FLOPs), and fewer steps at HyCa's computed-step count.

Fidelity is PSNR / SSIM against full compute of the same caption and seed. FLOPs are
counted with ``torch.utils.flop_counter`` on the first batch (every batch for MagCache,
whose skips depend on the prompt). Prompts run in batches of ``batch`` (default 8);
HyCa's guard and MagCache decide per batch.

Results are appended to a JSON-lines file one cell at a time, so a run can be resumed
(``--resume``) and split across processes (``--shard i/n``); the report (markdown tables
and a heatmap of HyCa's margins) is drawn from all cells found.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

import hyca

from ..engine.schedule import Schedule
from ..math.solvers import pool_names
from . import methods as m
from .calibrate import search
from .flops import TransformerFlops
from .grid_plain import HYCA, plain_row
from .metrics import psnr, ssim

PSNR_CAP = 100.0
HYCA_TOLD = "HyCa (probe told the settings)"
HYCA_EQ5 = "HyCa (eq. 5, paper)"
HYCA_NO_GUARD = "HyCa (no guard)"
SHIPPED = "HyCa (shipped profile, guard)"
SHIPPED_NO_GUARD = "HyCa (shipped profile, no guard)"
SINGLE = "single: "
SINGLE_SHORT = "single, short start: "
SINGLE_OUTPUT = "single, output head: "
SINGLES = (SINGLE, SINGLE_SHORT, SINGLE_OUTPUT)
TS_LITE = "diffusers TaylorSeer lite"
TS_FULL = "diffusers TaylorSeer full"
MAGCACHE = "diffusers MagCache"
STEPS = "fewer steps"
PEERS = (f"{TS_LITE} o1", f"{TS_LITE} o2", f"{TS_FULL} o1", f"{TS_FULL} o2", MAGCACHE, STEPS)
HELD_OUT_SEED = 20261130
CALIBRATION_SEED = 777


@dataclass(frozen=True)
class GridSettings:
    steps: tuple[int, ...] = (20, 28, 50)
    guidance: tuple[float, ...] = (1.0, 2.5)
    shifts: tuple[float, ...] = (1.0, 3.0)
    intervals: tuple[int, ...] = (3, 4, 5, 6, 8)
    warmup: int = 3
    prompts: int = 24
    batch: int = 8
    calibration_prompts: int = 8
    clusters: int = 4
    search_iterations: int = 5
    model: str = "reference"
    model_path: str | None = None
    threads: int = 1
    shipped: bool = True

    def cells(self) -> list[tuple[int, float, float, int]]:
        return [(s, g, sh, n) for s in self.steps for g in self.guidance for sh in self.shifts for n in self.intervals]


#: The CI wiring subset: one guided cell, few prompts (meaningful only as a smoke test).
QUICK = GridSettings(steps=(20,), guidance=(2.5,), shifts=(3.0,), intervals=(4,), prompts=4, calibration_prompts=2,
                     search_iterations=3)


@dataclass
class Method:
    name: str
    enable: Callable[[Any], None] = lambda pipe: None
    disable: Callable[[Any], None] = lambda pipe: None
    steps: int | None = None  # None: the cell's
    adaptive: bool = False
    info: dict = field(default_factory=dict)


class Workload:
    """Held-out captions with fixed noise, and calibration captions (training split)."""

    def __init__(self, pipe: Any, settings: GridSettings) -> None:
        from ..reference import data
        from ..reference.model import pack, patch_of

        patch, size = patch_of(pipe.transformer), data.SIZE
        self.pipe, self.batch, self.size = pipe, settings.batch, size

        def latents(seeds: list[int]) -> torch.Tensor:
            return torch.cat([pack(torch.randn((1, 3, size, size), generator=torch.Generator().manual_seed(s)), patch)
                              for s in seeds])

        self.prompts = data.sample_scenes(np.random.default_rng(HELD_OUT_SEED), settings.prompts, "heldout").captions()
        self.latents = latents([HELD_OUT_SEED + i for i in range(settings.prompts)])
        self.calibration = data.sample_scenes(np.random.default_rng(CALIBRATION_SEED), settings.calibration_prompts,
                                              "train").captions()
        self.calibration_latents = latents([CALIBRATION_SEED + i for i in range(settings.calibration_prompts)])

    def generate(self, steps: int, guidance: float, calibration: bool = False,
                 count: TransformerFlops | None = None, count_batches: int = 1) -> torch.Tensor:
        """Images ``(n, 3, H, W)`` in [0, 1], in batches; FLOPs of the first ``count_batches`` counted."""
        prompts = self.calibration if calibration else self.prompts
        latents = self.calibration_latents if calibration else self.latents
        out = []
        for i, start in enumerate(range(0, len(prompts), self.batch)):
            counting = count.attached(self.pipe.transformer) if count is not None and i < count_batches else \
                contextlib.nullcontext()
            with counting:
                out.append(self.pipe(prompts[start:start + self.batch], num_inference_steps=steps,
                                     guidance_scale=guidance, latents=latents[start:start + self.batch].clone(),
                                     output_type="pt").images)
        return torch.cat(out)


@contextlib.contextmanager
def shifted(pipe: Any, shift: float) -> Iterator[None]:
    original = pipe.scheduler
    pipe.scheduler = type(original).from_config(original.config, shift=shift)
    try:
        yield
    finally:
        pipe.scheduler = original


def engine(name: str, profile: Any, interval: int, warmup: int, guard: bool, **info: Any) -> Method:
    return Method(name, lambda pipe: hyca.enable(pipe, profile=profile, interval=interval, warmup=warmup, guard=guard),
                  hyca.disable, info=info)


def hyca_methods(work: Workload, cell: tuple, settings: GridSettings) -> tuple[list[Method], dict]:
    """HyCa's plain call; HyCa as probed at the cell's settings (closed loop) with and without
    the guard; eq. 5 alone (guard off)."""
    from ..adapters.diffusers.probe import probe

    steps, guidance, _, interval = cell

    def probed(selection: str, guard: bool):
        started = time.perf_counter()
        profile = probe(work.pipe, prompt=work.calibration, height=work.size, width=work.size, steps=steps,
                        interval=interval,
                        warmup=settings.warmup, clusters=settings.clusters, guidance_scale=guidance,
                        latents=work.calibration_latents.clone(), output_type="pt", progress=False,
                        selection=selection, guard=guard)
        return profile, time.perf_counter() - started

    closed, closed_seconds = probed("closed-loop", True)
    eq5, eq5_seconds = probed("eq5", False)
    report = closed.metadata["selection"].get("closed_loop", {})
    info = {"probe_seconds": round(closed_seconds, 2), "eq5_probe_seconds": round(eq5_seconds, 2),
            "closed_loop_choice": report.get("chosen"), "closed_loop_trials": report.get("trials", []),
            "profile": _solver_shares(closed)}
    methods = [plain_row(work, cell, settings),
               engine(HYCA_TOLD, closed, interval, settings.warmup, True),
               engine(HYCA_NO_GUARD, closed, interval, settings.warmup, False),
               engine(HYCA_EQ5, eq5, interval, settings.warmup, False)]
    return methods, info


def fixed_methods(work: Workload, cell: tuple, settings: GridSettings) -> list[Method]:
    """Every method that needs neither a probe nor a calibration run: the shipped profile
    (with and without the guard), the single solvers, diffusers TaylorSeer, fewer steps."""
    from ..adapters.diffusers.families import blocks_of, family_of, head_of, hidden_size

    steps, _, _, interval = cell
    methods = []
    shipped = _shipped_profile(work.pipe, interval) if settings.shipped else None
    if shipped is not None:
        methods += [engine(SHIPPED, shipped, interval, settings.warmup, True),
                    engine(SHIPPED_NO_GUARD, shipped, interval, settings.warmup, False)]
    transformer = work.pipe.transformer
    head = head_of(transformer, family_of(transformer))
    methods += single_methods(interval, settings.warmup, steps, len(blocks_of(transformer, family_of(transformer))),
                              hidden_size(transformer), None if head is None else head.in_features)
    methods += [taylorseer(interval, settings.warmup, order, lite) for lite in (True, False) for order in (1, 2)]
    computed = sum(Schedule(interval, settings.warmup).plan(steps))
    methods.append(Method(STEPS, steps=computed, info={"steps": computed}))
    return methods


def _shipped_profile(pipe: Any, interval: int) -> Any:
    from ..adapters.diffusers.fingerprint import fingerprint
    from ..profiles.sources import resolve_profile

    try:
        return resolve_profile(fingerprint(pipe.transformer), interval=interval, hub_repo=None,
                               cache_dir="/nonexistent-hyca-cache").profile
    except Exception:  # no shipped profile for this model (the tiny wiring model): left out
        return None


def _solver_shares(profile: Any) -> dict[str, float]:
    ids, counts = torch.unique(profile.dim_solvers(), return_counts=True)
    return {pool_names()[int(i)]: round(int(c) / profile.dim_solvers().numel(), 3) for i, c in zip(ids, counts)}


def single_methods(interval: int, warmup: int, steps: int, blocks: int, dim: int, head: int | None) -> list[Method]:
    """Every solver of the pool alone, guard off: on the paper's schedule, on the one with
    the short first interval HyCa's probe may choose (:meth:`Schedule.short_start`), and
    forecasting the output head's input (``head``: its width; None: no head)."""
    from ..profiles.profile import Profile

    methods = [engine(SINGLE + name, name, interval, warmup, False) for name in pool_names()]
    if head is not None:
        for name in pool_names():
            profile = Profile.uniform(name, 1, head)
            profile.metadata["target"] = "output"
            methods.append(engine(SINGLE_OUTPUT + name, profile, interval, warmup, False))
    short = Schedule(interval, warmup).short_start(steps)
    if short is not None:
        for name in pool_names():
            profile = Profile.uniform(name, blocks, dim)
            profile.metadata.update(interval=interval, warmup=warmup, first_interval=short.first_interval)
            methods.append(engine(SINGLE_SHORT + name, profile, interval, warmup, False))
    return methods


def taylorseer(interval: int, warmup: int, order: int, lite: bool) -> Method:
    from diffusers import TaylorSeerCacheConfig

    def enable(pipe: Any) -> None:
        pipe.transformer.enable_cache(TaylorSeerCacheConfig(
            cache_interval=interval, disable_cache_before_step=warmup, max_order=order,
            taylor_factors_dtype=torch.float32, use_lite_mode=lite))

    return Method(f"{TS_LITE if lite else TS_FULL} o{order}", enable, lambda pipe: pipe.transformer.disable_cache())


def magcache(work: Workload, cell: tuple, settings: GridSettings, target_ratio: float,
             ratio_of: Callable[[m.Method], float]) -> tuple[Method, dict]:
    """MagCache with its own calibration (a fully computed run per calibration caption,
    averaged) and its threshold searched to ``target_ratio`` of full compute's FLOPs."""
    steps, guidance, _, _ = cell
    runs = [m.calibrate_mag_ratios(work.pipe, lambda i=i: work.pipe(
        work.calibration[i:i + 1], num_inference_steps=steps, guidance_scale=guidance,
        latents=work.calibration_latents[i:i + 1].clone(), output_type="pt"), steps)
        for i in range(len(work.calibration))]
    ratios = [sum(r[k] for r in runs) / len(runs) for k in range(steps)]
    found = search(lambda t: m.mag_cache(t, ratios, steps), ratio_of, target_ratio,
                   iterations=settings.search_iterations)
    chosen = found.method
    info = {"threshold": chosen.knob, "calibration_ratio": round(found.ratio, 4), "target": round(target_ratio, 4),
            "matched": found.matched, "reachable": found.reachable}
    return Method(MAGCACHE, chosen.enable, chosen.disable, adaptive=True, info=info), info


def run_cell(work: Workload, cell: tuple, settings: GridSettings) -> dict:
    steps, guidance, shift, interval = cell
    started = time.perf_counter()
    with shifted(work.pipe, shift):
        full_flops = TransformerFlops()
        full = work.generate(steps, guidance, count=full_flops)
        methods, info = hyca_methods(work, cell, settings)
        methods += fixed_methods(work, cell, settings)
        computed = sum(Schedule(interval, settings.warmup).plan(steps))
        calibration_full = TransformerFlops()
        work.generate(steps, guidance, calibration=True, count=calibration_full, count_batches=10 ** 6)

        def ratio_of(method: m.Method) -> float:
            counted = TransformerFlops()
            method.enable(work.pipe)
            try:
                work.generate(steps, guidance, calibration=True, count=counted, count_batches=10 ** 6)
            finally:
                method.disable(work.pipe)
            return counted.total / calibration_full.total

        target = computed / steps  # HyCa's schedule: the same FLOPs on every prompt
        mag, info["magcache"] = magcache(work, cell, settings, target, ratio_of)
        methods.append(mag)
        rows = [measure(work, method, cell, full, full_flops) for method in methods]
    return {"cell": dict(steps=steps, guidance=guidance, shift=shift, interval=interval), "rows": rows,
            "info": info, "seconds": round(time.perf_counter() - started, 1)}


def measure(work: Workload, method: Method, cell: tuple, full: torch.Tensor, full_flops: TransformerFlops) -> dict:
    steps, guidance, _, _ = cell
    flops = TransformerFlops()
    method.enable(work.pipe)
    try:
        images = work.generate(method.steps or steps, guidance, count=flops,
                               count_batches=10 ** 6 if method.adaptive else 1)
        stats = [s.describe() for s in hyca.stats(work.pipe)] if hyca.is_enabled(work.pipe) else []
    finally:
        method.disable(work.pipe)
    batches = -(-len(work.prompts) // work.batch) if method.adaptive else 1
    reference_flops = full_flops.total * batches  # full compute counted on the first batch only
    psnrs = [min(psnr(a, b), PSNR_CAP) for a, b in zip(images, full)]
    return {"method": method.name, "flops_speedup": round(reference_flops / flops.total, 4),
            "psnr": float(np.mean(psnrs)), "ssim": float(np.mean([ssim(a, b) for a, b in zip(images, full)])),
            "psnr_per_prompt": [round(p, 3) for p in psnrs], "info": method.info, "stats": stats[:1]}


def run(settings: GridSettings, out: Path, shard: tuple[int, int] = (0, 1), resume: bool = False,
        pipe: Any = None, log: Callable[[str], None] = print) -> list[dict]:
    """Run the cells of ``shard`` (index, count) not yet in ``out`` (JSON lines), appending each."""
    from .workload import load

    torch.set_num_threads(settings.threads)
    pipe = pipe if pipe is not None else load(settings.model, settings.model_path)
    work = Workload(pipe, settings)
    done = {_key(r["cell"]) for r in read(out)} if resume else set()
    if not resume and out.exists():
        out.unlink()
    out.parent.mkdir(parents=True, exist_ok=True)
    results = []
    for i, cell in enumerate(settings.cells()):
        if i % shard[1] != shard[0] or _key(dict(zip(("steps", "guidance", "shift", "interval"), cell))) in done:
            continue
        result = run_cell(work, cell, settings)
        result["settings"] = asdict(settings)
        with out.open("a") as f:
            f.write(json.dumps(result) + "\n")
        results.append(result)
        hy = next(r for r in result["rows"] if r["method"] == HYCA)
        log(f"cell steps={cell[0]} guidance={cell[1]} shift={cell[2]} N={cell[3]}: HyCa {hy['psnr']:.2f} dB, "
            f"margin over best single {margins(result)['single']:+.2f} dB ({result['seconds']:.0f} s)")
    return results


def remeasure(settings: GridSettings, out: Path, names: list[str], pipe: Any = None,
              log: Callable[[str], None] = print) -> list[dict]:
    """Measure the methods ``names`` again in every cell of ``out`` and replace their rows
    (marked in the cell's ``remeasured``): after a change that touches only them, without
    the hours of a full run. :func:`fixed_methods` and the plain call (:data:`HYCA`, which
    probes on first use) can be measured again this way.

    Raises ``ValueError`` for a name that is not one of them."""
    from .workload import load

    cells = read(out)
    if not cells:
        return []
    torch.set_num_threads(settings.threads)
    pipe = pipe if pipe is not None else load(settings.model, settings.model_path)
    work = Workload(pipe, settings)
    for result in cells:
        cell = tuple(result["cell"][k] for k in ("steps", "guidance", "shift", "interval"))
        started = time.perf_counter()
        with shifted(work.pipe, cell[2]):
            available = {m.name: m for m in [*fixed_methods(work, cell, settings), plain_row(work, cell, settings)]}
            unknown = [n for n in names if n not in available]
            if unknown:
                raise ValueError(f"cannot measure {unknown} again (only {sorted(available)})")
            full_flops = TransformerFlops()
            full = work.generate(cell[0], cell[1], count=full_flops)
            rows = {n: measure(work, available[n], cell, full, full_flops) for n in names}
        result["rows"] = [rows.get(r["method"], r) for r in result["rows"]] + \
            [row for n, row in rows.items() if n not in {r["method"] for r in result["rows"]}]
        result.setdefault("remeasured", []).extend(n for n in names if n not in result.get("remeasured", []))
        log(f"cell {cell}: measured {', '.join(names)} again ({time.perf_counter() - started:.0f} s)")
    temporary = out.with_suffix(".tmp")
    temporary.write_text("".join(json.dumps(c) + "\n" for c in cells))
    temporary.replace(out)
    return cells


def _key(cell: dict) -> tuple:
    return (cell["steps"], float(cell["guidance"]), float(cell["shift"]), cell["interval"])


def read(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def margins(result: dict) -> dict[str, Any]:
    """HyCa's PSNR margin over the best single solver and over the best peer that is at
    least as fast (FLOPs speed-up within 5% of HyCa's or more), with their names."""
    rows = {r["method"]: r for r in result["rows"]}
    hy = rows[HYCA]
    singles = {k: r for k, r in rows.items() if k.startswith(SINGLES)}
    best_single = max(singles, key=lambda k: singles[k]["psnr"])
    fast = {k: rows[k] for k in PEERS if k in rows and rows[k]["flops_speedup"] >= 0.95 * hy["flops_speedup"]}
    best_peer = max(fast, key=lambda k: fast[k]["psnr"]) if fast else None
    return {"single": hy["psnr"] - singles[best_single]["psnr"],
            "best_single": best_single.replace(SINGLE_SHORT, "short: ").replace(SINGLE_OUTPUT, "output: ")
            .replace(SINGLE, ""),
            "peer": hy["psnr"] - fast[best_peer]["psnr"] if best_peer else None, "best_peer": best_peer}


__all__ = ["GridSettings", "QUICK", "margins", "read", "remeasure", "run", "run_cell"]
