"""Train the reference model from scratch: ``python -m hyca.reference.train``.

Rectified flow on procedurally generated captioned shapes (``data.py``), transformer and
caption encoder trained jointly, AdamW with warm-up and cosine decay, an exponential
moving average of the weights (what gets saved: small models sample far better from
the EMA), and caption dropout so true classifier-free guidance works at sampling time.
Writes the pipeline folder (``--out``) and a sample grid every ``--sample-every`` steps.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import data
from .model import build, flow_loss
from .pipeline import ReferencePipeline, default_scheduler, load_pipeline, shipped_path

# Captions drawn in every sample grid: a held-out triple per row start, then seen ones.
GRID_SEED = 12345


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(n, H, W, 3) uint8 -> (n, 3, H, W) float in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def learning_rate(step: int, progress: float, peak: float, warmup: int = 100) -> float:
    """Linear warm-up, then cosine decay to 10% of ``peak`` as ``progress`` goes 0 -> 1."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def progress_of(step: int, steps: int, elapsed: float, minutes: float | None) -> float:
    """Fraction of the run done, by steps or by the time budget, whichever is further along:
    a run cut short by ``--minutes`` still ends its learning-rate decay."""
    by_time = elapsed / (60 * minutes) if minutes else 0.0
    return max(step / steps, by_time)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    ema_params = list(ema.parameters())
    torch._foreach_lerp_(ema_params, [p.detach() for p in model.parameters()], 1.0 - decay)


def grid_image(images: np.ndarray, columns: int) -> np.ndarray:
    """(n, H, W, 3) -> one image, ``columns`` wide, with a 2-pixel gap."""
    n, h, w, _ = images.shape
    rows = math.ceil(n / columns)
    canvas = np.full((rows * (h + 2) + 2, columns * (w + 2) + 2, 3), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        canvas[2 + r * (h + 2): 2 + r * (h + 2) + h, 2 + c * (w + 2): 2 + c * (w + 2) + w] = image
    return canvas


def save_grid(pipe: ReferencePipeline, path: Path, steps: int = 20, guidance: float = 1.0) -> None:
    from PIL import Image

    held = data.sample_scenes(np.random.default_rng(GRID_SEED), 8, "heldout").captions()
    seen = data.sample_scenes(np.random.default_rng(GRID_SEED + 1), 8, "train").captions()
    images = pipe(held + seen, num_inference_steps=steps, guidance_scale=guidance, seed=0, output_type="np").images
    grid = grid_image(np.round(images * 255).astype(np.uint8), columns=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).resize((grid.shape[1] * 4, grid.shape[0] * 4), Image.NEAREST).save(path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=shipped_path(), help="pipeline folder to write")
    p.add_argument("--samples", type=Path, default=Path("runs/reference"), help="where sample grids go")
    p.add_argument("--steps", type=int, default=7000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=8e-4)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample-every", type=int, default=400)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--minutes", type=float, default=None, help="stop early (and save) after this long")
    p.add_argument("--init", type=Path, default=None,
                   help="continue from this pipeline folder instead of fresh weights (size flags ignored)")
    p.add_argument("--warmup", type=int, default=100, help="learning-rate warm-up steps")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--double", type=int, default=2)
    p.add_argument("--single", type=int, default=4)
    return p.parse_args(argv)


def snapshot(transformer, encoder) -> ReferencePipeline:
    pipe = ReferencePipeline(transformer=transformer, text_encoder=encoder, scheduler=default_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.init is not None:
        init = load_pipeline(args.init)
        transformer, encoder = init.transformer.train(), init.text_encoder.train()
    else:
        transformer, encoder = build(seed=args.seed, heads=args.heads, head_dim=args.head_dim,
                                     double=args.double, single=args.single)
    ema_t, ema_e = copy.deepcopy(transformer).eval(), copy.deepcopy(encoder).eval()
    params = list(transformer.parameters()) + list(encoder.parameters())
    print(f"parameters: {sum(p.numel() for p in params) / 1e6:.2f} M")
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.99))
    generator = torch.Generator().manual_seed(args.seed)
    start, smoothed = time.time(), None
    bar = tqdm(range(args.steps), desc="reference", dynamic_ncols=True)
    for step in bar:
        progress = progress_of(step, args.steps, time.time() - start, args.minutes)
        images, captions, _ = data.batch(args.seed * 1_000_003 + step, args.batch)
        drop = np.random.default_rng(step).random(len(captions)) < args.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop)]
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, progress, args.lr, args.warmup)
        hidden, pooled = encoder.encode(captions)
        loss = flow_loss(transformer, to_tensor(images), hidden, pooled, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        # Short warm-up of the EMA so early snapshots are not dominated by the random init.
        decay = min(args.ema, (1 + step) / (10 + step))
        ema_update(ema_t, transformer, decay)
        ema_update(ema_e, encoder, decay)
        smoothed = loss.item() if smoothed is None else 0.98 * smoothed + 0.02 * loss.item()
        bar.set_postfix(loss=f"{smoothed:.4f}")
        last = step == args.steps - 1 or progress >= 1.0
        if (step + 1) % args.sample_every == 0 or last:
            pipe = snapshot(ema_t, ema_e)
            save_grid(pipe, args.samples / f"step{step + 1:06d}.png")
            pipe.save_pretrained(args.out)
            tqdm.write(f"step {step + 1}: loss {smoothed:.4f}, {time.time() - start:.0f}s, saved {args.out}")
        if last:
            break


if __name__ == "__main__":
    main()
