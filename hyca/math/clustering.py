"""k-means on standardized indicators: which hidden dimensions behave alike (docs/design.md, section 5).

Input is the ``(blocks, dim, 10)`` output of :mod:`hyca.math.indicators`. Indicators that
span orders of magnitude (norms, their ratios, spectral flatness) go on a log scale first,
otherwise a handful of large dimensions would decide every cluster; then each indicator is
standardized (zero mean, unit variance) over the dimensions clustered together.

Labels are made deterministic and comparable between profiles: clusters are numbered by
increasing mean log first difference (cluster 0 moves least), whatever order k-means found
them in.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.cluster import KMeans
from threadpoolctl import threadpool_limits

from .indicators import INDICATOR_NAMES

#: Indicators clustered on a log scale: magnitudes and ratios of magnitudes.
LOG_SCALE: tuple[str, ...] = ("d1", "d2", "d3", "eta", "kappa", "gamma", "energy", "sf")
# A value this far below the typical (median) one counts as "zero" on the log scale, so an
# exactly constant dimension lands near the small ones instead of at log(0).
_LOG_FLOOR_FRACTION = 1e-4
_ORDER_BY = INDICATOR_NAMES.index("d1")


def log_scaled(values: np.ndarray) -> np.ndarray:
    """``(n, 10)`` indicators -> the same with :data:`LOG_SCALE` columns as logarithms."""
    out = np.asarray(values, dtype=np.float64).copy()
    for name in LOG_SCALE:
        i = INDICATOR_NAMES.index(name)
        column = np.maximum(out[:, i], 0.0)
        floor = _LOG_FLOOR_FRACTION * np.median(column) + 1e-30
        out[:, i] = np.log(column + floor)
    return out


def standardized(values: np.ndarray) -> np.ndarray:
    """Log-scale then z-score each column; constant columns become 0."""
    x = log_scaled(values)
    std = x.std(axis=0)
    return (x - x.mean(axis=0)) / np.where(std > 0, std, 1.0)


def _ordered(labels: np.ndarray, key: np.ndarray, k: int) -> np.ndarray:
    """Renumber clusters by increasing mean ``key``; empty clusters take the last numbers."""
    means = [key[labels == c].mean() if np.any(labels == c) else np.inf for c in range(k)]
    rank = np.empty(k, dtype=np.int64)
    rank[np.argsort(means, kind="stable")] = np.arange(k)
    return rank[labels]


def kmeans_labels(values: np.ndarray, k: int, seed: int = 0, n_init: int = 1) -> np.ndarray:
    """Cluster the rows of ``values`` (``(n, 10)`` raw indicators) into at most ``k`` groups."""
    x = standardized(values)
    k_used = min(k, len(x))
    if k_used <= 1:
        return np.zeros(len(x), dtype=np.int64)
    found = KMeans(n_clusters=k_used, random_state=seed, n_init=n_init).fit_predict(x)
    return _ordered(found, x[:, _ORDER_BY], k)


def cluster(indicator_values: torch.Tensor | np.ndarray, k: int, seed: int = 0, shared: bool = False,
            n_init: int = 1) -> torch.Tensor:
    """``(blocks, dim, 10)`` indicators -> ``(blocks, dim)`` int64 labels in ``[0, k)``.

    Per block by default: each block has its own k clusters. ``shared=True`` fits one
    k-means on every block's dimensions together, so label ``c`` means the same kind of
    dynamics in every block.
    """
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"the number of clusters must be a positive integer, got {k!r}")
    values = np.asarray(torch.as_tensor(indicator_values), dtype=np.float64)
    if values.ndim != 3 or values.shape[2] != len(INDICATOR_NAMES):
        raise ValueError(f"indicators must be (blocks, dim, {len(INDICATOR_NAMES)}), got {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError("indicators contain NaN or infinity: the recorded run produced non-finite features")
    blocks, dim, _ = values.shape
    # One thread: for a few thousand 10-d points, threading overhead outweighs the work,
    # and on a busy 2-core machine oversubscribed OpenMP threads made k-means 30x slower.
    with threadpool_limits(limits=1):
        if shared:
            labels = kmeans_labels(values.reshape(blocks * dim, -1), k, seed, n_init).reshape(blocks, dim)
        else:
            labels = np.stack([kmeans_labels(values[b], k, seed, n_init) for b in range(blocks)])
    return torch.as_tensor(labels, dtype=torch.int64)
