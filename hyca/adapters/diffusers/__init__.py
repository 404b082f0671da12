"""The diffusers adapter: hooks on diffusers transformers through ``diffusers.hooks``.

Names are imported on first use, so that the family table (``.families``), which needs
only torch, can be read where diffusers is old or missing (a WebUI's pinned diffusers).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "FAMILIES": ".families",
    "disable": ".api", "enable": ".api", "is_enabled": ".api", "recommended_settings": ".recommend",
    "reset": ".api", "stats": ".api",
}
# The probe lives in the submodule ``.probe`` (``hyca.probe`` is its ``probe``): not exported
# here, where the name would shadow the submodule.

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value
