"""A block's residual, measured right whatever the block does with its input.

HyCa caches ``R_l = block_l(out) - block_l(in)`` for the stream that reaches the output.
Taking ``out - in`` after the call is only right when the block leaves its input alone.
Some do not: Forge Neo's FLUX blocks update the image stream in place (``img += ...``)
and return the same tensor, so ``out - in`` is identically zero and a forecast built on it
drops every block. diffusers' blocks and the other frontends' are out of place today, and
nothing promises they stay so.

:class:`ResidualMeter` learns, per block, whether the block writes into its input: on a
block's first call it keeps a copy of the input and compares afterwards (the version
counter where the tensor has one, the values otherwise: inference-mode tensors have no
version counter). A block found to write in place gets a copy of its input on every
later call; one that does not costs nothing more. A block that starts writing in place
after it was seen not to (detected through the version counter) is an error, never a
zero residual.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable

import torch


class ResidualError(RuntimeError):
    """The residual of a block cannot be measured on this call."""


def _version(tensor: torch.Tensor) -> int | None:
    try:
        return tensor._version
    except RuntimeError:  # inference tensors do not track a version counter
        return None


@dataclass
class Snapshot:
    """The input of one block call, taken by :meth:`ResidualMeter.before`."""

    key: Hashable
    stream: torch.Tensor
    copy: torch.Tensor | None
    version: int | None


class ResidualMeter:
    """Per block key: does the block update its input stream in place? See the module doc."""

    def __init__(self) -> None:
        self._in_place: dict[Hashable, bool] = {}

    def writes_in_place(self, key: Hashable) -> bool | None:
        """What was learned about ``key``: ``None`` before its first measured call."""
        return self._in_place.get(key)

    def before(self, key: Hashable, stream: torch.Tensor) -> Snapshot:
        """Call just before the block runs; ``stream`` is its input stream (a view is fine)."""
        known = self._in_place.get(key)
        copy = stream.detach().clone() if known is None or known else None
        return Snapshot(key, stream, copy, _version(stream))

    def residual(self, snapshot: Snapshot, out_stream: torch.Tensor) -> torch.Tensor:
        """``out_stream - input``, with the input as it was before the call. Raises
        :class:`ResidualError` when the input was overwritten and no copy was kept."""
        key, stream, copy = snapshot.key, snapshot.stream, snapshot.copy
        after = _version(stream)
        if after is not None and snapshot.version is not None:
            written = after != snapshot.version
        elif copy is not None:
            written = not torch.equal(copy, stream)
        else:
            written = False  # no counter and no copy: the block was seen to leave its input alone
        if key not in self._in_place:
            self._in_place[key] = written
        elif written:
            self._in_place[key] = True
        if written and copy is None:
            raise ResidualError(
                f"block {key!r} updated its input in place although it had not before; its residual on "
                "this call cannot be measured (the next calls keep a copy of its input)")
        return out_stream - (copy if copy is not None else stream)

    def reset(self) -> None:
        self._in_place.clear()
