"""Where HyCa's wall-clock goes, when its wall-clock speed-up falls short of its FLOPs one.

Per-call times (a pre- and a post-hook on the transformer) in a fully computed run and a
HyCa run: a computed call, a skip call, the same transformer with its block lists
emptied (what a skip step that enters the transformer must still run: embeddings, RoPE,
norm_out, proj_out; a model-output profile's skip step does not enter it), and the
pipeline's time outside the transformer per step (scheduler, token ids). From these, the
speed-up of a block-hook cache at its floor (a skip call costing only the block-less
transformer) separates what HyCa adds from what such a cache cannot remove.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import time
from typing import Any, Iterator

import torch

import hyca

from .methods import WARMUP
from .workload import Case, generate


class CallTimes:
    def __init__(self) -> None:
        self.calls: list[float] = []

    def _before(self, module: Any, args: tuple) -> None:
        self.calls.append(-time.perf_counter())

    def _after(self, module: Any, args: tuple, output: Any) -> None:
        self.calls[-1] += time.perf_counter()

    @contextlib.contextmanager
    def attached(self, transformer: torch.nn.Module) -> Iterator["CallTimes"]:
        # first before and last after every other hook: a call's time includes HyCa's root
        # hook on both sides (its pre-hook alone is most of HyCa's per-call bookkeeping)
        handles = [transformer.register_forward_pre_hook(self._before, prepend=True),
                   transformer.register_forward_hook(self._after)]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()


@contextlib.contextmanager
def without_blocks(transformer: torch.nn.Module) -> Iterator[None]:
    saved = transformer.transformer_blocks, transformer.single_transformer_blocks
    transformer.transformer_blocks = torch.nn.ModuleList()
    transformer.single_transformer_blocks = torch.nn.ModuleList()
    try:
        yield
    finally:
        transformer.transformer_blocks, transformer.single_transformer_blocks = saved


def _timed(pipe: Any, case: Case, steps: int) -> tuple[float, list[float]]:
    times = CallTimes()
    with times.attached(pipe.transformer):
        started = time.perf_counter()
        generate(pipe, case, steps)
        total = time.perf_counter() - started
    return total, times.calls


@contextlib.contextmanager
def swapped(pipe: Any, transformer: torch.nn.Module) -> Iterator[None]:
    original, pipe.transformer = pipe.transformer, transformer
    try:
        yield
    finally:
        pipe.transformer = original


def decompose(pipe: Any, case: Case, steps: int, interval: int, profile: Any, repeats: int = 3) -> dict:
    """Medians over ``repeats`` interleaved runs, in milliseconds, and the derived speed-ups.
    HyCa is switched on once, on its own copy of the transformer, and warmed up by one
    generation: steady use, as in the benchmark's timed runs."""
    accelerated = copy.deepcopy(pipe.transformer)
    (engine,) = hyca.enable(accelerated, profile=profile, interval=interval, warmup=WARMUP, scheduler=pipe.scheduler)
    # the engine's schedule: a profile may start with a short first interval (Schedule.first_interval)
    plan = engine.schedule.plan(steps)
    computed = sum(plan)
    with swapped(pipe, accelerated):
        generate(pipe, case, steps)
    full_calls, compute_calls, skip_calls, bare_calls, outside, full_totals, hyca_totals = [], [], [], [], [], [], []
    for _ in range(repeats):
        total, calls = _timed(pipe, case, steps)
        full_calls += calls
        full_totals.append(total)
        outside.append((total - sum(calls)) / steps)
        with swapped(pipe, accelerated):
            total, calls = _timed(pipe, case, steps)
        hyca_totals.append(total)
        compute_calls += [c for c, p in zip(calls, plan) if p]
        skip_calls += [c for c, p in zip(calls, plan) if not p]
        with without_blocks(pipe.transformer):
            bare_calls += _timed(pipe, case, steps)[1]
    ms = lambda values: 1e3 * statistics.median(values)  # noqa: E731
    full, compute, skip, bare, out = ms(full_calls), ms(compute_calls), ms(skip_calls), ms(bare_calls), ms(outside)
    flops_like = steps / computed  # the speed-up if skip steps cost nothing at all
    ideal = steps * (full + out) / (computed * full + (steps - computed) * bare + steps * out)
    modelled = steps * (full + out) / (computed * compute + (steps - computed) * skip + steps * out)
    measured = statistics.median(full_totals) / statistics.median(hyca_totals)
    return {"interval": interval, "steps": steps, "computed": computed, "full_call_ms": full,
            "hyca_compute_call_ms": compute, "hyca_skip_call_ms": skip, "blockless_call_ms": bare,
            "outside_transformer_ms_per_step": out, "steps_ratio": flops_like, "ideal_cache_speedup": ideal,
            "modelled_hyca_speedup": modelled, "measured_hyca_speedup": measured}


def compare_calls(pipe: Any, case: Case, steps: int, methods: list[Any], repeats: int = 8) -> list[dict]:
    """Per-call times of several caches in one process, their runs interleaved (rotated each
    repeat), so the machine's drift falls alike on all (``methods``: benchmark
    :class:`~hyca.bench.methods.Method` s, each switched on once on its own copy of the
    transformer and warmed up by one generation; the first is full compute).

    A call counts as computed when it takes at least half the full call's median (a skip
    call runs only the embeddings, RoPE and the output layers, well under half of it): the
    split needs no method's own schedule. Per method, in milliseconds (medians): computed
    and skip call, the whole run and its time outside the transformer calls (the pipeline's
    loop, and a cache's work around the pipeline call); the count of each kind of call per run."""
    from .runner import prepare

    prepared = [prepare(pipe, method) for method in methods]
    for transformer in prepared:
        with swapped(pipe, transformer):
            generate(pipe, case, steps)
    calls: list[list[float]] = [[] for _ in methods]
    totals: list[list[float]] = [[] for _ in methods]
    outside: list[list[float]] = [[] for _ in methods]  # per run: the pipeline's time outside the transformer
    for r in range(repeats):
        for i in [*range(r % len(methods), len(methods)), *range(r % len(methods))]:
            with swapped(pipe, prepared[i]):
                total, times = _timed(pipe, case, steps)
            calls[i] += times
            totals[i].append(total)
            outside[i].append(total - sum(times))
    full = statistics.median(calls[0])
    rows = []
    for method, times, runs, rest in zip(methods, calls, totals, outside):
        dear = [t for t in times if t >= full / 2]
        cheap = [t for t in times if t < full / 2]
        rows.append({"method": method.name, "computed_calls": len(dear) / repeats, "skip_calls": len(cheap) / repeats,
                     "computed_call_ms": 1e3 * statistics.median(dear) if dear else None,
                     "skip_call_ms": 1e3 * statistics.median(cheap) if cheap else None,
                     "run_ms": 1e3 * statistics.median(runs), "outside_ms": 1e3 * statistics.median(rest)})
    return rows
