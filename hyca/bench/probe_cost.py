"""Probe cost against quality (issue 21 items 3 and 6) on the reference model.

For grid cells (steps, guidance, shift, N) the closed-loop probe is run with several
settings: calibration captions, the rule that picks among scored candidates (the best
mean, or the simplest within one standard error / a dB margin of it), and successive
halving (every candidate screened on a quarter of the captions, the finalists run on the
rest). Each profile is then used (guard on) on the grid's held-out captions and seeds, and
its PSNR against full compute is put next to the probe's time and the best single solver
of the pool on the same images. The default in-process probe (``hyca.probe(pipe)`` on the
reference model's own defaults, 28 steps) is timed too.

    OMP_NUM_THREADS=1 python -m hyca.bench.probe_cost [--prompts 8] [--cells 0,1,2] [--out bench/results/probe_cost.md]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

import hyca
from hyca.bench.grid import PSNR_CAP, GridSettings, Workload, shifted
from hyca.bench.metrics import psnr
from hyca.math.solvers import pool_names
from hyca.probing import closed_loop, selection
from hyca.profiles.profile import Profile

#: (steps, guidance, shift, N): both step counts, guidance 1 / 2.5, shift 1 / 3, N 4 / 6 / 8
CELLS = [(28, 2.5, 3.0, 6), (50, 1.0, 3.0, 4), (28, 1.0, 1.0, 8), (50, 2.5, 3.0, 8), (28, 2.5, 1.0, 4),
         (50, 2.5, 1.0, 6)]
#: (calibration captions, successive halving): one probe each per cell
PROBES = [(8, False), (8, True), (4, True)]
#: (tolerance, label): every rule re-picks from the same probe's trials (what that probe with
#: this tolerance chooses: the pick is deterministic given the trials)
TOLERANCES = [("best", "best"), ("se", "simplest within 1 SE"), (0.5, "simplest within 0.5 dB")]
VARIANTS = [(f"{captions} captions, {label}, {'halving' if halving else 'every caption'}", captions, tol, halving)
            for captions, halving in PROBES for tol, label in TOLERANCES]
WARMUP = 3


@contextlib.contextmanager
def capturing() -> Iterator[dict]:
    """Every candidate profile the closed loop runs, in trial order, next to its trials
    (``closed_loop.choose`` wrapped for the duration; the probe calls it through the module)."""
    captured: dict = {}
    original = closed_loop.choose

    def choose(tracks, generate, reference, *args, **kwargs):
        profiles: list = []

        def recording(profile, *rest):
            profiles.append(profile)
            return generate(profile, *rest)

        result = original(tracks, recording, reference, *args, **kwargs)
        captured.update(trials=result[1], profiles=profiles)
        return result

    closed_loop.choose = choose
    try:
        yield captured
    finally:
        closed_loop.choose = original


def repicked(captured: dict, final, tolerance) -> tuple[str, object]:
    """The candidate the probe picks with ``tolerance`` from its captured trials (those run on
    every calibration sample), as a profile carrying the probe's metadata."""
    trials, profiles = captured["trials"], captured["profiles"]
    scored = [selection.Scored(t.name, 0 if t.name.startswith(("eq5", "uniform:")) else 1,
                               torch.tensor(t.per_sample_db or (t.fidelity_db,), dtype=torch.float64), ())
              for t in trials if not t.samples]
    name = selection.pick(scored, tolerance).name
    candidate = profiles[max(i for i, t in enumerate(trials) if t.name == name and not t.samples)]
    kept = {k: v for k, v in final.metadata.items() if k not in ("first_interval", "target")}
    return name, Profile(candidate.labels, candidate.solvers, {**kept, **candidate.metadata})


def held_out_psnr(work: Workload, cell: tuple, full: torch.Tensor, profile) -> float:
    steps, guidance, _, interval = cell
    hyca.enable(work.pipe, profile=profile, interval=interval, warmup=WARMUP, guard=True)
    try:
        images = work.generate(steps, guidance)
    finally:
        hyca.disable(work.pipe)
    return float(np.mean([min(psnr(a, b), PSNR_CAP) for a, b in zip(images, full)]))


def default_probe_seconds(pipe, repeats: int = 3) -> list[float]:
    """``hyca.probe(pipe)`` as a plain call runs it: the pipeline's own defaults, 28 steps."""
    out = []
    for _ in range(repeats):
        started = time.perf_counter()
        hyca.probe(pipe, steps=28, progress=False)
        out.append(time.perf_counter() - started)
    return out


def flux_call_tflops(side_px: int = 256, text_tokens: int = 512) -> float:
    """TFLOPs of one FLUX.1-dev transformer call at ``side_px`` (VAE 8x, patch 2), counted by
    ``FlopCounterMode`` on FLUX.1-dev's config built on the meta device (no weights)."""
    from diffusers import FluxTransformer2DModel
    from torch.utils.flop_counter import FlopCounterMode

    from hyca.bench.gpu import FLUX_DEV

    tokens = (side_px // 16) ** 2
    with torch.device("meta"):
        model = FluxTransformer2DModel(**FLUX_DEV).eval()
        inputs = dict(hidden_states=torch.randn(1, tokens, 64), encoder_hidden_states=torch.randn(1, text_tokens, 4096),
                      pooled_projections=torch.randn(1, 768), timestep=torch.ones(1), guidance=torch.ones(1),
                      img_ids=torch.zeros(tokens, 3), txt_ids=torch.zeros(text_tokens, 3), return_dict=False)
        with FlopCounterMode(display=False) as counted:
            model(**inputs)
    return counted.get_total_flops() / 1e12


def probe_block_calls(steps: int = 28, interval: int = 5, warmup: int = 3) -> tuple[int, int]:
    """Computed transformer calls of the default probe (``hyca.probe`` with its defaults, no
    guidance, as on guidance-distilled FLUX.1-dev), counted on the reference model: calls
    that enter the first block (recordings and cached runs' computed steps; a skip step's
    call runs no block, and a model-output candidate's none of the transformer). The count
    depends on the schedule and on which candidates run, not on the model's size. Returns
    the calls and the images each call carries (the calibration samples)."""
    from hyca.probing import CALIBRATION_SAMPLES
    from hyca.reference import load_pipeline

    pipe = load_pipeline()
    calls = []
    handle = pipe.transformer.transformer_blocks[0].register_forward_pre_hook(
        lambda module, args: calls.append(1))
    try:
        hyca.probe(pipe, steps=steps, interval=interval, warmup=warmup, progress=False)
    finally:
        handle.remove()
    return len(calls), CALIBRATION_SAMPLES


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=8, help="held-out captions per cell")
    parser.add_argument("--cells", default=",".join(str(i) for i in range(len(CELLS))),
                        help="indices into CELLS to run (comma-separated)")
    parser.add_argument("--rows", type=Path, help="also write the rows as JSON lines here (to merge runs)")
    parser.add_argument("--merge", type=Path, nargs="*", default=[], help="JSON-line row files to add to the table")
    parser.add_argument("--default-probe", action="store_true", help="time the default in-process probe")
    parser.add_argument("--flops", action="store_true", help="print the FLUX.1-dev 256 px probe's FLOPs and exit")
    parser.add_argument("--out", type=Path, default=Path("bench/results/probe_cost.md"))
    args = parser.parse_args()
    if args.flops:
        torch.set_num_threads(1)
        per_call, (calls, images) = flux_call_tflops(), probe_block_calls()
        print(f"FLUX.1-dev 256 px: {per_call:.2f} TFLOPs per image and call; the default probe (28 steps, N=5, "
              f"warm-up 3, no guidance) makes {calls} computed calls of {images} images each: "
              f"{calls * images * per_call / 1000:.2f} PFLOPs")
        return 0
    torch.set_num_threads(1)
    from hyca.reference import load_pipeline

    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    rows = [json.loads(line) for path in args.merge for line in path.read_text().splitlines() if line.strip()]
    for index in (int(i) for i in args.cells.split(",") if i.strip()):
        cell = CELLS[index]
        steps, guidance, shift, interval = cell
        work = Workload(pipe, replace(GridSettings(), prompts=args.prompts, batch=args.prompts, calibration_prompts=8))
        with shifted(pipe, shift):
            full = work.generate(steps, guidance)
            singles = {name: held_out_psnr(work, cell, full, name) for name in pool_names()}
            best_name = max(singles, key=singles.get)
            evaluated: dict[str, float] = {}
            for captions, halving in PROBES:
                started = time.perf_counter()
                with capturing() as captured:
                    final = hyca.probe(pipe, prompt=work.calibration[:captions], height=work.size, width=work.size,
                                       steps=steps, interval=interval, warmup=WARMUP, guidance_scale=guidance,
                                       latents=work.calibration_latents[:captions].clone(), output_type="pt",
                                       progress=False, halving=halving)
                seconds = time.perf_counter() - started
                for tolerance, label in TOLERANCES:
                    name, profile = repicked(captured, final, tolerance)
                    key = f"{captions}/{name}"  # the same recording, so the same candidate, with or without halving
                    if name.startswith("uniform:"):  # one solver on the residuals: the single's own row
                        evaluated[key] = singles[name.removeprefix("uniform:")]
                    elif key not in evaluated:
                        evaluated[key] = held_out_psnr(work, cell, full, profile)
                    quality = evaluated[key]
                    rows.append({"cell": list(cell), "label": f"{captions} captions, {label}, "
                                 f"{'halving' if halving else 'every caption'}", "seconds": seconds,
                                 "psnr": quality, "margin": quality - singles[best_name], "best": best_name,
                                 "chosen": name, "runs": len(captured["trials"])})
                    print(json.dumps(rows[-1]), flush=True)
                    if args.rows is not None:
                        with args.rows.open("a") as f:
                            f.write(json.dumps(rows[-1]) + "\n")
    default = default_probe_seconds(pipe) if args.default_probe else []
    write(args, rows, default)
    print(args.out)
    return 0


def write(args: argparse.Namespace, rows: list[dict], default: list[float]) -> None:
    lines = ["# Probe cost against quality (reference model, one CPU thread)", "",
             f"Command: `OMP_NUM_THREADS=1 python -m hyca.bench.probe_cost --prompts {args.prompts}` "
             "(held-out captions and seeds of the grid; HyCa with the guard on). Margin: HyCa's held-out "
             "PSNR minus the best single solver's on the same images.", "",
             "| cell (steps, guidance, shift, N) | probe | probe s | cached runs | HyCa PSNR | vs best single | "
             "best single | closed-loop choice |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {tuple(r['cell'])} | {r['label']} | {r['seconds']:.1f} | {r['runs']} | {r['psnr']:.2f} | "
                     f"{r['margin']:+.2f} | {r['best']} | {r['chosen']} |")
    lines += ["", "Per probe setting, over the cells:", "",
              "| probe | cells | mean s | mean margin | worst margin |", "|---|---|---|---|---|"]
    for label, *_ in VARIANTS:
        mine = [r for r in rows if r["label"] == label]
        if mine:
            lines.append(f"| {label} | {len(mine)} | {statistics.mean(r['seconds'] for r in mine):.1f} | "
                         f"{statistics.mean(r['margin'] for r in mine):+.2f} | {min(r['margin'] for r in mine):+.2f} |")
    if default:
        lines += ["", f"Default in-process probe (`hyca.probe(pipe, steps=28)`, the reference pipeline's own "
                      f"defaults): {', '.join(f'{s:.1f}' for s in default)} s."]
    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
