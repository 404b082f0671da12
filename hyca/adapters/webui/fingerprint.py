"""Fingerprints of frontend models, with the keys of :mod:`hyca.profiles.fingerprint`
(``class``, ``hidden_size``, ``blocks``, ``config_sha256``) so profile files validate the
same way. Frontend models carry no diffusers config, so the hash is taken over the
parameter names and shapes: what the architecture is, not where it was loaded from."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

from .adapter import Adapter


def shapes_hash(model: torch.nn.Module) -> str:
    shapes = {name: list(p.shape) for name, p in model.named_parameters()}
    text = json.dumps(shapes, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def fingerprint(model: torch.nn.Module, adapter: Adapter) -> dict[str, Any]:
    return {
        "class": type(model).__name__,
        "hidden_size": adapter.hidden_size(model),
        "blocks": {b.attribute: len(getattr(model, b.attribute)) for b in adapter.block_lists},
        "config_sha256": shapes_hash(model),
    }
