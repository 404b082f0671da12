"""Which model a profile belongs to: a small, stable description of a transformer.

A fingerprint is a plain dict (``class``, ``hidden_size``, ``blocks``, ``config_sha256``);
each adapter makes it from its own model objects (:mod:`hyca.adapters.diffusers.fingerprint`,
:mod:`hyca.adapters.webui.fingerprint`), so this module knows no host.

A profile is only valid for the architecture it was probed on, so files carry a fingerprint
and loading compares it. The config hash ignores diffusers' private keys (``_name_or_path``,
``_diffusers_version``, ``_use_default_values``, ...): they change with where and how a model
was loaded, not with what it computes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

#: Keys a fingerprint must have, with their types (checked when reading files).
FIELDS: dict[str, type] = {"class": str, "hidden_size": int, "blocks": dict, "config_sha256": str}


def canonical_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config without volatile private keys (every key starting with an underscore)."""
    return {k: v for k, v in dict(config).items() if not str(k).startswith("_")}


def config_hash(config: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of the config: sorted keys, no whitespace."""
    text = json.dumps(canonical_config(config), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def total_blocks(fp: Mapping[str, Any]) -> int:
    return sum(int(n) for n in fp.get("blocks", {}).values())


def describe(fp: Mapping[str, Any]) -> str:
    """One line: ``FluxTransformer2DModel (config 1a2b3c4d5e6f, 5 blocks x 32 dims)``."""
    return (
        f"{fp.get('class', '?')} (config {str(fp.get('config_sha256', '?'))[:12]}, "
        f"{total_blocks(fp)} blocks x {fp.get('hidden_size', '?')} dims)"
    )


def mismatch(found: Mapping[str, Any], expected: Mapping[str, Any]) -> str | None:
    """Why a profile made for ``found`` does not belong to ``expected``; None when it does."""
    if found.get("class") != expected.get("class"):
        return f"it was made for {found.get('class')}, not {expected.get('class')}"
    if found.get("hidden_size") != expected.get("hidden_size") or dict(found.get("blocks", {})) != dict(
        expected.get("blocks", {})
    ):
        return (
            f"it was made for blocks {dict(found.get('blocks', {}))} x {found.get('hidden_size')} dims, "
            f"this model has blocks {dict(expected.get('blocks', {}))} x {expected.get('hidden_size')} dims"
        )
    if found.get("config_sha256") != expected.get("config_sha256"):
        return (
            f"it was made for a differently configured {expected.get('class')} "
            f"(config {str(found.get('config_sha256'))[:12]}, this model's is "
            f"{str(expected.get('config_sha256'))[:12]})"
        )
    return None
