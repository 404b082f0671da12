"""Probe cost against quality (issue 21 item 3) on the reference model.

For a few grid cells (steps, guidance, shift, N), the closed-loop probe is run with fewer
calibration captions and fewer candidate solvers; each profile is then used (guard on) on
the grid's held-out captions and seeds, and its PSNR against full compute is put next to
the probe's time and the best single solver of the pool on the same images.

    OMP_NUM_THREADS=1 python -m hyca.bench.probe_cost [--prompts 8] [--out bench/results/probe_cost.md]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

import hyca
from hyca.bench.grid import PSNR_CAP, GridSettings, Workload, shifted
from hyca.bench.metrics import psnr
from hyca.math.solvers import pool_names

CELLS = [(28, 2.5, 3.0, 6), (50, 1.0, 3.0, 4), (20, 2.5, 1.0, 4)]
#: (label, calibration captions, candidate solvers; None = the whole pool)
VARIANTS = [("default: 8 captions, 11 candidates", 8, None),
            ("4 captions, 11 candidates", 4, None),
            ("2 captions, 11 candidates", 2, None),
            ("8 captions, 4 candidates", 8, ("reuse", "taylor-1", "taylor-2", "lagrange-3")),
            ("2 captions, 4 candidates", 2, ("reuse", "taylor-1", "taylor-2", "lagrange-3"))]
WARMUP = 3


def held_out_psnr(work: Workload, cell: tuple, full: torch.Tensor, profile) -> float:
    steps, guidance, _, interval = cell
    hyca.enable(work.pipe, profile=profile, interval=interval, warmup=WARMUP, guard=True)
    try:
        images = work.generate(steps, guidance)
    finally:
        hyca.disable(work.pipe)
    return float(np.mean([min(psnr(a, b), PSNR_CAP) for a, b in zip(images, full)]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=8, help="held-out captions per cell")
    parser.add_argument("--out", type=Path, default=Path("bench/results/probe_cost.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    from hyca.reference import load_pipeline

    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for cell in CELLS:
        steps, guidance, shift, interval = cell
        work = Workload(pipe, replace(GridSettings(), prompts=args.prompts, batch=args.prompts, calibration_prompts=8))
        with shifted(pipe, shift):
            full = work.generate(steps, guidance)
            singles = {name: held_out_psnr(work, cell, full, name) for name in pool_names()}
            best_name = max(singles, key=singles.get)
            for label, captions, candidates in VARIANTS:
                started = time.perf_counter()
                profile = hyca.probe(pipe, prompt=work.calibration[:captions], height=work.size, width=work.size,
                                     steps=steps, interval=interval, warmup=WARMUP, guidance_scale=guidance,
                                     latents=work.calibration_latents[:captions].clone(), output_type="pt",
                                     progress=False, candidates=candidates)
                seconds = time.perf_counter() - started
                quality = held_out_psnr(work, cell, full, profile)
                rows.append((cell, label, seconds, quality, quality - singles[best_name], best_name,
                             profile.metadata["selection"].get("closed_loop", {}).get("chosen")))
                print(rows[-1], flush=True)
    lines = ["# Probe cost against quality (reference model, one CPU thread)", "",
             f"Command: `OMP_NUM_THREADS=1 python -m hyca.bench.probe_cost --prompts {args.prompts}` "
             "(held-out captions and seeds of the grid; HyCa with the guard on).", "",
             "| cell (steps, guidance, shift, N) | probe | probe s | HyCa PSNR | vs best single | best single | "
             "closed-loop choice |", "|---|---|---|---|---|---|---|"]
    for cell, label, seconds, quality, margin, best, chosen in rows:
        lines.append(f"| {cell} | {label} | {seconds:.1f} | {quality:.2f} | {margin:+.2f} | {best} | {chosen} |")
    lines += ["", "Per probe setting, over the cells:", "", "| probe | mean s | mean margin | worst margin |",
              "|---|---|---|---|"]
    for label, _, _ in VARIANTS:
        mine = [r for r in rows if r[1] == label]
        lines.append(f"| {label} | {statistics.mean(r[2] for r in mine):.1f} | "
                     f"{statistics.mean(r[4] for r in mine):+.2f} | {min(r[4] for r in mine):+.2f} |")
    args.out.write_text("\n".join(lines) + "\n")
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
