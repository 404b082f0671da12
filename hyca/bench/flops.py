"""FLOPs of the transformer calls of one whole generation, counted by ``FlopCounterMode``.

Only transformer calls count (not the caption encoder or the scheduler): one counter is
opened per call, because ``FlopCounterMode`` clears its totals each time it is entered.
FLOPs do not depend on the machine, so their ratios are stable across runs.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, TypeVar

import torch
from torch.utils.flop_counter import FlopCounterMode

T = TypeVar("T")


class _WholeModelOnly:
    """Stand-in for ``FlopCounterMode``'s module tracker: every FLOP goes to "Global".
    Per-module attribution is not needed here, and the real tracker's global module hooks
    both slow every call and recurse forever on cache-dit's wrapped blocks (a module
    cycle), so it is replaced; the counting itself is FlopCounterMode's own."""

    parents = frozenset({"Global"})

    def __enter__(self) -> "_WholeModelOnly":
        return self

    def __exit__(self, *args: object) -> None:
        return None


def counter() -> FlopCounterMode:
    mode = FlopCounterMode(display=False)
    mode.mod_tracker = _WholeModelOnly()
    return mode


class TransformerFlops:
    """Running total of FLOPs over the calls of one transformer while it is attached."""

    def __init__(self) -> None:
        self.total = 0
        self.calls = 0
        self._counter: FlopCounterMode | None = None

    def _before(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self._counter = counter()
        self._counter.__enter__()

    def _after(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        counter, self._counter = self._counter, None
        if counter is not None:
            counter.__exit__(None, None, None)
            self.total += counter.get_total_flops()
            self.calls += 1

    @contextlib.contextmanager
    def attached(self, transformer: torch.nn.Module) -> Iterator["TransformerFlops"]:
        # always_call: a call that raises still closes its counter (and leaves the mode stack clean)
        handles = [transformer.register_forward_pre_hook(self._before, with_kwargs=True),
                   transformer.register_forward_hook(self._after, with_kwargs=True, always_call=True)]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()


def generation_flops(transformer: torch.nn.Module, run: Callable[[], T]) -> tuple[int, T]:
    """``(FLOPs of every transformer call made by run(), run()'s result)``."""
    flops = TransformerFlops()
    with flops.attached(transformer), torch.no_grad():
        result = run()
    return flops.total, result
