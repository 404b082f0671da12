"""Instance-level block wrappers, for hook points that offer no replace patch.

``install`` puts a wrapper in each block's instance ``forward`` (the class is never
touched, so other instances of the class are unaffected); the wrapper asks the *current*
session through ``active()`` and calls the block's own forward when there is none, so a
wrapper left behind by a crashed generation computes exactly what the block computes.
``remove`` puts back whatever instance attribute was there before (another extension's
wrapper included), so HyCa leaves the model as it found it.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

MARK = "_hyca_gate"


def is_gated(block: torch.nn.Module) -> bool:
    return getattr(block.__dict__.get("forward"), MARK, False)


def install(block: torch.nn.Module, gate: Callable[..., Any]) -> None:
    """``gate(original_forward, *args, **kwargs)`` replaces ``block.forward``; idempotent."""
    if is_gated(block):
        return
    saved = block.__dict__.get("forward")  # an earlier instance-level wrapper, or None
    original = saved if saved is not None else block.forward

    def forward(*args, **kwargs):
        return gate(original, *args, **kwargs)

    setattr(forward, MARK, True)
    forward._hyca_saved = saved  # type: ignore[attr-defined]
    block.forward = forward


def remove(block: torch.nn.Module) -> None:
    wrapper = block.__dict__.get("forward")
    if not getattr(wrapper, MARK, False):
        return
    saved = wrapper._hyca_saved
    if saved is None:
        del block.forward
    else:
        block.forward = saved


def remove_all(root: torch.nn.Module) -> int:
    """Remove every HyCa wrapper under ``root`` (itself included); how many there were."""
    count = 0
    for module in root.modules():
        if is_gated(module):
            remove(module)
            count += 1
    return count
