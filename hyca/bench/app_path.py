"""``python -m hyca.bench.app_path``: HyCa's quality through the app, run the way its Generate
button runs it (:func:`hyca.app.handlers.generate`: the app's own session, profile choice and
probe), against the diffusers plain call on the same captions and seeds.

The app samples the shipped reference model on its own schedule (shift 1) without guidance
and lets a user set the steps and N, so it reaches the settings grid's guidance-1, shift-1
cells (:mod:`hyca.bench.grid`). Per cell (steps x N, warm-up fixed):

* **app**: a fresh app session and profile cache; one generation of a calibration caption
  (training split) first, as a user's earlier image at those settings (the app probes then),
  then each held-out caption with its own seed. The app computes full compute and HyCa for
  every image; PSNR / SSIM of one against the other.
* **diffusers plain call**: ``hyca.enable(pipe, interval=N, warmup=...)`` with nothing told
  on a fresh profile cache, the same captions and seeds, against full compute.

The held-out captions are those of :mod:`hyca.bench.webui_path` (and of the grid's seed).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .webui_path import BAR_DB, CALIBRATION_SEED, HELD_OUT_SEED, PSNR_CAP, ROOT, _commit, fresh_cache

DIFFUSERS, APP = "diffusers plain call", "app"
FIRST_SEED = 1000  # held-out image k is sampled with seed FIRST_SEED + k


def _captions(prompts: int) -> tuple[list[str], str]:
    from ..reference import data

    held_out = data.sample_scenes(np.random.default_rng(HELD_OUT_SEED), prompts, "heldout").captions()
    calibration = data.sample_scenes(np.random.default_rng(CALIBRATION_SEED), 1, "train").captions()[0]
    return held_out, calibration


def app_row(steps: int, interval: int, warmup: int, captions: list[str], calibration: str) -> dict[str, Any]:
    """The app's Generate button on each caption; its report's PSNR / SSIM (HyCa against the
    full compute it runs beside it, :func:`hyca.app.compare.side_by_side`)."""
    from ..app import handlers

    started = time.perf_counter()
    with fresh_cache():
        state = handlers.new_state()

        def generate(caption: str, seed: int) -> dict[str, Any]:
            return handlers.generate(state, "reference", None, caption, seed, steps, "HyCa", interval, warmup,
                                     "none", True).numbers

        first = generate(calibration, 0)
        numbers = [generate(caption, FIRST_SEED + k) for k, caption in enumerate(captions)]
    psnrs = [PSNR_CAP if n["psnr"] is None else min(n["psnr"], PSNR_CAP) for n in numbers]
    return {"psnr": round(float(np.mean(psnrs)), 3), "ssim": round(float(np.mean([n["ssim"] for n in numbers])), 4),
            "seconds": round(time.perf_counter() - started, 1),
            "note": f"first generation's profile: {first['profile']}; held-out: {numbers[0]['profile']}, "
                    f"{numbers[0]['computed_steps']} computed, {numbers[0]['forecast_steps']} forecast"}


def diffusers_row(steps: int, interval: int, warmup: int, captions: list[str]) -> dict[str, Any]:
    """The plain call on the app's pipeline (the same loaded model), the same captions and
    seeds as the app's images, against full compute."""
    import hyca
    from ..app import handlers
    from ..app.metrics import psnr, ssim

    pipe = handlers.load_model(handlers.chosen_model("reference", None), None).pipe

    def images() -> list[np.ndarray]:
        return [np.asarray(pipe(caption, num_inference_steps=steps, generator=torch.Generator().manual_seed(
            FIRST_SEED + k), output_type="np").images[0], dtype=np.float32) for k, caption in enumerate(captions)]

    full = images()
    started = time.perf_counter()
    with fresh_cache():
        hyca.enable(pipe, interval=interval, warmup=warmup)
        try:
            fast = images()
            note = hyca.stats(pipe)[0].describe()
        finally:
            hyca.disable(pipe)
    return {"psnr": round(float(np.mean([min(psnr(a, b), PSNR_CAP) for a, b in zip(fast, full)])), 3),
            "ssim": round(float(np.mean([ssim(a, b) for a, b in zip(fast, full)])), 4),
            "seconds": round(time.perf_counter() - started, 1), "note": note}


def report(cells: list[dict], command: str) -> str:
    commit = ", ".join(sorted({c["commit"] for c in cells}))
    lines = ["# HyCa through the app (reference model, held-out captions)", "",
             f"Command: `{command}` (measured at commit {commit}, one torch thread)  ",
             f"Run time: {sum(c['seconds'] for c in cells) / 60:.1f} min for {len(cells)} cells; "
             f"{cells[0]['prompts'] if cells else 0} held-out captions per cell, each with its own seed; warm-up "
             f"{cells[0]['warmup'] if cells else '-'}; guidance 1, shift 1 (the app's reference model).", "",
             "PSNR (dB) / SSIM against full compute of the same caption and seed. Δ: the app minus the diffusers "
             f"plain call; the bar is |Δ| <= {BAR_DB} dB (✗: more than {BAR_DB} dB below; ▲: more than {BAR_DB} dB "
             "above).", "",
             f"| steps, N | {DIFFUSERS} | {APP} | Δ |", "|---|---|---|---|"]
    outside = 0
    for c in cells:
        d, a = c["rows"][DIFFUSERS], c["rows"][APP]
        delta = a["psnr"] - d["psnr"]
        mark = "" if abs(delta) <= BAR_DB else " ✗" if delta < 0 else " ▲"
        outside += bool(mark)
        lines.append(f"| {c['steps']}, N={c['interval']} | {d['psnr']:.2f} / {d['ssim']:.4f} | "
                     f"{a['psnr']:.2f} / {a['ssim']:.4f} | {delta:+.2f}{mark} |")
    lines += ["", f"Cells outside the {BAR_DB} dB bar: **{outside}** of {len(cells)}.", "", "## What each path did", ""]
    for c in cells:
        lines.append(f"**{c['steps']} steps, N={c['interval']}**")
        lines += [f"- {name}: {row['seconds']} s: {row['note']}" for name, row in c["rows"].items()]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m hyca.bench.app_path", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[28, 50])
    parser.add_argument("--intervals", type=int, nargs="+", default=[4, 6, 8])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=8, help="held-out captions per cell")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "app_path.md",
                        help="the report; the raw cells go to the same name with .jsonl")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    captions, calibration = _captions(args.prompts)
    cells = []
    with args.out.with_suffix(".jsonl").open("a") as raw:
        for steps in args.steps:
            for interval in args.intervals:
                started = time.perf_counter()
                rows = {DIFFUSERS: diffusers_row(steps, interval, args.warmup, captions),
                        APP: app_row(steps, interval, args.warmup, captions, calibration)}
                cell = {"commit": _commit(), "steps": steps, "interval": interval, "warmup": args.warmup,
                        "prompts": args.prompts, "rows": rows, "seconds": round(time.perf_counter() - started, 1)}
                raw.write(json.dumps(cell) + "\n")
                raw.flush()
                cells.append(cell)
                print(f"{steps} steps, N={interval}: diffusers {rows[DIFFUSERS]['psnr']:.2f} dB, app "
                      f"{rows[APP]['psnr']:.2f} dB ({cell['seconds']} s)", flush=True)
    args.out.write_text(report(cells, "python -m hyca.bench.app_path " + " ".join(argv or [])))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
