"""``python -m hyca.bench.webui_path``: HyCa's quality on the WebUI path, measured on the
reference model, against the diffusers path on the same captions, noise and sigmas.

The reference model's diffusers weights are converted to the key layout Forge's and Neo's
``backend/nn/flux.py`` load (:mod:`hyca.reference.webui`) and loaded into the test suite's
weight-carrying stand-ins of those classes (``tests/standins/bfl_flux_forge.py`` /
``bfl_flux_neo.py``; ``tests/test_webui_reference_model.py`` checks that with HyCa off a
WebUI generation equals the diffusers pipeline's to float noise). Generations then run as a
WebUI user's do: ``tests/webui_harness.py`` ``generate`` (the extension script's hooks in
Forge / Neo order, k-diffusion Euler over the "Simple" flow sigmas, CFG by cond / uncond).

Per cell (steps x guidance x shift x N, warm-up fixed), on held-out captions, PSNR / SSIM
against full compute (the diffusers pipeline, HyCa off, same noise and sigmas) for:

* **diffusers plain call**: ``hyca.enable(pipe, interval=N, warmup=...)`` with nothing else
  told, then ``pipe(prompt, num_inference_steps=, guidance_scale=)``, on a fresh profile cache;
* **WebUI (Forge)** / **WebUI (Neo)**: the checkbox on, N and warm-up set, every other
  control at its default (automatic profile, guard on), a fresh WebUI session and profile
  cache; one generation on calibration captions first (a user's earlier generation at the
  same settings: on the first one the extension probes), then the held-out captions.

The app's path is not measured here: the app has no guidance or scheduler-shift control and
samples the reference model at its shipped shift 1, so it runs no cell of this grid.
Needs a source checkout (the stand-ins live in ``tests/``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
HELD_OUT_SEED = 20261130   # the grid's (hyca.bench.grid): the same held-out captions
CALIBRATION_SEED = 777
PSNR_CAP = 100.0
DIFFUSERS = "diffusers plain call"
WEBUI = {"forge": "WebUI (Forge)", "neo": "WebUI (Neo)"}
BAR_DB = 0.3
#: Largest pixel difference (images in [0, 1]) allowed between the WebUI with HyCa off and the
#: diffusers full compute: beyond it the WebUI row would be scored against images it never aimed at.
OFF_TOLERANCE = 1e-3


def _harness() -> tuple[Any, Any]:
    tests = ROOT / "tests"
    if not (tests / "reference_frontends.py").is_file():
        raise SystemExit(f"this benchmark drives the test suite's WebUI stand-ins ({tests}): run it from a source checkout")
    if str(tests) not in sys.path:
        sys.path.insert(0, str(tests))
    import reference_frontends
    import webui_harness

    return reference_frontends, webui_harness


@contextlib.contextmanager
def fresh_cache() -> Iterator[None]:
    """A new, empty ``$HYCA_CACHE`` (profiles probed by an earlier path or cell are not found)."""
    before = os.environ.get("HYCA_CACHE")
    with tempfile.TemporaryDirectory(prefix="hyca-webui-path-") as folder:
        os.environ["HYCA_CACHE"] = folder
        try:
            yield
        finally:
            if before is None:
                os.environ.pop("HYCA_CACHE", None)
            else:
                os.environ["HYCA_CACHE"] = before


def chosen_in_cache() -> str:
    """The closed loop's pick of each profile the path probed into ``$HYCA_CACHE`` (e.g.
    ``model,lite:uniform:taylor-1``), for the report: which strategy a row ran."""
    from ..profiles.io import load_profile

    picks = []
    for file in sorted(Path(os.environ["HYCA_CACHE"]).glob("*.safetensors")):
        selection = load_profile(file).metadata.get("selection") or {}
        picks.append(str((selection.get("closed_loop") or {}).get("chosen", "eq. 5 (open loop)")))
    return ", ".join(picks) or "no profile probed"


def fidelity(images: torch.Tensor, full: torch.Tensor) -> tuple[float, float]:
    """Mean PSNR (capped at ``PSNR_CAP`` dB) and SSIM over images ``(n, 3, H, W)``."""
    from .metrics import psnr, ssim

    p = [min(psnr(a, b), PSNR_CAP) for a, b in zip(images, full)]
    s = [ssim(a, b) for a, b in zip(images, full)]
    return float(np.mean(p)), float(np.mean(s))


class Work:
    def __init__(self, pipe: Any, R: Any, prompts: int, batch: int) -> None:
        from ..reference import data

        self.pipe, self.R, self.batch = pipe, R, batch
        captions = data.sample_scenes(np.random.default_rng(HELD_OUT_SEED), prompts, "heldout").captions()
        self.batches = [captions[i:i + batch] for i in range(0, prompts, batch)]
        self.calibration = data.sample_scenes(np.random.default_rng(CALIBRATION_SEED), batch, "train").captions()
        latent = R.H.OVERRIDES[R.KINDS["forge"]].latent
        #: the noise webui_harness.generate draws for iteration n; the diffusers runs get the same
        self.noise = R.harness_noise(len(self.batches), batch, latent)

    def diffusers(self, steps: int, guidance: float) -> torch.Tensor:
        from ..reference.webui import latent_to_tokens

        return torch.cat([self.pipe(b, num_inference_steps=steps, guidance_scale=guidance,
                                    latents=latent_to_tokens(n), output_type="pt").images
                          for b, n in zip(self.batches, self.noise)])


def diffusers_plain(work: Work, steps: int, guidance: float, interval: int, warmup: int) -> dict:
    import hyca

    started = time.perf_counter()
    with fresh_cache():
        hyca.enable(work.pipe, interval=interval, warmup=warmup)
        try:
            images = work.diffusers(steps, guidance)
            stats = hyca.stats(work.pipe)
            described = stats[0].describe() if stats else "no stats"
            chosen = chosen_in_cache()
        finally:
            hyca.disable(work.pipe)
    return {"images": images, "seconds": time.perf_counter() - started, "note": described, "chosen": chosen}


def webui_path(work: Work, flavour: str, steps: int, guidance: float, shift: float, interval: int, warmup: int,
               full: torch.Tensor) -> dict:
    from ..adapters.webui.settings import Settings

    R, H = work.R, work.R.H
    on = Settings(enabled=True, interval=interval, warmup=warmup).args()
    started = time.perf_counter()
    with fresh_cache(), H.Frontend(R.KINDS[flavour]) as frontend:
        off, _ = R.webui_images(work.pipe, frontend, work.batches, steps, guidance, Settings().args(), shift=shift)
        off_seconds = time.perf_counter() - started
        started = time.perf_counter()
        R.webui_images(work.pipe, frontend, [work.calibration], steps, guidance, on, shift=shift)
        first_seconds = time.perf_counter() - started
        images, infotexts = R.webui_images(work.pipe, frontend, work.batches, steps, guidance, on, shift=shift)
        chosen = chosen_in_cache()
    return {"chosen": chosen, "images": images, "seconds": time.perf_counter() - started, "first_seconds": first_seconds,
            "off_seconds": off_seconds, "off_max_abs_diff": float((off - full).abs().max()),
            "note": infotexts[0]}


def run_cell(work: Work, cell: tuple, warmup: int, flavours: list[str], commit: str) -> dict:
    from ..reference.webui import frontend_scheduler

    steps, guidance, shift, interval = cell
    work.pipe.scheduler = frontend_scheduler(shift)
    started = time.perf_counter()
    full = work.diffusers(steps, guidance)
    rows = {DIFFUSERS: diffusers_plain(work, steps, guidance, interval, warmup)}
    for flavour in flavours:
        rows[WEBUI[flavour]] = webui_path(work, flavour, steps, guidance, shift, interval, warmup, full)
        if rows[WEBUI[flavour]]["off_max_abs_diff"] > OFF_TOLERANCE:  # its images aim at another reference
            raise RuntimeError(f"{WEBUI[flavour]} with HyCa off differs from the diffusers full compute by "
                               f"{rows[WEBUI[flavour]]['off_max_abs_diff']:.3g} (more than {OFF_TOLERANCE:g}) at "
                               f"{steps} steps, shift {shift:g}: the two paths do not sample the same sigmas, so "
                               "their rows cannot be compared")
    out = {"commit": commit, "steps": steps, "guidance": guidance, "shift": shift, "interval": interval, "warmup": warmup,
           "prompts": sum(len(b) for b in work.batches), "rows": {}}
    for name, row in rows.items():
        p, s = fidelity(row.pop("images"), full)
        out["rows"][name] = {"psnr": round(p, 3), "ssim": round(s, 4), **{k: (round(v, 6) if isinstance(v, float) else v)
                                                                           for k, v in row.items()}}
    out["seconds"] = round(time.perf_counter() - started, 1)
    return out


def _commit() -> str:
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def report(cells: list[dict], command: str, flavours: list[str]) -> str:
    seconds = sum(c["seconds"] for c in cells)
    commit = ", ".join(sorted({c.get("commit", "unknown") for c in cells}))
    names = [DIFFUSERS] + [WEBUI[f] for f in flavours]
    lines = ["# HyCa on the WebUI path (reference model in the frontends' FLUX class, held-out captions)", "",
             f"Command: `{command}` (measured at commit {commit}, one torch thread)  ",
             f"Run time: {seconds / 60:.1f} min for {len(cells)} cells (sum over cells); "
             f"{cells[0]['prompts'] if cells else 0} held-out captions per cell, warm-up "
             f"{cells[0]['warmup'] if cells else '-'}.", "",
             "PSNR (dB) / SSIM against full compute (the diffusers pipeline, HyCa off) of the same caption, noise "
             "and sigmas (Forge's \"Simple\" flow schedule on both sides). Δ: the WebUI row minus the diffusers row; "
             f"the bar is |Δ| <= {BAR_DB} dB in every cell (✗: more than {BAR_DB} dB below the diffusers row; "
             f"▲: more than {BAR_DB} dB above it).", "",
             "| steps, guidance, shift, N | " + " | ".join(names) + " | " +
             " | ".join(f"Δ {WEBUI[f]}" for f in flavours) + " |",
             "|---|" + "---|" * (len(names) + len(flavours))]
    misses = []
    for c in cells:
        r = c["rows"]
        base = r[DIFFUSERS]["psnr"]
        deltas = []
        for f in flavours:
            d = r[WEBUI[f]]["psnr"] - base
            ok = abs(d) <= BAR_DB
            deltas.append(f"{d:+.2f}{'' if ok else ' ✗' if d < 0 else ' ▲'}")
            if not ok:
                misses.append((c, f, d))
        lines.append(f"| {c['steps']}, {c['guidance']:g}, {c['shift']:g}, N={c['interval']} | " +
                     " | ".join(f"{r[n]['psnr']:.2f} / {r[n]['ssim']:.4f}" for n in names) + " | " +
                     " | ".join(deltas) + " |")
    losses = sum(d < 0 for _, _, d in misses)
    lines += ["", f"Cells outside the {BAR_DB} dB bar: **{len(misses)}** of {len(cells) * len(flavours)} "
              f"(cell x frontend): {losses} below the diffusers row, {len(misses) - losses} above it."]
    for c, f, d in misses:
        lines.append(f"- {c['steps']} steps, guidance {c['guidance']:g}, shift {c['shift']:g}, N={c['interval']}: "
                     f"{WEBUI[f]} {d:+.2f} dB against the diffusers plain call")
    lines += ["", "## What each path did", "",
              "Diffusers: `hyca.stats(pipe)[0].describe()` after the held-out batches. WebUI: the infotext of the "
              "first held-out batch; `off` is the largest pixel difference between the WebUI with HyCa off and "
              "the diffusers full compute (both in [0, 1]); seconds are wall time (the WebUI's first generation "
              "at the cell's settings, which probes, separately).", ""]
    for c in cells:
        lines.append(f"**{c['steps']} steps, guidance {c['guidance']:g}, shift {c['shift']:g}, N={c['interval']}** "
                     f"({c['seconds']} s)")
        for n in names:
            row = c["rows"][n]
            extra = (f"; off {row['off_max_abs_diff']:.1e}; first generation {row['first_seconds']:.1f} s"
                     if "off_max_abs_diff" in row else "")
            pick = f" (picked {row['chosen']})" if "chosen" in row else ""
            lines.append(f"- {n}: {row['seconds']:.1f} s{extra}{pick}: {row['note']}")
        lines.append("")
    lines += ["The app's path is not in this table: the app has no guidance or scheduler-shift control and samples "
              "the reference model at its shipped shift 1, so none of these cells is reachable from it.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m hyca.bench.webui_path", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[28, 50])
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 2.5])
    parser.add_argument("--shift", type=float, nargs="+", default=[3.0])
    parser.add_argument("--intervals", type=int, nargs="+", default=[4, 6])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=16, help="held-out captions per cell")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--frontends", nargs="+", choices=sorted(WEBUI), default=["forge", "neo"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "webui_path.md",
                        help="the report; the raw cells go to the same name with .jsonl")
    parser.add_argument("--combine", type=Path, nargs="+", default=None,
                        help="write the report from these .jsonl files (runs split by --steps) without running")
    parser.add_argument("--command", default=None, help="the command line recorded in the report (with --combine)")
    args = parser.parse_args(argv)
    if args.combine:
        cells = [json.loads(line) for path in args.combine for line in path.read_text().splitlines() if line.strip()]
        flavours = [f for f in WEBUI if cells and WEBUI[f] in cells[0]["rows"]]
        args.out.write_text(report(cells, args.command or "see --combine", flavours))
        print(f"wrote {args.out}")
        return
    if args.prompts % args.batch:
        parser.error("--prompts must be a multiple of --batch (the WebUI runs batches of one size)")
    torch.set_num_threads(args.threads)
    R, _ = _harness()
    from ..reference import load_pipeline

    pipe = load_pipeline()
    R.register(pipe.transformer)
    work = Work(pipe, R, args.prompts, args.batch)
    cells = [(s, g, sh, n) for s in args.steps for g in args.guidance for sh in args.shift for n in args.intervals]
    results, commit = [], _commit()
    raw = args.out.with_suffix(".jsonl")
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.write_text("")
    for cell in cells:
        result = run_cell(work, cell, args.warmup, args.frontends, commit)
        results.append(result)
        with raw.open("a") as f:
            f.write(json.dumps(result) + "\n")
        print(json.dumps({k: v for k, v in result.items() if k != "rows"} |
                         {n: r["psnr"] for n, r in result["rows"].items()}), flush=True)
    command = "python -m hyca.bench.webui_path" + ("" if argv is None and len(sys.argv) < 2 else
                                                   " " + " ".join(argv if argv is not None else sys.argv[1:]))
    args.out.write_text(report(results, command, args.frontends))
    print(f"wrote {args.out} and {raw}")


if __name__ == "__main__":
    main()
