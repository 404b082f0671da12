"""Prompt adherence of the shipped reference model, judged by the pixel-statistics checker.

    python -m hyca.bench.reference_adherence            # writes bench/results/reference_*

Captions come from ``hyca.reference.data``: held-out ones name (colour, shape, position)
triples the model never saw in training; seen ones are training combinations (fresh
jitter and noise). For each guidance scale, every caption is generated once (50 Euler
steps, its own seed) and read by ``hyca.reference.checker``: does the majority shape
colour match the caption, does the shape's centroid fall at the requested position.
The issue's bar: colour >= 90% and position >= 80% on held-out captions.

``--loras-only``: each LoRA against the base on 64 seen captions (centre fill, saturation,
adherence), written to ``reference_loras.json``.

Also: wall-clock of loading the pipeline offline and of one 50-step batch-1 generation
on this machine's CPU (informational; nothing asserts a time), and a sample grid PNG
(top rows held-out captions, bottom rows seen ones).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import hyca  # noqa: E402
from hyca.reference import checker, data, load_pipeline, shipped_path  # noqa: E402
from hyca.reference.model import pack, patch_of  # noqa: E402
from hyca.reference.train import grid_image  # noqa: E402

RESULTS = Path("bench/results")  # run from the repository root, as python -m hyca.bench


def generate(pipe, scenes: data.Scenes, guidance: float, steps: int, seed: int, chunk: int = 100) -> np.ndarray:
    """Each caption with its own seed (seed + index), in chunks to bound memory."""
    captions, out = scenes.captions(), []
    for start in range(0, len(captions), chunk):
        part = captions[start: start + chunk]
        noise = torch.cat([torch.randn(1, 3, data.SIZE, data.SIZE, generator=torch.Generator().manual_seed(seed + start + i))
                           for i in range(len(part))])
        latents = pack(noise, patch_of(pipe.transformer))
        out.append(pipe(part, num_inference_steps=steps, guidance_scale=guidance, latents=latents,
                        output_type="np").images)
    return np.concatenate(out)


def timings(path: Path | None) -> dict[str, float]:
    start = time.perf_counter()
    pipe = load_pipeline(path)
    loaded = time.perf_counter()
    pipe("a small red circle at the top left on a white background", num_inference_steps=50, seed=0)
    generated = time.perf_counter()
    return {"load_s": loaded - start, "generate_50_steps_batch1_s": generated - loaded}


def markdown(result: dict) -> str:
    rows = ["| captions @ guidance | colour | position | both | n |", "| --- | --- | --- | --- | --- |"]
    for key, r in result["adherence"].items():
        rows.append(f"| {key} | {r['colour']:.1%} | {r['position']:.1%} | {r['both']:.1%} | {r['n']} |")
    t = result["timings_cpu"]
    return ("# Reference model adherence\n\n`python -m hyca.bench.reference_adherence` "
            f"({result['steps']} steps, {result['threads']} CPU threads)\n\n" + "\n".join(rows) +
            f"\n\nOffline load {t['load_s']:.2f} s; one {result['steps']}-step generation at batch 1 "
            f"{t['generate_50_steps_batch1_s']:.2f} s (this machine's CPU, shared).\n")


def lora_effects(pipe, folder: Path, n: int, steps: int, out: Path) -> dict:
    """Each LoRA against the base model on the same seen captions and seeds: the checker's
    centre fill (outline should empty the shapes) and saturation (pastel should lower it)."""
    scenes = data.sample_scenes(np.random.default_rng(2026), n, "train")
    for style in ("outline", "pastel"):
        pipe.load_lora_weights(folder, weight_name=f"{style}.safetensors", adapter_name=style)
    result = {}
    for adapter in (None, "outline", "pastel"):
        if adapter is None:
            pipe.disable_lora()
        else:
            pipe.enable_lora()
            pipe.set_adapters([adapter], [1.0])
        images = generate(pipe, scenes, 1.0, steps, seed=20_000)
        readings = [checker.read(im) for im in images]
        result[adapter or "base"] = {
            "centre_filled": float(np.mean([r.centre_filled for r in readings])),
            "saturation": float(np.mean([checker.saturation(im) for im in images])),
            **checker.adherence(images, scenes)}
        print(adapter or "base", result[adapter or "base"], flush=True)
    pipe.unload_lora_weights()
    result["n"], result["steps"] = n, steps
    out.mkdir(parents=True, exist_ok=True)
    (out / "reference_loras.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m hyca.bench.reference_adherence", description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--n", type=int, default=300, help="held-out captions")
    p.add_argument("--n-seen", type=int, default=100, help="seen (training-combination) captions")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0, 2.5])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--loras-only", action="store_true", help="only measure the LoRAs' effect")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.loras_only:
        lora_effects(load_pipeline(args.model), (args.model or shipped_path()) / "loras", 64, args.steps, args.out)
        return

    result = {"timings_cpu": timings(args.model), "threads": args.threads, "steps": args.steps,
              "n_held_out": args.n, "n_seen": args.n_seen, "held_out_triples": len(data.HELD_OUT), "adherence": {}}
    pipe = load_pipeline(args.model)
    splits = {"held_out": data.sample_scenes(np.random.default_rng(2024), args.n, "heldout"),
              "seen": data.sample_scenes(np.random.default_rng(2025), args.n_seen, "train")}
    grids = {}
    for guidance in args.guidance:
        for split, scenes in splits.items():
            images = generate(pipe, scenes, guidance, args.steps, seed=10_000)
            result["adherence"][f"{split}@guidance={guidance:g}"] = checker.adherence(images, scenes)
            grids[(split, guidance)] = images[:16]
            print(split, guidance, result["adherence"][f"{split}@guidance={guidance:g}"], flush=True)

    # The same held-out captions through HyCa's engine (one solver for all dimensions; the
    # probed profile of this model comes later): does caching keep the adherence?
    hyca.enable(pipe, "taylor-2", interval=3, warmup=3)
    key = f"held_out@guidance={args.guidance[0]:g}+hyca(taylor-2,N=3,warmup=3)"
    images = generate(pipe, splits["held_out"], args.guidance[0], args.steps, seed=10_000)
    result["adherence"][key] = {**checker.adherence(images, splits["held_out"]),
                                "computed_steps": hyca.stats(pipe)[0].computed}
    hyca.disable(pipe)
    print(key, result["adherence"][key], flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "reference_adherence.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "reference_adherence.md").write_text(markdown(result))
    shown = args.guidance[0]
    grid = grid_image(np.round(np.concatenate([grids[("held_out", shown)], grids[("seen", shown)]]) * 255)
                      .astype(np.uint8), columns=8)
    Image.fromarray(grid).resize((grid.shape[1] * 4, grid.shape[0] * 4), Image.NEAREST).save(
        args.out / "reference_grid.png")
    captions = splits["held_out"].captions()[:16] + splits["seen"].captions()[:16]
    (args.out / "reference_grid.txt").write_text(
        f"guidance {shown:g}, {args.steps} steps; rows 1-2 held-out captions, rows 3-4 seen ones, "
        f"left to right:\n" + "\n".join(captions) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
