"""One settings cell for the model-output target (issue 21 item 5): HyCa's closed-loop probe
at the cell's settings against diffusers' TaylorSeer lite (which forecasts the model output)
and single solvers on the model output, PSNR to full compute on held-out captions.

    python -m hyca.bench.model_output --steps 50 --guidance 2.5 --shift 3 --interval 4

Prints one JSON line per method and the probe's choice; runs with any hyca version (the
model-output rows only where the engine knows that target), so a before/after comparison
is the same command on two checkouts.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from . import grid
from .flops import TransformerFlops


def _model_output_singles(pipe: Any, interval: int, warmup: int, steps: int) -> list[grid.Method]:
    """reuse / taylor-1 / taylor-2 on the model output, on the schedule and on its short start."""
    from ..engine import cache
    from ..engine.schedule import Schedule
    from ..profiles.profile import Profile

    if "model_output" not in cache.TARGETS:  # a checkout from before the target existed
        return []
    channels = pipe.transformer.proj_out.out_features
    methods = []
    schedule = Schedule(interval, warmup)
    starts = [None, schedule.short_start(steps), getattr(schedule, "lite_start", lambda _: None)(steps)]
    for start in [None, *(s for s in starts[1:] if s is not None)]:
        for name in ("reuse", "taylor-1", "taylor-2"):
            profile = Profile.uniform(name, 1, channels)
            profile.metadata.update(target="model_output", interval=interval, warmup=warmup)
            label = f"model output {name}"
            if start is not None:
                profile.metadata["first_interval"] = start.first_interval
                label += f" (start {start.first_interval})" if start.compute_last else " (TaylorSeer's schedule)"
                if not start.compute_last:
                    profile.metadata["skip_last"] = True
            methods.append(grid.engine(label, profile, interval, warmup, False))
    return methods


def main(argv: list[str] | None = None) -> None:
    from ..adapters.diffusers.probe import probe
    from .workload import load

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=2.5)
    p.add_argument("--shift", type=float, default=3.0)
    p.add_argument("--interval", type=int, default=4)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--calibration", type=int, default=4, help="calibration captions of the probe")
    args = p.parse_args(argv)
    settings = grid.GridSettings(prompts=args.prompts, batch=8, calibration_prompts=args.calibration, threads=1)
    torch.set_num_threads(1)
    pipe = load("reference")
    pipe.set_progress_bar_config(disable=True)
    work = grid.Workload(pipe, settings)
    cell = (args.steps, args.guidance, args.shift, args.interval)
    with grid.shifted(pipe, args.shift):
        full_flops = TransformerFlops()
        full = work.generate(args.steps, args.guidance, count=full_flops)
        started = time.perf_counter()
        profile = probe(pipe, prompt=work.calibration, height=work.size, width=work.size, steps=args.steps,
                        interval=args.interval, warmup=settings.warmup, clusters=settings.clusters,
                        guidance_scale=args.guidance, latents=work.calibration_latents.clone(), output_type="pt",
                        progress=False)
        seconds = time.perf_counter() - started
        closed = profile.metadata["selection"].get("closed_loop", {})
        print(json.dumps({"cell": cell, "probe_seconds": round(seconds, 1), "chosen": closed.get("chosen"),
                          "target": profile.metadata.get("target", "residual"),
                          "trials": closed.get("trials", [])}), flush=True)
        methods = [grid.engine("HyCa (closed-loop probe at the cell)", profile, args.interval, settings.warmup, True)]
        methods += [grid.taylorseer(args.interval, settings.warmup, order, True) for order in (1, 2)]
        methods += [grid.engine(f"single {name}", name, args.interval, settings.warmup, False)
                    for name in ("reuse", "taylor-1")]
        methods += _model_output_singles(pipe, args.interval, settings.warmup, args.steps)
        for method in methods:
            row = grid.measure(work, method, cell, full, full_flops)
            print(json.dumps({k: row[k] for k in ("method", "psnr", "flops_speedup")}), flush=True)


if __name__ == "__main__":
    main()
