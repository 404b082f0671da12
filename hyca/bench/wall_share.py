"""HyCa's, FORA's and diffusers TaylorSeer lite's wall-clock speed-up as a share of their
FLOPs speed-up, per benchmark run (issue 20 item 8's check), from ``--quick`` JSON results.

    python -m hyca.bench.wall_share bench/results/peers-quick-16-runs/run-*.json

Prints one Markdown row per (steps, N, run): the three shares (unrounded, from the JSON)
and whether HyCa's is >= FORA's and >= 0.95 x lite order 1's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

METHODS = {"HyCa": "N={n}", "FORA (ours)": "N={n}", "diffusers TaylorSeer": "N={n}, order 1, lite"}


def shares(rows: list[dict], steps: int, interval: int) -> list[float]:
    """Per :data:`METHODS` entry, ``100 * wall_speedup / flops_speedup`` at ``steps`` and N."""
    found = {(r["family"], r["setting"], r["steps"]): r for r in rows}
    return [100 * r["wall_speedup"] / r["flops_speedup"]
            for r in (found[(family, setting.format(n=interval), steps)] for family, setting in METHODS.items())]


def main(paths: list[str]) -> None:
    lines = []
    for name in paths:
        rows = json.loads(Path(name).read_text())["rows"]
        for steps in sorted({r["steps"] for r in rows}, reverse=True):
            for interval in (4, 7):
                hyca, fora, lite = shares(rows, steps, interval)
                lines.append((steps, interval, f"| {steps}, N={interval} | {Path(name).stem} | {hyca:.1f}% | {fora:.1f}% | "
                              f"{lite:.1f}% | {'yes' if hyca >= fora else 'no'} | "
                              f"{'yes' if hyca >= 0.95 * lite else 'no'} ({0.95 * lite:.1f}) |"))
    print("| steps, N | run | HyCa | FORA (ours) | lite o1 | HyCa >= FORA | HyCa >= 0.95 x lite o1 |")
    print("|---|---|---|---|---|---|---|")
    for *_, line in sorted(lines, key=lambda item: (-item[0], item[1])):
        print(line)


if __name__ == "__main__":
    main(sys.argv[1:])
