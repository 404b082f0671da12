"""Bytes a method's cache holds: every tensor reachable from its per-generation state.

Where the state lives: diffusers hooks (HyCa's included) keep it in a ``StateManager``
(``hook.state_manager`` / ``hook.states``, a dict of per-context states); cache-dit keeps
it in the transformer's ``_context_manager``. Model weights are never counted (modules
are not entered), and a storage reachable twice counts once. Sampled after every
transformer call; the peak is what a generation needs on top of the model.
"""

from __future__ import annotations

import contextlib
from collections import deque
from typing import Any, Iterator

import torch

MAX_DEPTH = 12


def _walk(obj: Any, seen_objects: set[int], storages: dict[int, int], depth: int) -> None:
    if depth > MAX_DEPTH or id(obj) in seen_objects:
        return
    seen_objects.add(id(obj))
    if isinstance(obj, torch.Tensor):
        if obj.device.type != "meta":
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        return
    if isinstance(obj, (torch.nn.Module, type, str, bytes, int, float, bool)) or callable(obj) and not hasattr(obj, "__dict__"):
        return
    if isinstance(obj, dict):
        children = list(obj.values())
    elif isinstance(obj, (list, tuple, set, frozenset, deque)):
        children = list(obj)
    elif hasattr(obj, "__dict__"):
        children = list(vars(obj).values())
    else:
        return
    for child in children:
        _walk(child, seen_objects, storages, depth + 1)


def tensor_bytes(*roots: Any) -> int:
    """Bytes of the distinct tensor storages reachable from ``roots`` (modules not entered)."""
    storages: dict[int, int] = {}
    seen: set[int] = set()
    for root in roots:
        _walk(root, seen, storages, 0)
    return sum(storages.values())


def cache_states(transformer: torch.nn.Module) -> list[Any]:
    """The per-generation state objects of every cache attached to ``transformer``."""
    states = []
    for module in transformer.modules():
        registry = getattr(module, "_diffusers_hook", None)
        for hook in getattr(registry, "hooks", {}).values():
            manager = getattr(hook, "state_manager", None) or getattr(hook, "states", None)
            if manager is not None and hasattr(manager, "_state_cache"):
                states.append(manager._state_cache)
    context_manager = getattr(transformer, "_context_manager", None)  # cache-dit
    if context_manager is not None:
        states.append(context_manager)
    return states


class PeakCacheBytes:
    """Largest :func:`tensor_bytes` of the cache states seen after any transformer call."""

    def __init__(self) -> None:
        self.peak = 0

    def _after(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        self.peak = max(self.peak, tensor_bytes(*cache_states(module)))

    @contextlib.contextmanager
    def attached(self, transformer: torch.nn.Module) -> Iterator["PeakCacheBytes"]:
        handle = transformer.register_forward_hook(self._after)
        try:
            yield self
        finally:
            handle.remove()
