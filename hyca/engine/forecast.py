"""The one prediction kernel: ``F_hat[b, ...] = sum_j W[j, b] * H[j, b, ...]``."""

from __future__ import annotations

from typing import Sequence

import torch


def forecast(history: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum over cached values, per batch item.

    ``history[j]`` has shape ``(B, ...)``; ``weights`` has shape ``(K, B)`` (a weight per
    cached value and batch item: each image forecast with its own solver) or ``(K, 1)`` (one
    weight for the whole batch). Accumulates in float32
    whatever the cache dtype, because extrapolation weights such as ``2.86, -4, 5, -2.86``
    cancel, and bf16 rounding of each term would not.
    """
    if len(history) != weights.shape[0]:
        raise ValueError(f"{len(history)} cached values but {weights.shape[0]} weight rows")
    weights = weights.to(device=history[0].device, dtype=torch.float32)
    weights = weights.reshape(*weights.shape, *[1] * (history[0].dim() - 1))  # (K, B, 1, ...)
    out = torch.zeros(history[0].shape, device=history[0].device, dtype=torch.float32)
    for value, w in zip(history, weights):
        out.addcmul_(value, w)
    return out
