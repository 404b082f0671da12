"""Which solver slot each block's dimensions feed: the masks :meth:`~hyca.engine.cache.HybridCache.record`
multiplies a block's residual by (see :mod:`hyca.engine.cache`), built once per profile, device and
dtype and shared by every engine of that profile."""

from __future__ import annotations

import torch

#: Residuals whose per-slot sums together take at most this many bytes are recorded into one
#: stacked tensor (:meth:`~hyca.engine.cache.HybridCache._record_stacked`); larger ones slot by slot.
STACKED_BYTES = 16 * 2 ** 20


_MASKS: dict[tuple, list[list[tuple[int, torch.Tensor | None]]]] = {}


def block_masks(one_hot: torch.Tensor, profile_key: str, device: torch.device,
                dtype: torch.dtype) -> list[list[tuple[int, torch.Tensor | None]]]:
    """Per block: (solver slot, ``(dim,)`` dimension mask, or None when the block uses one
    solver) for every slot the block feeds. ``one_hot``: ``(blocks, slots, dim)``. Shared by
    every engine of the same profile (``profile_key``), so building one engine per request
    costs no mask transfers after the first. (One masked update per slot and block measured
    faster than one stacked update of every slot per block on the reference model's shapes:
    bench/results/engine_overhead.md.)"""
    key = (profile_key, device, dtype)
    if key not in _MASKS:
        if len(_MASKS) > 64:
            _MASKS.clear()
        per_block = []
        for block in one_hot:  # (slots, dim)
            used = [s for s in range(block.shape[0]) if block[s].any()]
            per_block.append([(used[0], None)] if len(used) == 1 else
                             [(s, block[s].to(device=device, dtype=dtype)) for s in used])
        _MASKS[key] = per_block
    return _MASKS[key]


_STACKED_MASKS: dict[tuple, list[torch.Tensor]] = {}


def stacked_masks(one_hot: torch.Tensor, profile_key: str, device: torch.device,
                  dtype: torch.dtype) -> list[torch.Tensor]:
    """Per block, its ``(slots, dim)`` 0/1 mask of every slot (zero rows for the slots it
    does not feed), for :meth:`HybridCache._record_stacked`; shared as :func:`block_masks`."""
    key = (profile_key, device, dtype)
    if key not in _STACKED_MASKS:
        if len(_STACKED_MASKS) > 64:
            _STACKED_MASKS.clear()
        _STACKED_MASKS[key] = [block.to(device=device, dtype=dtype) for block in one_hot]
    return _STACKED_MASKS[key]
