"""What the plain call's probe costs and buys, per default (issue 21 items 3 and 6).

    OMP_NUM_THREADS=1 python -m hyca.bench.probe_defaults --grid "before=OLD.json" --grid "now=NEW.json" \
        [--out bench/results/probe_defaults.md]

Each probe configuration is timed as ``hyca.enable(pipe, interval=N)`` runs it on first use
(``hyca.probe`` on the reference pipeline's own captions, 28 steps, N=4, warm-up 3, one CPU
thread), unguided and at guidance 2.5; the grid reports given with ``--grid`` (the plain
call's row, ``python -m hyca.bench --grid``, each made with one configuration) give the
held-out quality it bought: grid mean, and the margins the issue's bars name (the best
single solver, plain reuse), mean and worst over the cells.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import hyca
from hyca.bench.grid_plain import HYCA
from hyca.math.solvers import pool_names
from hyca.probing import CALIBRATION_SAMPLES, SINGLES

#: (label, calibration captions, single solvers tried alone): the defaults before and now.
CONFIGURATIONS = [("2 captions, every single (before)", 2, tuple(pool_names())),
                  (f"{CALIBRATION_SAMPLES} captions, SINGLES (now)", CALIBRATION_SAMPLES, SINGLES)]
REUSE = "single: reuse"


def probe_seconds(pipe, captions: int, singles: tuple[str, ...], guidance: float) -> tuple[float, int]:
    """Seconds and cached runs of one first-use probe at 28 steps, N=4 (a trial that took an
    earlier candidate's run, ``same_as``, is not a run)."""
    prompt = pipe.hyca_probe_defaults["prompt"][:captions]
    started = time.perf_counter()
    profile = hyca.probe(pipe, prompt=prompt, steps=28, interval=4, warmup=3, guidance_scale=guidance,
                         singles=list(singles), progress=False)
    trials = profile.metadata["selection"]["closed_loop"]["trials"]
    return time.perf_counter() - started, sum("same_as" not in t for t in trials)


def grid_quality(path: Path) -> dict[str, float]:
    """The plain call's grid mean and its margins over the best single solver and reuse (dB)."""
    cells = json.loads(path.read_text())["cells"]
    ours, best, reuse = [], [], []
    for cell in cells:
        rows = {r["method"]: r["psnr"] for r in cell["rows"]}
        singles = [v for k, v in rows.items() if k.startswith("single")]
        ours.append(rows[HYCA])
        best.append(rows[HYCA] - max(singles))
        reuse.append(rows[HYCA] - rows[REUSE])
    return {"cells": len(cells), "mean": statistics.fmean(ours), "best_mean": statistics.fmean(best),
            "best_worst": min(best), "best_within": sum(m >= -0.5 for m in best),
            "reuse_worst": min(reuse), "reuse_within": sum(m >= -0.2 for m in reuse)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", action="append", default=[], metavar="LABEL=PATH",
                        help="a grid report (.json) made with one configuration")
    parser.add_argument("--out", type=Path, default=Path("bench/results/probe_defaults.md"))
    args = parser.parse_args()
    grids = [(label, grid_quality(Path(path))) for label, path in (g.split("=", 1) for g in args.grid)]  # fail fast
    torch.set_num_threads(1)
    from hyca.reference import load_pipeline

    pipe = load_pipeline()
    lines = ["# The plain call's probe: cost and quality per default", "",
             "Command: `OMP_NUM_THREADS=1 python -m hyca.bench.probe_defaults "
             + " ".join(f'--grid "{g}"' for g in args.grid) + "`", "",
             "Probe: `hyca.probe` on the reference model's own captions, 28 steps, N=4, warm-up 3, one CPU "
             "thread (seconds of one probe; cached runs of its closed loop).", "",
             "| configuration | guidance 1: s | runs | guidance 2.5: s | runs |", "|---|---|---|---|---|"]
    for label, captions, singles in CONFIGURATIONS:
        cells = [probe_seconds(pipe, captions, singles, guidance) for guidance in (1.0, 2.5)]
        lines.append(f"| {label} | " + " | ".join(f"{s:.1f} | {n}" for s, n in cells) + " |")
        print(lines[-1], flush=True)
    if args.grid:
        lines += ["", "Held-out quality of the plain call's row on the grid (dB; margins per cell):", "",
                  "| grid | cells | mean | vs best single: mean | worst | cells >= -0.5 | vs reuse: worst | "
                  "cells >= -0.2 |", "|---|---|---|---|---|---|---|---|"]
        for label, q in grids:
            lines.append(f"| {label} | {q['cells']} | {q['mean']:.2f} | {q['best_mean']:+.2f} | {q['best_worst']:+.2f} | "
                         f"{q['best_within']} | {q['reuse_worst']:+.2f} | {q['reuse_within']} |")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
