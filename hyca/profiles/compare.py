"""Stability of a profile: how much two profiles of one model agree.

The adjusted Rand index (ARI) compares two clusterings of the same items regardless of
how clusters are numbered: 1.0 for the same partition under any relabelling, about 0
for independent ones. Per block it compares the clusterings of that block's hidden
dimensions; the overall figure is the mean over blocks. ``solver_agreement`` asks the
question the engine cares about: for what fraction of (block, dimension) pairs do the
two profiles forecast with the same solver? The LoRA-reuse switch of the frontends
relies on these numbers (paper: ARI > 0.8 across prompts, resolutions, LoRAs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.targets import TARGET_WORDS
from . import fingerprint as fpmod
from .io import ProfileError
from .profile import Profile


@dataclass(frozen=True)
class Comparison:
    ari_per_block: tuple[float, ...]
    ari_overall: float
    solver_agreement: float
    #: True/False when both profiles name their model, None when one does not.
    same_model: bool | None


def _same_model(a: Profile, b: Profile) -> bool | None:
    fa, fb = a.metadata.get("fingerprint"), b.metadata.get("fingerprint")
    if not fa or not fb:
        return None
    return fpmod.mismatch(fa, fb) is None


def compare_profiles(a: Profile, b: Profile) -> Comparison:
    """ARI per block and overall, and solver agreement, of two profiles of the same shape."""
    from sklearn.metrics import adjusted_rand_score  # imported here: scikit-learn is slow to import

    targets = [p.metadata.get("target", "residual") for p in (a, b)]
    if targets[0] != targets[1]:
        raise ProfileError(
            f"one profile forecasts the {TARGET_WORDS[targets[0]]}, the other the {TARGET_WORDS[targets[1]]}: "
            "their clusterings are of different features and cannot be compared"
        )
    if (a.num_blocks, a.dim) != (b.num_blocks, b.dim):
        raise ProfileError(
            f"profiles cover different shapes ({a.num_blocks} blocks x {a.dim} dims vs "
            f"{b.num_blocks} x {b.dim}): only profiles of the same model can be compared"
        )
    per_block = tuple(
        float(adjusted_rand_score(la.numpy(), lb.numpy())) for la, lb in zip(a.labels, b.labels)
    )
    agreement = (a.dim_solvers() == b.dim_solvers()).to(torch.float64).mean().item()
    overall = sum(per_block) / len(per_block) if per_block else float("nan")
    return Comparison(per_block, overall, float(agreement), _same_model(a, b))
