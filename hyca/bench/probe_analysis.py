"""Benchmark (not a test): the probe's cost for FLUX.1-dev-sized features, on this CPU.

Part 1 feeds synthetic sketches of FLUX.1-dev's shape (57 blocks x 3072 dims, 50 steps,
8 sketch rows) through the probe's online consumers (incremental indicators, schedule
replay) and times, separately, the per-step work during the run and the analysis after
it (indicators from the accumulators + k-means + selection + report): what a user waits
for once the last step is done. It also reports the memory the recording holds.

Part 2 (``--stability``) measures how stable the labels are on the tiny FLUX model of the
tests: the adjusted Rand index between profiles probed with two prompts and with two
resolutions.

    python -m hyca.bench.probe_analysis [--steps 50] [--blocks 57] [--dim 3072] [--stability]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from hyca.engine.schedule import Schedule
from hyca.math.indicators import IndicatorAccumulator
from hyca.math.selection import ReplayErrors
from hyca.probing import analyse


def synthetic_sketches(steps: int, blocks: int, rows: int, dim: int, seed: int = 0):
    """One step's (blocks, rows, dim) sketch at a time: a mix of smooth, oscillating,
    noisy and nearly constant dimensions, so k-means has real structure to find."""
    rng = np.random.default_rng(seed)
    kind = rng.integers(0, 4, size=dim)
    scale = np.exp(rng.normal(0, 1, size=(blocks, 1, dim)))
    coeff = rng.normal(size=(4, blocks, rows, dim))
    omega = rng.uniform(0.5, 1.5, size=(1, 1, dim))
    phase = rng.uniform(0, 2 * np.pi, size=(blocks, rows, dim))
    for k in range(steps):
        u = k / steps
        smooth = coeff[0] + coeff[1] * u + coeff[2] * u**2 + coeff[3] * u**3
        values = np.where(kind == 0, smooth,
                 np.where(kind == 1, np.sin(omega * k + phase),
                 np.where(kind == 2, coeff[0] + rng.normal(size=smooth.shape), coeff[0] + 1e-3 * u)))
        yield torch.tensor(scale * values, dtype=torch.float32)


def held_bytes(acc: IndicatorAccumulator, replay: ReplayErrors) -> int:
    tensors = [acc._coefficients, *acc._window, *acc._sums.values(), *replay._history,
               replay._errors, replay._energy]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def analysis_benchmark(steps: int, blocks: int, dim: int, rows: int, spectral_rows: int,
                       clusters: int, n_init: int) -> None:
    acc = IndicatorAccumulator(blocks, dim, steps, spectral_rows)
    replay = ReplayErrors(Schedule(interval=5, warmup=3).plan(steps))
    step_seconds = []
    for step, sketch in enumerate(synthetic_sketches(steps, blocks, rows, dim)):
        started = time.perf_counter()
        acc.update(sketch)
        replay.update(sketch, float(step))
        step_seconds.append(time.perf_counter() - started)
    memory = held_bytes(acc, replay)

    started = time.perf_counter()
    values = acc.finalize()
    finalized = time.perf_counter()
    result = replay.result()
    profile, report = analyse(values, result, clusters=clusters, seed=0, n_init=n_init)
    done = time.perf_counter()

    print(f"shape: {steps} steps x {blocks} blocks x {rows} rows x {dim} dims "
          f"(spectral rows {spectral_rows}), k={clusters}, n_init={n_init}")
    print(f"during the run, per step: accumulate {1e3 * np.mean(step_seconds):.1f} ms mean, "
          f"{1e3 * np.max(step_seconds):.1f} ms max; {np.sum(step_seconds):.2f} s over {steps} steps")
    print(f"held by the recording at the end: {memory / 2**20:.1f} MiB")
    print(f"analysis after recording: {done - started:.2f} s "
          f"(indicators {finalized - started:.2f} s, k-means + selection + report {done - finalized:.2f} s)")
    print(f"profile: labels {tuple(profile.labels.shape)}, solvers used {profile.solver_names()}, "
          f"replay error {report['replay_error']['profile']} vs reuse {report['replay_error']['uniform']['reuse']}")


def stability_benchmark() -> None:
    """ARI between tiny-model profiles from two prompts and from two resolutions."""
    from sklearn.metrics import adjusted_rand_score

    tests = Path(__file__).resolve().parents[2] / "tests"  # the tiny FLUX of the test suite: a source checkout
    if not (tests / "tiny.py").is_file():
        raise SystemExit(f"--stability uses the test suite's tiny model ({tests / 'tiny.py'}): run it from a "
                         "source checkout of HyCa")
    sys.path.insert(0, str(tests))
    from tiny import tiny_flux, tiny_pipeline

    from hyca import probe

    pipe = tiny_pipeline(tiny_flux())

    def conditioning(seed):
        g = torch.Generator().manual_seed(seed)
        return dict(prompt_embeds=torch.randn(1, 5, 32, generator=g),
                    pooled_prompt_embeds=torch.randn(1, 24, generator=g))

    def profile(prompt_seed, side, shared, sigmas):
        extra = {} if sigmas is None else {"sigmas": sigmas}
        return probe(pipe, height=side, width=side, steps=16, interval=3, warmup=2, clusters=3, shared=shared,
                     progress=False, **conditioning(prompt_seed), **extra)

    def ari(a, b):
        return float(np.mean([adjusted_rand_score(x, y) for x, y in zip(a.labels.numpy(), b.labels.numpy())]))

    for window, sigmas in (("full 1 -> 0 schedule", None), ("narrow sigma window 0.5 -> 0.495",
                                                           list(np.linspace(0.5, 0.495, 16)))):
        for shared in (False, True):
            base = profile(0, 64, shared, sigmas)
            other_prompt = profile(1, 64, shared, sigmas)
            other_size = profile(0, 96, shared, sigmas)
            labelling = "shared" if shared else "per block"
            print(f"tiny FLUX, {window}, {labelling} labels, k=3: ARI two prompts "
                  f"{ari(base, other_prompt):.3f}, two resolutions (64 vs 96 px) {ari(base, other_size):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m hyca.bench.probe_analysis",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--blocks", type=int, default=57)
    parser.add_argument("--dim", type=int, default=3072)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--spectral-rows", type=int, default=2)
    parser.add_argument("--clusters", type=int, default=4)
    parser.add_argument("--n-init", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (on a busy 2-core machine, 2 threads ran 10x slower than 1)")
    parser.add_argument("--stability", action="store_true", help="also measure label stability on the tiny model")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}")
    analysis_benchmark(args.steps, args.blocks, args.dim, args.rows, args.spectral_rows, args.clusters, args.n_init)
    if args.stability:
        stability_benchmark()


if __name__ == "__main__":
    main()
