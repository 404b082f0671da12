"""Every use of diffusers' private hook API, in one place (diffusers 0.42,
``src/diffusers/hooks/hooks.py`` and ``src/diffusers/models/cache_utils.py``).

HyCa keeps its block hooks alive inside diffusers' hook chains, so it reads fields diffusers
does not promise: a registry's ``_hook_order`` and ``_fn_refs`` (the order of the hooks on
a module and each one's forward references), the module attribute ``_diffusers_hook`` that
holds the registry, a ``StateManager``'s ``_context`` / ``_state_cache`` (which HyCa's
:class:`~.scopes.ScopeRouter` overrides per thread), ``_set_cache_context`` (how
``cache_context`` reaches a stateful hook: the ``StateManager`` among the hook's
attributes), and ``_reset_stateful_cache`` (what a pipeline's ``maybe_free_model_hooks``
calls). ``tests/test_diffusers_compat.py`` checks each on freshly built diffusers objects,
so a release that renames one fails there first (diffusers 0.40 named the context
differently).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.hooks.hooks import HookFunctionReference, HookRegistry, ModelHook, StateManager

#: The module attribute that holds a module's diffusers ``HookRegistry``.
REGISTRY_ATTRIBUTE = "_diffusers_hook"
#: The method a pipeline's ``maybe_free_model_hooks`` calls on components that have it.
RESET_METHOD = "_reset_stateful_cache"
#: ``StateManager`` fields HyCa reads or overrides.
STATE_MANAGER_FIELDS = ("_context", "_state_cache", "_state_cls", "_init_args", "_init_kwargs")
#: ``HookRegistry`` fields HyCa reads or edits.
REGISTRY_FIELDS = ("hooks", "_hook_order", "_fn_refs")

__all__ = ["HookFunctionReference", "HookRegistry", "ModelHook", "StateManager", "REGISTRY_ATTRIBUTE",
           "RESET_METHOD", "STATE_MANAGER_FIELDS", "REGISTRY_FIELDS", "registry_of", "registry", "hook_order",
           "forget", "refresh_children"]


def registry_of(module: torch.nn.Module) -> HookRegistry | None:
    """The module's diffusers hook registry, or None when it has none."""
    return getattr(module, REGISTRY_ATTRIBUTE, None)


def registry(module: torch.nn.Module) -> HookRegistry:
    """The module's diffusers hook registry, made when it has none."""
    return HookRegistry.check_if_exists_or_initialize(module)


def hook_order(found: Any) -> list[str]:
    """The names of a registry's hooks, innermost first (empty for no registry)."""
    return list(getattr(found, "_hook_order", ()))


def forget(found: HookRegistry, name: str) -> None:
    """Drop a hook from a diffusers registry without touching the module's ``forward``
    (which no longer goes through it)."""
    index = found._hook_order.index(name)
    del found.hooks[name]
    found._hook_order.pop(index)
    found._fn_refs.pop(index)


def refresh_children(module: torch.nn.Module) -> None:
    """Make the registry of ``module`` find its children's hooks again (``cache_context``
    walks the cached list of child registries)."""
    registry(module).invalidate_child_registries_cache()
