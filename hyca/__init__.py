"""HyCa: training-free acceleration of diffusion transformers by hybrid feature caching."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public names and the module each lives in. Imported on first use, so that `python -m hyca
# show` and the WebUI's startup do not pay for importing diffusers (several seconds).
_EXPORTS: dict[str, str] = {
    "enable": ".adapters.diffusers", "disable": ".adapters.diffusers", "is_enabled": ".adapters.diffusers",
    "recommended_settings": ".adapters.diffusers", "reset": ".adapters.diffusers", "stats": ".adapters.diffusers",
    "HybridCache": ".engine", "Schedule": ".engine",
    "get_solver": ".math.solvers", "pool": ".math.solvers",
    "Profile": ".profiles",
    "probe": ".adapters.diffusers.probe",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hyca' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
