"""Train the reference model's two style LoRAs: ``python -m hyca.reference.lora``.

"outline" draws shapes as 2-pixel outlines; "pastel" uses a pastel palette. Each is a
peft LoRA on the transformer's attention and MLP projections, trained with the same
rectified-flow loss on restyled images of the same captions (no trigger word: loading
the LoRA changes the style of every prompt). Saved in diffusers' LoRA format, so
``pipe.load_lora_weights(folder, weight_name="outline.safetensors", adapter_name="outline")``,
``set_adapters`` and ``unload_lora_weights`` work as they do for FLUX LoRAs.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from tqdm import tqdm

from . import data
from .model import flow_loss
from .pipeline import ReferencePipeline, load_pipeline, shipped_path
from .train import save_grid, to_tensor

STYLES = ("outline", "pastel")
# Projections inside the blocks only (a bare "proj_out" would also match the output layer).
TARGETS = r".*(transformer_blocks|single_transformer_blocks)\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2)|proj_mlp|proj_out)"


def weight_name(style: str) -> str:
    return f"{style}.safetensors"


def train_lora(pipe: ReferencePipeline, style: str, steps: int, batch: int = 64, rank: int = 8,
               lr: float = 2e-3, seed: int = 1, minutes: float | None = None,
               resume: Path | None = None) -> dict[str, torch.Tensor]:
    """Fit one LoRA on ``pipe.transformer`` (caption encoder frozen); returns its peft state dict
    and leaves the transformer without adapters. ``resume``: a LoRA folder holding this
    style's weights to continue from instead of a fresh adapter."""
    transformer = pipe.transformer
    transformer.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    if resume is not None:
        pipe.load_lora_weights(resume, weight_name=weight_name(style), adapter_name=style)
    else:
        transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                           target_modules=TARGETS), adapter_name=style)
    transformer.train()
    params = [p for name, p in transformer.named_parameters() if "lora_" in name]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    start = time.time()
    bar = tqdm(range(steps), desc=f"lora {style}", dynamic_ncols=True)
    for step in bar:
        images, captions, _ = data.batch(seed * 7_919 + step, batch, "train", style)
        with torch.no_grad():
            hidden, pooled = pipe.text_encoder.encode(captions)
        loss = flow_loss(transformer, to_tensor(images), hidden, pooled, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if minutes and time.time() - start > 60 * minutes:
            break
    transformer.eval()
    state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(transformer, adapter_name=style).items()}
    transformer.delete_adapters(style)
    return state


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=shipped_path())
    p.add_argument("--styles", nargs="+", default=list(STYLES), choices=STYLES)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--minutes", type=float, default=None, help="stop each LoRA after this long")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--resume", action="store_true", help="continue from the LoRAs already in --model/loras")
    p.add_argument("--samples", type=Path, default=Path("runs/reference"))
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model)
    folder = args.model / "loras"
    for style in args.styles:
        state = train_lora(pipe, style, args.steps, rank=args.rank, lr=args.lr, seed=args.seed,
                           minutes=args.minutes, resume=folder if args.resume else None)
        ReferencePipeline.save_lora_weights(folder, transformer_lora_layers=state, weight_name=weight_name(style))
        pipe.load_lora_weights(folder, weight_name=weight_name(style), adapter_name=style)
        save_grid(pipe, args.samples / f"lora_{style}.png")
        pipe.unload_lora_weights()
        tqdm.write(f"saved {folder / weight_name(style)}")


if __name__ == "__main__":
    main()
