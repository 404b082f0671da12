"""The engine's own time per step, without a model (issue 20 item 8): the calls a host
makes on the reference model's shapes, 50 steps, with eq. 5's profile for N on the reference
model (50 steps, no guidance, one caption: deterministic, and the profile the repository
shipped for N until the shipped ones were chosen closed loop).

    python -m hyca.bench.engine_calls [N]
    PYTHONPATH=<other checkout> python -m hyca.bench.engine_calls [N]   # another engine

A computed step is ``begin_step`` + one ``record`` per block (6 blocks, residuals
``(1, 64, 128)`` like the reference model's) + ``end_step`` (with the guard's check on a
judged step); a skip step is ``begin_step`` + ``predicted_residual`` + ``end_step``. The
minimum over repeats of each run's mean (the machine is shared: the minimum is the least
disturbed), microseconds, one torch thread.
"""

from __future__ import annotations

import sys
import time
import torch

from hyca.engine import HybridCache, Schedule
from hyca.profiles.profile import Profile

STEPS, BLOCKS, SHAPE = 50, 6, (1, 64, 128)


def eq5_profile(interval: int) -> Profile:
    """Eq. 5's choice for N on the reference model (4 clusters per block, mixed solvers)."""
    import hyca
    from hyca.reference import load_pipeline

    return hyca.probe(load_pipeline(), prompt=["a large red circle at the center on a white background"], steps=50,
                      interval=interval, warmup=3, selection="eq5", progress=False)


def one_run(engine: HybridCache, residuals: list[list[torch.Tensor]]) -> tuple[list[float], list[float]]:
    state = engine.new_state()
    computed, skipped = [], []
    for step in range(STEPS):
        started = time.perf_counter()
        if engine.begin_step(state, 1.0 - step / STEPS, SHAPE, STEPS):
            for block in range(BLOCKS):
                engine.record(state, block, residuals[step][block])
            engine.end_step(state)
            computed.append(time.perf_counter() - started)
        else:
            engine.predicted_residual(state)
            engine.end_step(state)
            skipped.append(time.perf_counter() - started)
    engine.forget_runs()
    return computed, skipped


def main() -> None:
    interval = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    torch.set_num_threads(1)
    profile = eq5_profile(interval)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, BLOCKS, *SHAPE, generator=g)
    residuals = [[base[0, b] + 0.02 * step * base[1, b] + 0.001 * step * step * base[2, b] for b in range(BLOCKS)]
                 for step in range(STEPS)]
    for guard in (True, False):
        engine = HybridCache(profile, Schedule(interval, 3), guard=guard, compare_settings=False)
        best_c = best_s = float("inf")
        for _ in range(30):
            c, s = one_run(engine, residuals)
            best_c, best_s = min(best_c, sum(c) / len(c)), min(best_s, sum(s) / len(s))
        print(f"N={interval}, guard {'on ' if guard else 'off'}, {len(engine.solvers)} solver slots: "
              f"computed step {1e6 * best_c:7.1f} us, skip step {1e6 * best_s:6.1f} us")


if __name__ == "__main__":
    main()
