"""Image fidelity of the accelerated output against the full-compute one: PSNR and SSIM.

Both take float images in [0, 1], shaped (H, W) or (H, W, C). SSIM follows Wang et al.
(2004): an 11x11 Gaussian window with sigma 1.5, C1 = (0.01 L)^2, C2 = (0.03 L)^2 with
L = 1, the SSIM map over every full window position ("valid"), averaged, then averaged
over channels. Images smaller than the window use a window as large as the image.
"""

from __future__ import annotations

import math

import numpy as np

WINDOW = 11
SIGMA = 1.5
K1, K2 = 0.01, 0.03


def _as_float_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"images must have the same shape to be compared, got {a.shape} and {b.shape}")
    if a.ndim == 2:
        a, b = a[..., None], b[..., None]
    if a.ndim != 3:
        raise ValueError(f"images must be (H, W) or (H, W, C), got shape {a.shape}")
    return a, b


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB for a peak of 1.0; ``inf`` for identical images."""
    a, b = _as_float_pair(a, b)
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def gaussian_window(size: int = WINDOW, sigma: float = SIGMA) -> np.ndarray:
    """Normalised 2-D Gaussian weights (outer product of two 1-D ones)."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(x ** 2) / (2 * sigma ** 2))
    g /= g.sum()
    return np.outer(g, g)


def _filter_valid(image: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Weighted sums of ``image`` (H, W) under ``window`` at every full window position."""
    from numpy.lib.stride_tricks import sliding_window_view

    patches = sliding_window_view(image, window.shape)
    return np.einsum("ijkl,kl->ij", patches, window)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean structural similarity (Gaussian window), averaged over channels; 1.0 for identical images."""
    a, b = _as_float_pair(a, b)
    size = min(WINDOW, a.shape[0], a.shape[1])
    window = gaussian_window(size, SIGMA)
    c1, c2 = K1 ** 2, K2 ** 2
    scores = []
    for c in range(a.shape[2]):
        x, y = a[..., c], b[..., c]
        mu_x, mu_y = _filter_valid(x, window), _filter_valid(y, window)
        var_x = _filter_valid(x * x, window) - mu_x ** 2
        var_y = _filter_valid(y * y, window) - mu_y ** 2
        cov = _filter_valid(x * y, window) - mu_x * mu_y
        ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
        scores.append(float(ssim_map.mean()))
    return float(np.mean(scores))


def describe_psnr(value: float) -> str:
    return "∞ (identical)" if math.isinf(value) else f"{value:.2f} dB"
