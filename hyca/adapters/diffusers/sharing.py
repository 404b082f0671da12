"""Requests and probes on one transformer exclude each other.

A probe replaces HyCa's hooks on the transformer for each of its runs (:mod:`.probe`), and
the hooks it puts back are new objects: a request sampling on the transformer meanwhile
would run its steps through the probe's recorder (and break the probe) and lose its own
run state. So each transformer has a readers-writer lock: pipeline calls share it for
their whole duration, a probe run holds it alone; a probe waits for the calls in progress
to end, and calls that begin while a probe waits or runs wait for it. The thread holding
the lock alone may call the pipeline (the probe samples through it).
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections import Counter
from typing import Iterator

import torch


class SharedUse:
    """A readers-writer lock that prefers the writer (the probe): new readers wait while
    one waits. Readers may nest in their thread; the writer's thread may read."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._readers: Counter[int] = Counter()  # thread id -> nested shared holds
        self._writer: int | None = None
        self._writers_waiting = 0

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._condition:
            if self._writer == me:  # the probe's own pipeline calls
                held = False
            else:
                while (self._writer is not None or self._writers_waiting) and not self._readers[me]:
                    self._condition.wait()
                self._readers[me] += 1
                held = True
        try:
            yield
        finally:
            if held:
                with self._condition:
                    self._readers[me] -= 1
                    if not self._readers[me]:
                        del self._readers[me]
                    self._condition.notify_all()

    @contextlib.contextmanager
    def exclusive(self, model: str) -> Iterator[None]:
        """Raises ``RuntimeError`` when the calling thread is itself sampling on the model
        (waiting would never end)."""
        me = threading.get_ident()
        with self._condition:
            if self._readers[me]:
                raise RuntimeError(
                    f"HyCa: a probe of {model} was started inside a pipeline call on it, in the same thread; "
                    "it would wait for that call forever. Probe before sampling (hyca.probe, or hyca.enable with "
                    "num_inference_steps= and guidance_scale=)")
            nested = self._writer == me
            if not nested:
                self._writers_waiting += 1
                try:
                    while self._writer is not None or self._readers:
                        self._condition.wait()
                finally:
                    self._writers_waiting -= 1
                self._writer = me
        try:
            yield
        finally:
            if not nested:
                with self._condition:
                    self._writer = None
                    self._condition.notify_all()


_LOCKS: "weakref.WeakKeyDictionary[torch.nn.Module, SharedUse]" = weakref.WeakKeyDictionary()
_LOCKS_LOCK = threading.Lock()


def use_of(transformer: torch.nn.Module) -> SharedUse:
    """The transformer's lock (made on first use; it goes with the transformer)."""
    with _LOCKS_LOCK:
        found = _LOCKS.get(transformer)
        if found is None:
            found = _LOCKS[transformer] = SharedUse()
        return found


@contextlib.contextmanager
def sampling(transformers: list[torch.nn.Module]) -> Iterator[None]:
    """Hold each transformer's lock shared for a pipeline call (always in one order)."""
    with contextlib.ExitStack() as stack:
        for transformer in sorted(set(transformers), key=id):
            stack.enter_context(use_of(transformer).shared())
        yield
