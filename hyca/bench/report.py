"""The benchmark's outputs: a markdown table, a PNG plot of fidelity against FLOPs
speed-up, and the raw results as JSON (from which both can be redrawn).

matplotlib is the ``bench`` extra and is imported only when a plot is drawn.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import methods as m

# Families in the order the tables list them; HyCa first among the accelerated ones.
ORDER = (m.FULL, m.HYCA, m.HYCA_SIGMA, m.STEPS, m.FORA, m.TAYLOR_1, m.TAYLOR_2, m.DIFFUSERS_TAYLOR,
         m.DIFFUSERS_FBCACHE, m.DIFFUSERS_MAGCACHE, m.DBCACHE, m.DBCACHE_TAYLOR)
MATCH_TOLERANCE = 0.05  # a peer's FLOPs speed-up within 5% of HyCa's counts as matched


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2 ** 20:.3f}"


def _family_rank(row: dict) -> tuple:
    family = row["family"]
    return (ORDER.index(family) if family in ORDER else len(ORDER), row["level"] or 0, row["setting"])


def _peer_label(row: dict) -> str:
    """Families with several settings per level (diffusers' TaylorSeer orders) are told apart."""
    if row["family"] == m.DIFFUSERS_TAYLOR:
        return f"{row['family']} ({row['setting'].split(', ', 1)[1]})"
    return row["family"]


def hyca_rows(rows: list[dict], steps: int) -> dict[int, dict]:
    return {r["level"]: r for r in rows if r["steps"] == steps and r["family"] == m.HYCA}


def _marker(hyca_psnr: float, peer_psnr: float) -> str:
    if round(hyca_psnr, 2) == round(peer_psnr, 2):  # as the table shows them: "39.86 −" beside 39.86 misleads
        return "**=** "
    return "**+** " if hyca_psnr > peer_psnr else "**−** "


def matched_table(rows: list[dict], steps: int, levels: list[int]) -> list[str]:
    """PSNR / SSIM of every family at each level; the FLOPs speed-up each actually reached
    is shown when it is more than 5% from HyCa's."""
    hyca = hyca_rows(rows, steps)
    header = "| method | " + " | ".join(f"N={n}: {hyca[n]['flops_speedup']:.2f}x FLOPs" for n in levels) + " |"
    lines = [header, "|---|" + "---|" * len(levels)]
    labels: dict[str, dict[int, dict]] = {}
    for r in sorted((r for r in rows if r["steps"] == steps and r["level"] in levels), key=_family_rank):
        if r["family"] in (m.HYCA_SIGMA,):
            continue
        labels.setdefault(_peer_label(r), {})[r["level"]] = r
    for label, by_level in labels.items():
        cells = []
        for n in levels:
            r = by_level.get(n)
            if r is None:
                cells.append("—")
                continue
            cell = f"{r['psnr']:.2f} / {r['ssim']:.4f}"
            off = r["flops_speedup"] / hyca[n]["flops_speedup"] - 1
            if abs(off) > MATCH_TOLERANCE:
                cell += f" (at {r['flops_speedup']:.2f}x)"
            if r["family"] != m.HYCA:
                cell = _marker(hyca[n]["psnr"], r["psnr"]) + cell
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def detail_table(rows: list[dict], steps: int) -> list[str]:
    lines = ["| method | setting | level | FLOPs speed-up | wall-clock speed-up | wall / FLOPs | cache MiB (peak) "
             "| PSNR dB | SSIM |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted((r for r in rows if r["steps"] == steps), key=_family_rank):
        efficiency = r["wall_speedup"] / r["flops_speedup"]
        level = f"N={r['level']}" if r["level"] else "—"
        lines.append(f"| {r['family']} | {r['setting'] or '—'} | {level} | {r['flops_speedup']:.2f}x "
                     f"| {r['wall_speedup']:.2f}x "
                     f"| {efficiency:.0%} | {_mib(r['cache_bytes'])} | {r['psnr']:.2f} | {r['ssim']:.4f} |")
    return lines


def _axis_verdict(step: dict, sigma: dict) -> str:
    difference = step["psnr"] - sigma["psnr"]
    if (step["psnr"], step["ssim"]) == (sigma["psnr"], sigma["ssim"]):
        return "identical images on both axes"
    if abs(difference) < 0.01:
        return f"no measurable difference: {difference:+.4f} dB for the step axis"
    return f"{'step' if difference > 0 else 'sigma'} axis better by {abs(difference):.2f} dB"


def positions_line(rows: list[dict], steps: int) -> list[str]:
    """HyCa on the step axis against the sigma axis at the interval where both ran."""
    sigma = [r for r in rows if r["steps"] == steps and r["family"] == m.HYCA_SIGMA]
    if not sigma:
        return []
    s = sigma[0]
    step = hyca_rows(rows, steps).get(s["level"])
    if step is None:
        return []
    verdict = _axis_verdict(step, s)
    return [f"Positions axis at N={s['level']}: step {step['psnr']:.2f} dB / {step['ssim']:.4f}, "
            f"sigma {s['psnr']:.2f} dB / {s['ssim']:.4f} ({verdict})."]


def shifted_axes_line(a: dict) -> list[str]:
    step, sigma = a[f"{m.HYCA} (step axis)"], a[f"{m.HYCA} (sigma axis)"]
    return [f"Positions axis on an uneven schedule (scheduler shift {a['shift']:g}, as FLUX samples; each axis "
            f"with its own probe), N={a['interval']}, {a['steps']} steps, against full compute on that schedule: "
            f"step {step['psnr']:.2f} dB / {step['ssim']:.4f}, sigma {sigma['psnr']:.2f} dB / {sigma['ssim']:.4f} "
            f"({_axis_verdict(step, sigma)})."]


def standings(rows: list[dict], steps: int, levels: list[int]) -> list[str]:
    """Per level: the peers HyCa beats and the ones that beat it, by mean PSNR."""
    hyca = hyca_rows(rows, steps)
    out = []
    for n in levels:
        peers = [r for r in rows if r["steps"] == steps and r["level"] == n and r["family"] not in (m.HYCA, m.HYCA_SIGMA)]
        better = [f"{_peer_label(r)} {r['psnr']:.2f}" for r in peers if r["psnr"] > hyca[n]["psnr"]]
        tied = [_peer_label(r) for r in peers if r["psnr"] == hyca[n]["psnr"]]
        beaten = len(peers) - len(better) - len(tied)
        out.append(f"- N={n} ({hyca[n]['flops_speedup']:.2f}x FLOPs): HyCa {hyca[n]['psnr']:.2f} dB is ahead of "
                   f"{beaten} of {len(peers)} peers" + (f"; equal to: {', '.join(tied)}" if tied else "")
                   + (f"; behind: {', '.join(better)}" if better else ""))
    return out


def notes(rows: list[dict], steps: int) -> list[str]:
    out = []
    for r in sorted((r for r in rows if r["steps"] == steps and r["note"]), key=_family_rank):
        out.append(f"- {r['family']} at N={r['level']} ({r['setting']}): {r['note']}")
    return out


def overhead_lines(o: dict) -> list[str]:
    """HyCa's wall-clock taken apart (see :mod:`hyca.bench.overhead`)."""
    return [
        f"Where HyCa's wall-clock goes at N={o['interval']}, {o['steps']} steps ({o['computed']} computed), "
        f"medians of per-call times: full call {o['full_call_ms']:.2f} ms; HyCa computed call "
        f"{o['hyca_compute_call_ms']:.2f} ms; HyCa skip call {o['hyca_skip_call_ms']:.2f} ms, against "
        f"{o['blockless_call_ms']:.2f} ms for the transformer without blocks (embeddings, RoPE, output layers: "
        f"what a skip call that enters the transformer pays, a block-hook cache's floor; a model-output "
        f"profile's skip call does not enter it); the pipeline spends "
        f"{o['outside_transformer_ms_per_step']:.2f} ms per step outside the transformer (every method pays it). "
        f"Speed-ups: skip steps free {o['steps_ratio']:.2f}x; a block-hook cache at its floor (skip call = "
        f"block-less transformer) {o['ideal_cache_speedup']:.2f}x; HyCa modelled from its call times "
        f"{o['modelled_hyca_speedup']:.2f}x, measured {o['measured_hyca_speedup']:.2f}x.",
    ]


def markdown(result: dict[str, Any], command: str, plot_name: str | None,
             sample_names: dict[int, str] | None = None) -> str:
    env = result["environment"]
    settings = env["settings"]
    rows = result["rows"]
    levels = list(settings["levels"])
    lines = [
        "# HyCa against its peers",
        "",
        f"Command: `{command}`",
        "",
        f"Model: {settings['model']}; {settings['prompts']} prompt/seed pairs; FLOPs and cache bytes counted on "
        f"the first {settings['flops_prompts']}; thresholds searched and HyCa probed on "
        f"{settings['calibration_prompts']} separate calibration prompt(s). {env['date']}, "
        f"torch {env['torch']}, diffusers {env['diffusers']}, cache-dit {env['cache_dit']}, "
        f"{env['cpus']} CPUs, {env['torch_threads']} torch thread(s). Whole run: {result['seconds'] / 60:.1f} min."
        + (f" Transformer weights sha256 {env['model_weights_sha256'][:16]}…" if env.get("model_weights_sha256") else ""),
        "",
        "PSNR / SSIM against full compute of the same prompt and seed (mean over prompts; PSNR capped at "
        "100 dB per image). **+**: HyCa's PSNR is higher than this peer's at that level; **−**: lower; "
        "**=**: equal to the 0.01 dB shown. "
        "Peers whose FLOPs speed-up is more than 5% from HyCa's show the speed-up they reached.",
    ]
    if plot_name:
        lines += ["", f"![fidelity against FLOPs speed-up]({plot_name})"]
    for steps in settings["steps"]:
        info = result["runs"][str(steps)]
        lines += ["", f"## {steps} steps", "", "### At matched FLOPs (HyCa's interval N sets the level)", ""]
        lines += matched_table(rows, steps, levels)
        lines += [""] + standings(rows, steps, levels) + [""] + positions_line(rows, steps)
        lines += ["", "### Every method", ""]
        lines += detail_table(rows, steps)
        extra = notes(rows, steps)
        if extra:
            lines += ["", "Threshold searches (on the calibration prompts):", ""] + extra
        if "axes_shifted" in info:
            lines += [""] + shifted_axes_line(info["axes_shifted"])
        if sample_names and steps in sample_names:
            lines += ["", f"First prompts at N={settings['overhead_interval']} (rows: full compute, then each "
                          f"method at that level): ![samples]({sample_names[steps]})"]
        if "overhead" in info:
            lines += ["", "### HyCa's wall-clock, taken apart", ""] + overhead_lines(info["overhead"])
        lines += ["", "HyCa profiles (share of dimensions per solver): "
                      + "; ".join(f"N={n}: " + ", ".join(f"{k} {v:.0%}" for k, v in p.items())
                                  for n, p in info["profiles"].items()),
                  f"Probing all {len(info['profiles']) + 1} profiles took {info['probe_seconds']:.1f} s. "
                  f"cache-dit: {info['cache_dit']}."]
    return "\n".join(lines) + "\n"


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend; without matplotlib (the ``bench``
    extra) a ``SystemExit`` that says what to install."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise SystemExit(f"the benchmark's plots need matplotlib ({error}): pip install \"hyca[bench]\" "
                         "(in a source checkout: pip install -e \".[bench]\"), or pass --no-plot (a results JSON "
                         "already written is drawn later with --redraw JSON)") from None
    return plt


def plot(result: dict[str, Any], path: Path) -> None:
    """PSNR and SSIM against FLOPs speed-up, one panel pair per step count."""
    plt = pyplot()
    rows = result["rows"]
    all_steps = result["environment"]["settings"]["steps"]
    fig, axes = plt.subplots(2, len(all_steps), figsize=(6 * len(all_steps) + 3, 9), squeeze=False)
    for column, steps in enumerate(all_steps):
        series: dict[str, list[dict]] = {}
        for r in sorted((r for r in rows if r["steps"] == steps and r["family"] != m.FULL), key=_family_rank):
            series.setdefault(_peer_label(r), []).append(r)
        colours = plt.get_cmap("tab20").colors
        for index, (label, points) in enumerate(series.items()):
            points.sort(key=lambda r: r["flops_speedup"])
            hyca = label.startswith(m.HYCA)
            style = dict(linewidth=3 if hyca else 1.2, marker="o" if hyca else ".", zorder=3 if hyca else 2,
                         color="black" if label == m.HYCA else colours[index % len(colours)])
            if label == m.HYCA_SIGMA:
                style.update(linestyle="", marker="*", markersize=12)
            for row, metric in ((0, "psnr"), (1, "ssim")):
                axes[row][column].plot([p["flops_speedup"] for p in points], [p[metric] for p in points],
                                       label=label, **style)
        for row, metric in ((0, "PSNR (dB) vs full compute"), (1, "SSIM vs full compute")):
            ax = axes[row][column]
            ax.set_title(f"{steps} steps")
            ax.set_xlabel("FLOPs speed-up (x)")
            ax.set_ylabel(metric)
            ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sample_grid(samples: dict[str, list], path: Path, scale: int = 3) -> None:
    """One row per method (name on the left), one column per prompt, pixels enlarged."""
    import numpy as np
    from PIL import Image, ImageDraw

    label_width, gap = 260, 2
    first = next(iter(samples.values()))
    h, w = first[0].shape[-2] * scale, first[0].shape[-1] * scale
    columns = max(len(images) for images in samples.values())
    canvas = Image.new("RGB", (label_width + columns * (w + gap), len(samples) * (h + gap)), "white")
    draw = ImageDraw.Draw(canvas)
    for row, (label, images) in enumerate(samples.items()):
        y = row * (h + gap)
        draw.text((4, y + h // 2 - 6), label, fill="black")
        for column, image in enumerate(images):
            pixels = (image.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
            tile = Image.fromarray(pixels).resize((w, h), Image.NEAREST)
            canvas.paste(tile, (label_width + column * (w + gap), y))
    canvas.save(path)


def write(result: dict[str, Any], out: Path, name: str, command: str, with_plot: bool = True) -> list[Path]:
    """``<out>/<name>.json``, ``.md`` and ``.png`` (and ``-samples-<steps>.png`` image grids
    when the run kept sample images); returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    samples = result.get("samples", {})
    result = {**{k: v for k, v in result.items() if k != "samples"}, "command": command}
    written = []
    for steps, images in samples.items():
        written.append(out / f"{name}-samples-{steps}.png")
        sample_grid(images, written[-1])
    written.append(out / f"{name}.json")
    written[-1].write_text(json.dumps(result, indent=1, default=str) + "\n")
    plot_name = None
    if with_plot:
        plot(result, out / f"{name}.png")
        plot_name = f"{name}.png"
        written.append(out / plot_name)
    sample_names = {int(steps): f"{name}-samples-{steps}.png" for steps in samples}
    (out / f"{name}.md").write_text(markdown(result, command, plot_name, sample_names))
    written.append(out / f"{name}.md")
    return written
