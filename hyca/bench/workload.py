"""What every method generates: a fixed set of prompt/seed pairs on one pipeline.

Prompts are captions from the reference model's own data module (the scenes it was
trained to draw), drawn with a fixed seed; calibration prompts (used to probe HyCa, to
calibrate MagCache and to search thresholds) are drawn from another seed, so no method
is tuned on the prompts it is scored on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

EVAL_SEED = 20261127
CALIBRATION_SEED = 777
NOISE_SEED_BASE = 1000


@dataclass(frozen=True)
class Case:
    prompt: str
    seed: int


def cases(n: int, calibration: bool = False) -> list[Case]:
    """``n`` fixed prompt/seed pairs (captions of the reference model's training scenes)."""
    from ..reference import data

    seed = CALIBRATION_SEED if calibration else EVAL_SEED
    captions = data.sample_scenes(np.random.default_rng(seed), n, "train").captions()
    base = NOISE_SEED_BASE * (2 if calibration else 1)
    return [Case(caption, base + i) for i, caption in enumerate(captions)]


def load(model: str, path: str | None = None) -> Any:
    """``"reference"``: the trained reference model (the shipped one, or the folder ``path``);
    ``"tiny"``: a random-weight pipeline of the same layout (wiring only: its images mean nothing)."""
    from .. import reference

    if model == "reference":
        return reference.load_pipeline(path)
    if model == "tiny":
        return reference.tiny_components(seed=0)
    raise ValueError(f"model must be 'reference' or 'tiny', got {model!r}")


def generate(pipe: Any, case: Case, steps: int) -> torch.Tensor:
    """One image, (3, H, W) float in [0, 1]."""
    generator = torch.Generator().manual_seed(case.seed)
    return pipe(case.prompt, num_inference_steps=steps, generator=generator, output_type="pt").images[0]
