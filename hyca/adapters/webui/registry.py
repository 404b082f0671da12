"""Which adapter serves the loaded model; ``None`` leaves the model untouched."""

from __future__ import annotations

import torch

from . import a1111_sd3, forge_chroma, forge_flux, forge_mmditx, neo_flux, neo_lumina, neo_qwen, neo_wan
from .adapter import Adapter

#: Most specific first: Neo's FLUX (forward_orig) before Forge's (inner_forward).
ADAPTERS: tuple[Adapter, ...] = (
    neo_flux.ADAPTER, forge_flux.ADAPTER, forge_chroma.ADAPTER, forge_mmditx.ADAPTER,
    neo_qwen.ADAPTER, neo_wan.ADAPTER, neo_lumina.ADAPTER, a1111_sd3.ADAPTER,
)

#: Class names of quantized variants (Nunchaku SVDQuant) left alone until verified.
UNVERIFIED = ("NunchakuFluxTransformer2dModel", "NunchakuQwenImageTransformer2DModel", "SVDQFluxTransformer2DModel")


def recognise(model: object) -> Adapter | None:
    if not isinstance(model, torch.nn.Module) or type(model).__name__ in UNVERIFIED:
        return None
    return next((a for a in ADAPTERS if a.matches(model)), None)


def supported() -> list[str]:
    return [a.name for a in ADAPTERS]
