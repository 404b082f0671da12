"""Another feature cache on the same transformer (diffusers' own, cache-dit): refused."""

from __future__ import annotations

import torch

from . import compat
from .block import BLOCK_HOOK, ROOT_HOOK


def other_cache(transformer: torch.nn.Module, scan: bool = True) -> tuple[str, str] | None:
    """``(what, how to remove it)`` for another feature cache on ``transformer``, or
    ``None``. ``scan``: also look for diffusers cache hooks applied without
    ``enable_cache`` (a walk over the submodules: done once per generation, not per call)."""
    config = getattr(transformer, "_cache_config", None)
    if config is not None:
        return (f"a diffusers cache enabled ({type(config).__name__}, transformer.enable_cache)",
                "call transformer.disable_cache()")
    if transformer.__dict__.get("_is_cached") or "_context_manager" in transformer.__dict__:
        return "cache-dit enabled (cache_dit.enable_cache)", "call cache_dit.disable_cache(pipe)"
    if scan:
        for module in transformer.modules():
            registry = compat.registry_of(module)
            if registry is None:
                continue
            for name, hook in registry.hooks.items():
                if hook._is_stateful and name not in (BLOCK_HOOK, ROOT_HOOK):
                    return (f"a diffusers cache hook ({name!r}, {type(hook).__name__})",
                            "remove it (transformer.disable_cache(), or the registry's remove_hook)")
    return None


class CacheConflict(RuntimeError):
    """HyCa and another feature cache on one transformer."""


def conflict_message(transformer: torch.nn.Module, found: tuple[str, str], hyca_first: bool) -> str:
    name, (what, fix) = type(transformer).__name__, found
    if hyca_first:
        return (f"{name} has HyCa enabled and now also {what}. Two feature caches on one model skip or forecast "
                f"each other's steps, so nothing was sampled: use one of them ({fix}, or hyca.disable(pipe))")
    return f"{name} already has {what}; {fix} first, then hyca.enable"
