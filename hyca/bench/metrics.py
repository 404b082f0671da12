"""Fidelity of an image against the full-compute image of the same prompt and seed.

PSNR and SSIM are the app's (:mod:`hyca.app.metrics`: SSIM of Wang et al. 2004, 11x11
Gaussian window, sigma 1.5); this module only adapts the pipeline's tensors to them.
"""

from __future__ import annotations

import torch

from ..app import metrics as _app


def _hwc(image: torch.Tensor):
    """(3, H, W) float tensor in [0, 1] -> (H, W, 3) float64 array."""
    if image.dim() != 3:
        raise ValueError(f"expected one image shaped (C, H, W), got shape {tuple(image.shape)}")
    return image.detach().permute(1, 2, 0).double().cpu().numpy()


def psnr(image: torch.Tensor, reference: torch.Tensor) -> float:
    """dB for a peak of 1.0; ``inf`` for identical images."""
    return _app.psnr(_hwc(image), _hwc(reference))


def ssim(image: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean structural similarity; 1.0 for identical images."""
    return _app.ssim(_hwc(image), _hwc(reference))
