"""ComfyUI's batched guidance: one model call, one engine branch per ``cond_or_uncond`` chunk.

``comfy/samplers.py`` ``_calc_cond_batch`` concatenates the cond and uncond inputs into one
``apply_model`` call when memory allows (uncond first: it pops its run list from the end)
and says which chunk is which in ``transformer_options["cond_or_uncond"]`` (0 cond,
1 uncond, one entry per chunk of equal rows). The diffusers pipelines call the transformer
once per branch, and the engine pairs two branches at one step: the second to check judges
the forecasts of their difference ``cond - uncond``, which guidance multiplies
(:meth:`hyca.engine.run_branches.RunBranches.peer_of`). Kept as one branch, a batched call gets
no such verdicts and its guard decides otherwise than the diffusers path.

:class:`ChunkedSession` keeps each chunk as its own branch, keyed as a call of that chunk
alone would be (``((hint,), chunk shape)``), so a run whose chunks ComfyUI sometimes
batches and sometimes calls apart (low memory) keeps one history per branch. The chunks'
steps begin and end in the order the diffusers pipelines call them (cond first), and the
blocks' residuals are recorded, and forecasts added, on each chunk's rows of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..webui.session import Call, HyCaFailure, PassSession


@dataclass
class Chunk:
    """One ``cond_or_uncond`` chunk of a batched call: its rows and its branch's call."""

    hint: int
    rows: slice
    call: Call


@dataclass
class ChunkedCall:
    """What the blocks of a batched call need to know, per chunk (in row order)."""

    chunks: list[Chunk]
    image_tokens: int | None = None   # length of the image stream, for concatenated streams
    forecast_pending: list[bool] = field(default_factory=list)  # per chunk: no block added its forecast yet

    def order(self) -> list[Chunk]:
        """The chunks in the order the diffusers pipelines call their branches (cond first)."""
        return sorted(self.chunks, key=lambda chunk: chunk.hint)


class ChunkedSession(PassSession):
    """A :class:`PassSession` that splits a batched model call into one branch per
    ``cond_or_uncond`` chunk (see the module doc). A call of one chunk runs as before."""

    def begin_call(self, x: torch.Tensor, sigma: Any, hint: Any = None,
                   ids: tuple | None = None) -> Call | ChunkedCall | None:
        """Each chunk's step begins in its own branch, cond first; ``ids``: each chunk's
        conditioning (``transformer_options["uuids"]``), so two positive conditionings are two
        branches. Raises :class:`HyCaFailure` when the batch does not split into equal chunks."""
        if ids is not None and (hint is None or len(ids) != len(hint)):
            ids = None  # not one per chunk: told apart by their order, as without ids
        if hint is None or len(hint) < 2:
            return super().begin_call(x, sigma, hint, ids)
        if x.shape[0] % len(hint):
            raise HyCaFailure(f"a batch of {x.shape[0]} rows does not split into its {len(hint)} guidance chunks")
        rows = x.shape[0] // len(hint)
        layout = [(h, slice(i * rows, (i + 1) * rows)) for i, h in enumerate(hint)]
        calls: dict[int, Call] = {}
        for i in sorted(range(len(layout)), key=lambda i: layout[i][0]):  # cond first
            h, part = layout[i]
            call = super().begin_call(x[part], sigma, (h,), (ids[i],) if ids is not None else None)
            if call is None:
                return None
            calls[i] = call
        chunks = [Chunk(h, part, calls[i]) for i, (h, part) in enumerate(layout)]
        return ChunkedCall(chunks, forecast_pending=[not chunk.call.computing for chunk in chunks])

    def parts(self, call: Call | ChunkedCall) -> list[tuple[slice, Call]]:
        """Each chunk's rows with its branch's call (model-output target)."""
        if not isinstance(call, ChunkedCall):
            return super().parts(call)
        return [(chunk.rows, chunk.call) for chunk in call.order()]

    def end_call(self, call: Call | ChunkedCall) -> None:
        """Each chunk's step ends in its branch, cond first: the uncond branch's guard check
        then pairs with the cond's, as in the diffusers pipelines' two calls."""
        if not isinstance(call, ChunkedCall):
            return super().end_call(call)
        for chunk in call.order():
            super().end_call(chunk.call)

    def block(self, index: int, stream: torch.Tensor, run: Callable[[], Any],
              out_stream: Callable[[Any], torch.Tensor],
              passthrough: Callable[[torch.Tensor | None], Any]) -> Any:
        """As :meth:`PassSession.block`, per chunk: the blocks run when any chunk computes,
        each recording chunk records its rows of the residual, and the rows of a chunk that
        forecasts (a branch whose forecast was not finite computes alone) are its inputs
        handed on, the first block adding that chunk's forecast."""
        call = self.active
        if not isinstance(call, ChunkedCall) or self.model_target:  # model output: the call is run or forecast whole
            return super().block(index, stream, run, out_stream, passthrough)
        computing = [chunk for chunk in call.chunks if chunk.call.computing]
        if not computing:
            return passthrough(self._forecast_stream(call, stream))
        recording = [chunk for chunk in computing if chunk.call.record]
        snapshot = self._keep_input(index, stream) if recording else None
        # the forecasting chunks' hand-on, taken before the block runs: ComfyUI's FLUX blocks
        # update their img / txt inputs in place (comfy/ldm/flux/layers.py, img += ...)
        handed_on = None if len(computing) == len(call.chunks) else \
            _detached(passthrough(self._forecast_stream(call, stream)))
        out = run()
        if recording:
            try:
                residual = self.meter.residual(snapshot, out_stream(out))
                for chunk in recording:
                    self.engine.record(chunk.call.branch.state, index, residual[chunk.rows])
            except Exception as error:  # noqa: BLE001
                raise HyCaFailure(f"could not record block {index} ({error})") from error
        if handed_on is None:
            return out
        return _rows_from(out, handed_on, [chunk.rows for chunk in call.chunks if not chunk.call.computing])

    def _keep_input(self, index: int, stream: torch.Tensor) -> Any:
        try:
            return self.meter.before(index, stream)
        except Exception as error:  # noqa: BLE001
            raise HyCaFailure(f"could not keep block {index}'s input ({error})") from error

    def _forecast_stream(self, call: ChunkedCall, stream: torch.Tensor) -> torch.Tensor | None:
        """``stream`` with each forecasting chunk's forecast added to its rows, for the first
        block that runs for that chunk; ``None`` when no chunk has one left to add."""
        pending = [i for i, waiting in enumerate(call.forecast_pending) if waiting]
        if not pending:
            return None
        try:
            pieces = []
            for i, chunk in enumerate(call.chunks):
                rows = stream[chunk.rows]
                if i in pending:
                    call.forecast_pending[i] = False
                    rows = rows + self.engine.predicted_residual(chunk.call.branch.state).to(stream.dtype)
                pieces.append(rows)
            return torch.cat(pieces)
        except Exception as error:  # noqa: BLE001
            raise HyCaFailure(f"could not forecast a guidance chunk ({error})") from error


def _detached(handed_on: Any) -> Any:
    """A replace patch's hand-on dict with its tensors copied (a block that runs afterwards
    may write into the tensors it references)."""
    if not isinstance(handed_on, dict):
        return handed_on
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in handed_on.items()}


def _rows_from(out: Any, handed_on: Any, rows: list[slice]) -> Any:
    """``out`` (a replace patch's dict) with ``rows`` of each tensor taken from ``handed_on``."""
    if not isinstance(out, dict) or not isinstance(handed_on, dict):
        raise HyCaFailure("a block's output is not a dict, so a forecasting chunk's rows cannot be handed on")
    mixed = dict(out)
    for key, kept in handed_on.items():
        computed = out.get(key)
        if isinstance(kept, torch.Tensor) and isinstance(computed, torch.Tensor):
            mixed[key] = computed.clone()
            for part in rows:
                mixed[key][part] = kept[part]
    return mixed
