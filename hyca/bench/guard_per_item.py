"""What per-image guard decisions cost (issue 18 item 1): the guard's time at a judged
computed step, one branch and two guidance branches, batch 1 and 3, on the CPU.

    python -m hyca.bench.guard_per_item                      # this checkout's engine
    PYTHONPATH=<other checkout> python -m hyca.bench.guard_per_item   # another engine, same shapes

The engine is driven directly (no model): one block reporting a ``(batch, tokens, dim)``
residual per computed step, a profile whose dimensions split over four solvers (reuse,
taylor-1, taylor-2, lagrange-3), N=4, warm-up 3, 30 steps (judged checks at steps 10, 14,
18, 22, 26). The guard's time is ``end_step`` with the guard on minus with it off, at those
steps; medians over repeats, milliseconds per branch and step.
"""

from __future__ import annotations

import statistics
import time

import torch

from hyca.engine import HybridCache, Schedule
from hyca.math.solvers import pool_names
from hyca.profiles import Profile

SOLVERS = ("reuse", "taylor-1", "taylor-2", "lagrange-3")
STEPS, INTERVAL, WARMUP, TOKENS, DIM = 30, 4, 3, 1024, 768


def profile() -> Profile:
    labels = (torch.arange(DIM) * len(SOLVERS) // DIM).expand(1, DIM)
    ids = torch.tensor([pool_names().index(s) for s in SOLVERS]).expand(1, len(SOLVERS))
    return Profile(labels=labels, solvers=ids)


def run(batch: int, branches: int, guard: bool) -> list[float]:
    """Seconds of end_step at each judged step, per branch."""
    engine = HybridCache(profile(), Schedule(INTERVAL, WARMUP), guard=guard, compare_settings=False)
    states = [engine.new_state() for _ in range(branches)]
    g = torch.Generator().manual_seed(0)
    base = torch.randn(2, batch, TOKENS, DIM, generator=g)
    judged = []
    for step in range(STEPS):
        for b, state in enumerate(states):
            if engine.begin_step(state, float(STEPS - step), (batch, TOKENS, DIM), STEPS):
                engine.record(state, 0, base[0] + 0.1 * step * base[1] + 0.01 * b * torch.randn(1, generator=g))
                started = time.perf_counter()
                engine.end_step(state)
                if step in (10, 14, 18, 22, 26):
                    judged.append(time.perf_counter() - started)
            else:
                engine.predicted_residual(state)
                engine.end_step(state)
    return judged


def main(repeats: int = 5) -> None:
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {TOKENS} tokens x {DIM} dims, 4 solver slots, 1 thread; ms per branch "
          "and judged step (median of the guard-on minus guard-off end_step)")
    for branches in (1, 2):
        for batch in (1, 3):
            on = statistics.median(t for _ in range(repeats) for t in run(batch, branches, True))
            off = statistics.median(t for _ in range(repeats) for t in run(batch, branches, False))
            name = "branches" if branches > 1 else "branch  "
            print(f"  {branches} {name}, batch {batch}: guard {1e3 * (on - off):7.2f} ms"
                  f"  ({1e3 * (on - off) / batch:6.2f} ms per image)")


if __name__ == "__main__":
    main()
