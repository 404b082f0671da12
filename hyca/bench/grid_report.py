"""Tables and a heatmap from the settings grid (:mod:`hyca.bench.grid`): HyCa's margin over
the best single solver of its pool and over the best peer, cell by cell, the grid means,
and what the margins would be for selection from the same information by other means.

The best single solver of a cell is the maximum of eleven noisy means over the same
held-out images: a winner's-curse bias no method that does not see those images can
avoid. The report measures it: ``split-half`` picks the best single solver on half of the
held-out captions and scores it on the other half (against the best on that half),
averaged over random halves; ``picked on calibration`` is the single solver that did
best on the probe's own calibration captions (the information HyCa chooses from).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np

from .grid import HYCA, HYCA_NO_GUARD, SHIPPED, SHIPPED_NO_GUARD, SINGLE, SINGLE_OUTPUT, SINGLE_SHORT, SINGLES, margins
from .report import pyplot

FAIL = -0.5  # dB: issue 21's bar, "every cell >= the best single solver - 0.5 dB"
REUSE_FAIL = -0.2  # dB: "... and >= plain reuse - 0.2 dB"
LITE_MARGIN = 2.0  # dB: "grid mean >= diffusers TaylorSeer lite + 2 dB"
SPLITS = 200


def _rows(cell: dict) -> dict[str, dict]:
    return {r["method"]: r for r in cell["rows"]}


def _label(cell: dict) -> str:
    c = cell["cell"]
    return f"{c['steps']} steps, guidance {c['guidance']:g}, shift {c['shift']:g}"


def _where(cell: dict) -> str:
    return f"{_label(cell)}, N={cell['cell']['interval']}"


def split_half(cell: dict, seed: int = 0) -> float:
    """Expected margin of picking the best single solver on half of the held-out captions
    and scoring on the other half, against the best on that half (<= 0)."""
    singles = np.array([r["psnr_per_prompt"] for k, r in _rows(cell).items() if k.startswith(SINGLES)])
    rng, n, out = np.random.default_rng(seed), singles.shape[1], []
    for _ in range(SPLITS):
        order = rng.permutation(n)
        a, b = order[: n // 2], order[n // 2:]
        pick = singles[:, a].mean(1).argmax()
        out.append(singles[pick, b].mean() - singles[:, b].mean(1).max())
    return float(np.mean(out))


def picked_on_calibration(cell: dict) -> tuple[str, float] | None:
    """The single solver best on the probe's calibration captions, and its held-out margin
    against the best single solver (the closed loop's trials hold those fidelities)."""
    trials = [t for t in cell["info"].get("closed_loop_trials", []) if "uniform:" in t["name"]
              and t["fidelity_db"] is not None]
    if not trials:
        return None
    # the tracks a single solver has a grid row on: the paper's schedule, the short start, the
    # head (not the model output, nor the head with a short start, nor a guard-off candidate)
    trials = [t for t in trials if t["name"].split("uniform:")[0] in ("", "output:") or
              (t["name"].startswith("start") and t["name"].count(":") == 2)]
    trials = [t for t in trials if "," not in t["name"]]
    name = max(trials, key=lambda t: t["fidelity_db"])["name"]
    rows = _rows(cell)
    solver = name.split("uniform:")[1]
    kind = SINGLE_OUTPUT if name.startswith("output") else SINGLE_SHORT if name.startswith("start") else SINGLE
    best = max(r["psnr"] for k, r in rows.items() if k.startswith(SINGLES))
    label = {SINGLE_OUTPUT: "output: ", SINGLE_SHORT: "short: ", SINGLE: ""}[kind]
    return label + solver, rows[kind + solver]["psnr"] - best


def grid_axes(cells: list[dict]) -> tuple[list[tuple], list[int]]:
    keys = sorted({(c["cell"]["steps"], c["cell"]["guidance"], c["cell"]["shift"]) for c in cells})
    return keys, sorted({c["cell"]["interval"] for c in cells})


def _by_key(cells: list[dict]) -> dict[tuple, dict]:
    return {(c["cell"]["steps"], c["cell"]["guidance"], c["cell"]["shift"], c["cell"]["interval"]): c for c in cells}


def margin_table(cells: list[dict], value, fmt) -> list[str]:
    keys, intervals = grid_axes(cells)
    by = _by_key(cells)
    lines = ["| steps, guidance, shift | " + " | ".join(f"N={n}" for n in intervals) + " |",
             "|---|" + "---|" * len(intervals)]
    for k in keys:
        row = [fmt(value(by[(*k, n)])) if (*k, n) in by else "" for n in intervals]
        lines.append(f"| {k[0]}, {k[1]:g}, {k[2]:g} | " + " | ".join(row) + " |")
    return lines


def means(cells: list[dict]) -> list[tuple[str, float, float, float]]:
    """(method, mean PSNR, mean SSIM, mean FLOPs speed-up) over the cells where it ran."""
    names: dict[str, list[dict]] = {}
    for cell in cells:
        for r in cell["rows"]:
            names.setdefault(r["method"], []).append(r)
    return sorted(((n, statistics.mean(r["psnr"] for r in rs), statistics.mean(r["ssim"] for r in rs),
                    statistics.mean(r["flops_speedup"] for r in rs)) for n, rs in names.items() if len(rs) == len(cells)),
                  key=lambda t: -t[1])


def pareto(cells: list[dict], speedup: float = 5.0) -> list[str]:
    """For every cell where HyCa reaches ``speedup``: methods at least as fast and better."""
    lines = []
    for cell in cells:
        rows = _rows(cell)
        hy = rows[HYCA]
        if hy["flops_speedup"] < speedup:
            continue
        better = [k for k, r in rows.items() if k != HYCA and r["flops_speedup"] >= hy["flops_speedup"]
                  and r["psnr"] > hy["psnr"]]
        verdict = "on the front" if not better else "dominated by " + ", ".join(
            f"{k} ({rows[k]['psnr']:.2f} dB at {rows[k]['flops_speedup']:.2f}x)" for k in better)
        lines.append(f"- {_label(cell)}, N={cell['cell']['interval']}: HyCa {hy['psnr']:.2f} dB at "
                     f"{hy['flops_speedup']:.2f}x: {verdict}")
    return lines or [f"- no cell reaches {speedup:g}x for HyCa"]


def markdown(cells: list[dict], command: str) -> str:
    m = [margins(c) for c in cells]
    fails = [(c, x) for c, x in zip(cells, m) if x["single"] < FAIL]
    seconds = sum(c["seconds"] for c in cells)
    settings = cells[0].get("settings", {})
    table = means(cells)
    hy_mean = next(t[1] for t in table if t[0] == HYCA)
    ts = {t[0]: t[1] for t in table if t[0].startswith("diffusers TaylorSeer")}
    lite = max((v for k, v in ts.items() if "lite" in k), default=float("nan"))
    reuse_fails = [(c, d) for c in cells
                   for d in [_rows(c)[HYCA]["psnr"] - _rows(c)[SINGLE + "reuse"]["psnr"]] if d < REUSE_FAIL]
    front = pareto(cells)
    lines = [
        f"# HyCa on the settings grid ({'reference model, held-out captions' if settings.get('model') != 'tiny' else 'tiny random-weight model: wiring only, the numbers mean nothing'})", "",
        f"Command: `{command}`  ",
        f"Cells: {len(cells)}; held-out captions per cell: {settings.get('prompts')} (batches of "
        f"{settings.get('batch')}); probe: {settings.get('calibration_prompts')} calibration captions of the "
        f"training split at each cell's settings; warm-up {settings.get('warmup')}; run time {seconds / 60:.0f} min "
        "(sum over cells; shards run side by side).", *_remeasured(cells), "",
        "PSNR / SSIM against full compute of the same caption and seed, averaged over captions. **HyCa** is the "
        "plain call a user writes, `hyca.enable(pipe, interval=N, warmup=3)` with nothing told (its first call "
        "probes at the call's settings, guard on, on an empty profile cache); **HyCa (probe told the settings)** "
        "is the closed-loop probe run explicitly on 8 calibration captions. Single solvers and eq. 5 run without "
        "the guard (the paper's engine).", "",
        "## Done-means checks", "",
        f"- Cells where HyCa is below the best single solver by more than {-FAIL:g} dB: **{len(fails)} of "
        f"{len(cells)}** (marked ✗ below).",
        f"- Cells where HyCa is below plain reuse (single: reuse) by more than {-REUSE_FAIL:g} dB: "
        f"**{len(reuse_fails)} of {len(cells)}**" + "".join(f"; {_label(c)}, N={c['cell']['interval']}: {d:+.2f} dB"
                                                          for c, d in reuse_fails) + ".",
        f"- Grid mean: HyCa {hy_mean:.2f} dB; diffusers TaylorSeer " + ", ".join(
            f"{k[len('diffusers TaylorSeer '):]} {v:.2f}" for k, v in sorted(ts.items())) +
        f" dB: HyCa is {'ahead of' if all(hy_mean >= v for v in ts.values()) else 'NOT ahead of'} every variant; "
        f"the bar, lite + {LITE_MARGIN:g} dB ({lite + LITE_MARGIN:.2f} dB), is "
        f"{'met' if hy_mean >= lite + LITE_MARGIN else 'NOT met'}.",
        f"- At >= 5x FLOPs (bar: on the Pareto front in at least 3 of 4 cells): "
        f"{sum('on the front' in line for line in front)} of {sum(line.startswith('- ') and 'x:' in line for line in front)}"
        " on the front.", *front, "",
        "## HyCa's margin over the best single solver (dB)", "",
        f"✗: more than {-FAIL:g} dB below. In brackets: the best single solver.", "",
        *margin_table(cells, margins, lambda x: f"{x['single']:+.2f}{' ✗' if x['single'] < FAIL else ''} "
                                                f"({x['best_single']})"), "",
        "### How much of that a probe can know", "",
        "The best single solver is chosen here on the very captions it is scored on. Picking it on half of "
        "them and scoring on the other half gives (mean over random halves, dB):", "",
        *margin_table(cells, split_half, lambda v: f"{v:+.2f}"), "",
        "The single solver that did best on the probe's calibration captions, scored on the held-out ones:", "",
        *margin_table(cells, picked_on_calibration,
                      lambda v: "" if v is None else f"{v[1]:+.2f} ({v[0]})"), "",
        "## HyCa's margin over the best peer at least as fast (dB)", "",
        "Peers: diffusers TaylorSeer lite/full o1/o2, MagCache (calibrated, threshold searched to HyCa's FLOPs), "
        "fewer steps. Only peers whose FLOPs speed-up is at least 95% of HyCa's count.", "",
        *margin_table(cells, margins, lambda x: "" if x["peer"] is None else f"{x['peer']:+.2f} ({x['best_peer']})"),
        "", "## Grid means", "",
        "| method | PSNR (dB) | SSIM | FLOPs speed-up |", "|---|---|---|---|",
        *[f"| {n} | {p:.2f} | {s:.4f} | {f:.2f}x |" for n, p, s, f in table], "",
        "## The guard on a profile made for other settings", "",
        *guard_lines(cells), "",
    ]
    return "\n".join(lines) + "\n"


def _remeasured(cells: list[dict]) -> list[str]:
    """Rows measured again after the run (``--remeasure``), said under the command."""
    names = sorted({n for c in cells for n in c.get("remeasured", [])})
    if not names:
        return []
    count = sum(1 for c in cells if c.get("remeasured"))
    return [f"Measured again in {count} cell{'' if count == 1 else 's'} with `--remeasure` after an engine "
            f"change (the code of the command's commit): {', '.join(names)}."]


def guard_lines(cells: list[dict]) -> list[str]:
    out = []
    for guided in (False, True):
        chosen = [c for c in cells if (c["cell"]["guidance"] > 1) == guided and SHIPPED in _rows(c)]
        if not chosen:
            continue
        on = statistics.mean(_rows(c)[SHIPPED]["psnr"] for c in chosen)
        off = statistics.mean(_rows(c)[SHIPPED_NO_GUARD]["psnr"] for c in chosen)
        reuse = statistics.mean(_rows(c)[SINGLE + "reuse"]["psnr"] for c in chosen)
        hy = statistics.mean(_rows(c)[HYCA]["psnr"] for c in chosen)
        out.append(f"- {'guided' if guided else 'unguided'} cells ({len(chosen)}): shipped profile (chosen at 50 "
                   f"steps, no guidance, shift 1) {off:.2f} dB without the guard, {on:.2f} dB with it; plain reuse "
                   f"{reuse:.2f} dB; HyCa probed at the cell's settings {hy:.2f} dB")
        below = sorted((_rows(c)[SHIPPED]["psnr"] - _rows(c)[SINGLE + "reuse"]["psnr"], _where(c)) for c in chosen)
        worse = [(d, label) for d, label in below if d < FAIL]
        out.append(f"  - shipped profile with the guard more than {-FAIL:g} dB below plain reuse in {len(worse)} of "
                   f"{len(chosen)} cells" + (": " + ", ".join(f"{label} {d:+.2f}" for d, label in worse) if worse
                                             else ""))
    matched = [c for c in cells if HYCA_NO_GUARD in _rows(c)]
    if matched:
        deltas = sorted((_rows(c)[HYCA]["psnr"] - _rows(c)[HYCA_NO_GUARD]["psnr"], _where(c)) for c in matched)
        out.append(f"- on the profile probed at the cell's settings ({len(matched)} cells), the guard changes PSNR "
                   f"by {statistics.mean(d for d, _ in deltas):+.2f} dB on average (worst {deltas[0][0]:+.2f} at "
                   f"{deltas[0][1]}, best {deltas[-1][0]:+.2f} at {deltas[-1][1]})")
    return out


def heatmap(cells: list[dict], path: Path) -> Path:
    plt = pyplot()
    keys, intervals = grid_axes(cells)
    by = _by_key(cells)
    panels = [("over the best single solver", lambda c: margins(c)["single"]),
              ("over the best peer at least as fast", lambda c: margins(c)["peer"])]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.45 * len(keys) + 2), constrained_layout=True)
    for ax, (title, value) in zip(axes, panels):
        data = np.array([[np.nan if (*k, n) not in by or value(by[(*k, n)]) is None else value(by[(*k, n)])
                          for n in intervals] for k in keys], dtype=float)
        limit = max(1.0, float(np.nanmax(np.abs(data))) if np.isfinite(data).any() else 1.0)
        image = ax.imshow(data, cmap="RdYlGn", vmin=-limit, vmax=limit, aspect="auto")
        for i in range(len(keys)):
            for j in range(len(intervals)):
                if np.isfinite(data[i, j]):
                    ax.text(j, i, f"{data[i, j]:+.1f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(intervals)), [f"N={n}" for n in intervals])
        ax.set_yticks(range(len(keys)), [f"{s} st, g {g:g}, sh {sh:g}" for s, g, sh in keys])
        ax.set_title(f"HyCa's PSNR margin {title} (dB)")
        fig.colorbar(image, ax=ax, shrink=0.8)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(cells: list[dict], out: Path, name: str, command: str, with_plot: bool = True) -> list[Path]:
    if not cells:
        return []
    cells = sorted(cells, key=lambda c: tuple(c["cell"].values()))
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.md"]
    paths[0].write_text(markdown(cells, command))
    if with_plot:
        paths.append(heatmap(cells, out / f"{name}.png"))
    summary = out / f"{name}.json"
    summary.write_text(json.dumps({"command": command, "cells": cells}, indent=None) + "\n")
    paths.append(summary)
    return paths


__all__ = ["heatmap", "markdown", "picked_on_calibration", "split_half", "write"]
