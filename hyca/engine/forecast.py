"""The one prediction kernel: ``F_hat[b, ...] = sum_j W[j, b] * H[j, b, ...]``."""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import torch

from ..math.solvers import pool


def forecast(history: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum over cached values, per batch item.

    ``history[j]`` has shape ``(B, ...)``; ``weights`` has shape ``(K, B)`` (a weight per
    cached value and batch item: each image forecast with its own solver) or ``(K, 1)`` (one
    weight for the whole batch). Accumulates in float32
    whatever the cache dtype, because extrapolation weights such as ``2.86, -4, 5, -2.86``
    cancel, and bf16 rounding of each term would not.
    """
    first = history[0] if history else None
    return weighted_sum(history, term_rows(weights, first.dim(), first.device) if first is not None else [])


def weighted_sum(history: Sequence[torch.Tensor], rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """:func:`forecast` from its weights as :func:`term_rows` gives them (the engine's come
    cached with the schedule's weights: :func:`stacked_rows`)."""
    if len(history) != len(rows):
        raise ValueError(f"{len(history)} cached values but {len(rows)} weight rows")
    first = history[0]
    out = torch.zeros(first.shape, device=first.device, dtype=torch.float32)
    for value, w in zip(history, rows):
        out.addcmul_(value, w)
    return out


def term_rows(weights: torch.Tensor, dims: int, device: torch.device) -> list[torch.Tensor]:
    """``weights`` ``(K, B)`` as K float32 ``(B, 1, ...)`` tensors on ``device`` for values of
    ``dims`` dimensions."""
    moved = weights.to(device=device, dtype=torch.float32)
    return list(moved.reshape(*moved.shape, *[1] * (dims - 1)))  # (K, B, 1, ...)


@lru_cache(maxsize=4096)
def stacked_weights(active: tuple[int, ...], positions: tuple[float, ...], target: float,
                     lengths: tuple[int, ...], items: int) -> tuple[tuple[int, ...], torch.Tensor, tuple[float, ...]]:
    """``active[slot * items + item]``: the solver of each (slot, item). Per slot, the terms
    its items use (the most any of them uses; an item whose solver uses fewer weighs the
    rest 0), and all the weights as one ``(terms, items)`` matrix. Weights are pure
    functions of the history positions and the target, and every generation on one schedule
    repeats the same few, so they are computed once and reused: recomputing them in Python
    was most of a skip step's own cost. The returned tensor is shared between callers and
    must not be modified. Third: per term, the largest |weight| over the items (for
    :func:`bounded`)."""
    counts, blocks = [], []
    for slot, n in enumerate(lengths):
        per_item = [pool()[i].weights(list(positions[:n]), target) for i in active[slot * items:(slot + 1) * items]]
        count = max(len(w) for w in per_item)
        blocks.append([[float(v) for v in w] + [0.0] * (count - len(w)) for w in per_item])
        counts.append(count)
    columns = torch.tensor([[w[j] for w in block] for block, count in zip(blocks, counts) for j in range(count)])
    scales = columns.abs().amax(dim=1).tolist() if columns.dim() == 2 else []  # (no terms: a 1-D empty tensor)
    return tuple(counts), columns, tuple(scales)


@lru_cache(maxsize=4096)
def stacked_rows(active: tuple[int, ...], positions: tuple[float, ...], target: float, lengths: tuple[int, ...],
                 items: int, dims: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """:func:`stacked_weights`' matrix as :func:`term_rows` for values of ``dims`` dimensions
    on ``device``, cached as it is: moving, reshaping and indexing the weights at every skip
    step was most of a small forecast's own cost. Shared: must not be modified."""
    return tuple(term_rows(stacked_weights(active, positions, target, lengths, items)[1], dims, device))


@lru_cache(maxsize=4096)
def solver_weights(solver: int, positions: tuple[float, ...], target: float) -> torch.Tensor:
    """``(terms, 1)``: pool solver ``solver``'s weights for ``positions`` (newest first) and
    ``target``, cached as :func:`stacked_weights` (the guard asks for the same few at every
    check). Shared between callers: must not be modified."""
    return torch.as_tensor(pool()[solver].weights(list(positions), target)).unsqueeze(1)


#: A forecast whose terms' bound stays below this is finite: float32's largest value is
#: 3.4e38, and the float32 rounding of the few terms' products and partial sums adds far less
#: than the margin.
FINITE_BOUND = 1e37


def magnitudes(values: Sequence[torch.Tensor], stacked: torch.Tensor | None = None) -> list[float]:
    """The largest ``|element|`` of each tensor, with one host sync for all (NaN where a
    tensor holds a NaN, Inf where it holds an Inf): what :func:`bounded` needs to know of a
    cached value, taken once when it is cached. ``stacked``: the values are its rows (one
    reduction for all)."""
    if stacked is not None:
        return torch.linalg.vector_norm(stacked, float("inf"), dim=tuple(range(1, stacked.dim()))).tolist()
    if not values:
        return []
    return torch.stack([torch.linalg.vector_norm(v, float("inf")) for v in values]).tolist()


def bounded(sizes: Sequence[float], scales: Sequence[float], elements: int) -> bool:
    """Whether :func:`finite` would pass a forecast of ``elements`` elements from cached
    values of largest magnitudes ``sizes`` with weights of largest magnitudes ``scales``,
    without looking at it: every term is finite, ``sum_j scales[j] * sizes[j]`` bounds every
    element, and ``elements`` times that bounds their sum, far below overflow. False (look at
    it) for a NaN or Inf size or a bound near the range's end."""
    bound = 0.0
    for scale, size in zip(scales, sizes):
        bound += scale * size
    return bound * elements < FINITE_BOUND  # False for NaN and Inf


def finite(forecast: torch.Tensor) -> bool:
    """Whether every element is finite, from one reduction: any NaN or Inf makes the sum
    non-finite (a sum that overflows counts as non-finite too: that step computes)."""
    return bool(torch.isfinite(forecast.sum()))
