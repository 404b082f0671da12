"""``python -m hyca.bench``: HyCa against every peer, side by side, in one run.

    python -m hyca.bench                 # default set: reference model, 32 prompts, 50 and 28 steps
    python -m hyca.bench --quick         # 4 prompts, 50 steps, two levels: a few minutes
    python -m hyca.bench --model tiny    # random-weight model of the same layout (wiring only)
    python -m hyca.bench --gpu           # FLUX.1-dev architecture, random weights: latency/memory (CUDA)
    torchrun --nproc_per_node 4 -m hyca.bench --gpu --cp-degree 4   # the same over 4 GPUs (context parallel)
    python -m hyca.bench --grid          # steps x guidance x shift x N on held-out captions (hyca.bench.grid)
    python -m hyca.bench --grid --quick  # one cell, few prompts: the CI wiring check

Writes ``<out>/<name>.md`` (tables), ``.png`` (fidelity against FLOPs speed-up) and
``.json`` (everything measured); ``--redraw`` rebuilds the first two from the third.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import replace
from pathlib import Path

DEFAULT_OUT = Path("bench/results")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m hyca.bench", description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="4 prompts, 50 steps, levels N=4 and 7 (4-7 min on a 2-core CPU)")
    mode.add_argument("--full", action="store_true", help="the default set, explicitly (32 prompts, 50 + 28 steps)")
    mode.add_argument("--gpu", action="store_true", help="FLUX.1-dev architecture on CUDA: latency and memory only")
    p.add_argument("--cp-degree", type=int, default=1, metavar="K",
                   help="--gpu: diffusers context parallelism (Ulysses) over K GPUs; run under "
                        "torchrun --nproc_per_node K (docs/multi-gpu.md)")
    p.add_argument("--grid", action="store_true",
                   help="the settings grid: steps {20,28,50} x guidance {1,2.5} x shift {1,3} x N {3,4,5,6,8}")
    p.add_argument("--intervals", type=int, nargs="+", metavar="N", help="--grid: the intervals N to run")
    p.add_argument("--guidance", type=float, nargs="+", metavar="G", help="--grid: the guidance scales to run")
    p.add_argument("--shifts", type=float, nargs="+", metavar="S", help="--grid: the scheduler shifts to run")
    p.add_argument("--shard", default="0/1", metavar="I/N", help="--grid: run every N-th cell starting at I")
    p.add_argument("--resume", action="store_true", help="--grid: keep the cells already in the results file")
    p.add_argument("--report-only", action="store_true", help="--grid: redraw tables and heatmap from the results")
    p.add_argument("--remeasure", action="append", metavar="METHOD",
                   help="--grid: measure this method again in every cell of the results (repeatable; methods "
                        "without a probe, e.g. 'HyCa (shipped profile, guard)')")
    p.add_argument("--model", choices=("reference", "tiny"), default="reference",
                   help="reference: the shipped trained model; tiny: random weights, for wiring checks")
    p.add_argument("--model-path", help="reference-model folder (default: the shipped models/reference)")
    p.add_argument("--steps", type=int, nargs="+", help="step counts to run (default 50 28; --quick: 50)")
    p.add_argument("--prompts", type=int, help="number of prompt/seed pairs (default 32; --quick: 4)")
    p.add_argument("--flops-prompts", type=int, help="prompts also run under the FLOPs counter (default 4)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads, fixed for the whole run")
    p.add_argument("--no-cache-dit", action="store_true", help="leave out cache-dit's DBCache")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results folder (default {DEFAULT_OUT})")
    p.add_argument("--name", help="file name stem (default peers, peers-quick, peers-tiny or peers-gpu)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)")
    p.add_argument("--redraw", type=Path, metavar="JSON", help="rebuild table and plot from a results JSON")
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace):
    from .runner import DEFAULT, QUICK

    settings = QUICK if args.quick else DEFAULT
    changes = {"model": args.model, "model_path": args.model_path, "threads": args.threads, "cache_dit": not args.no_cache_dit}
    if args.steps:
        changes["steps"] = tuple(args.steps)
    if args.prompts:
        changes["prompts"] = args.prompts
    if args.flops_prompts:
        changes["flops_prompts"] = args.flops_prompts
    return replace(settings, **changes)


def default_name(args: argparse.Namespace) -> str:
    if args.gpu:
        return "peers-gpu" + (f"-cp{args.cp_degree}" if args.cp_degree > 1 else "")
    if args.grid:
        return ("grid-quick" if args.quick else "grid") + ("-tiny" if args.model == "tiny" else "")
    suffix = "-tiny" if args.model == "tiny" else ""
    return ("peers-quick" if args.quick else "peers") + suffix


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = ("python -m hyca.bench " + shlex.join(sys.argv[1:] if argv is None else argv)).strip()
    name = args.name or default_name(args)
    from . import report

    if not args.no_plot and not args.gpu:  # a missing matplotlib is said now, not after the run
        report.pyplot()

    if args.grid:
        return _grid(args, name, command)
    if args.redraw:
        result = json.loads(args.redraw.read_text())
        paths = report.write(result, args.out, name, result.get("command", command), with_plot=not args.no_plot)
    elif args.gpu:
        from . import gpu

        result = gpu.run(tuple(args.steps or (28, 50)), cp_degree=args.cp_degree)
        if not result["writer"]:  # context parallelism: the first rank writes the results
            return 0
        args.out.mkdir(parents=True, exist_ok=True)
        paths = [args.out / f"{name}.md", args.out / f"{name}.json"]
        paths[0].write_text(gpu.markdown(result, command))
        paths[1].write_text(json.dumps(result, indent=1) + "\n")
    else:
        from .runner import run

        result = run(settings_from(args))
        paths = report.write(result, args.out, name, command, with_plot=not args.no_plot)
    for path in paths:
        print(f"wrote {path}")
    return 0


def _grid(args: argparse.Namespace, name: str, command: str) -> int:
    from dataclasses import replace

    from . import grid, grid_report

    settings = replace(grid.QUICK if args.quick else grid.GridSettings(), model=args.model, model_path=args.model_path,
                       threads=args.threads)
    if args.steps:
        settings = replace(settings, steps=tuple(args.steps))
    if args.prompts:
        settings = replace(settings, prompts=args.prompts)
    if args.intervals:
        settings = replace(settings, intervals=tuple(args.intervals))
    if args.guidance:
        settings = replace(settings, guidance=tuple(args.guidance))
    if args.shifts:
        settings = replace(settings, shifts=tuple(args.shifts))
    index, count = (int(v) for v in args.shard.split("/"))
    results = args.out / (f"{name}.jsonl" if count == 1 else f"{name}.shard{index}of{count}.jsonl")
    if args.remeasure:
        grid.remeasure(settings, results, args.remeasure, log=lambda message: print(message, flush=True))
    elif not args.report_only:
        import time

        started = time.perf_counter()
        grid.run(settings, results, (index, count), args.resume,
                 log=lambda message: print(message, flush=True))
        print(f"shard {index}/{count}: {time.perf_counter() - started:.0f} s")
    cells = [c for path in sorted(args.out.glob(f"{name}.jsonl")) + sorted(args.out.glob(f"{name}.shard*.jsonl"))
             for c in grid.read(path)]
    if not cells and args.report_only and (args.out / f"{name}.json").is_file():
        import json  # the committed results keep their cells in the report's JSON, not in JSON lines

        cells = json.loads((args.out / f"{name}.json").read_text())["cells"]
    if not cells:
        found = sorted(p.name for p in args.out.glob("grid*.json*")) if args.out.is_dir() else []
        print(f"no grid results named {name} in {args.out}" + (f" (found: {', '.join(found)}; --quick and --model "
              "pick the name)" if found else ""), file=sys.stderr)
        return 1
    for path in grid_report.write(cells, args.out, name, command, with_plot=not args.no_plot):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
