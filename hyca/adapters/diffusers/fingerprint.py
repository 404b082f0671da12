"""The fingerprint of a diffusers transformer (keys of :mod:`hyca.profiles.fingerprint`)."""

from __future__ import annotations

from typing import Any

import torch

from ...profiles.fingerprint import config_hash
from .families import blocks_of, family_of, hidden_size


def fingerprint(transformer: torch.nn.Module) -> dict[str, Any]:
    """``{"class", "hidden_size", "blocks": {list attribute: count}, "config_sha256"}``."""
    family = family_of(transformer)  # unsupported models raise TypeError naming the supported ones
    blocks: dict[str, int] = {}
    for spec, _ in blocks_of(transformer, family):
        blocks[spec.attribute] = blocks.get(spec.attribute, 0) + 1
    config = getattr(transformer, "config", {}) or {}
    return {
        "class": type(transformer).__name__,
        "hidden_size": int(hidden_size(transformer)),
        "blocks": blocks,
        "config_sha256": config_hash(config),
    }
