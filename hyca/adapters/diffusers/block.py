"""The hook on each transformer block: run the block and record its residual, or pass
its inputs through (see :mod:`.hooks`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ...layouts import BlockList, text_dropped
from .calls import _argument, _parameter_names
from .compat import ModelHook
from .scopes import ACTIVE, BranchStates

if TYPE_CHECKING:
    from .root import HyCaRoot

ROOT_HOOK = "hyca"  # the attribute ``_hyca`` on the transformer holds the root controller
BLOCK_HOOK = "hyca_block"

_COMPUTE, _PASS, _PLAIN = "compute", "pass", "plain"


class HyCaBlockHook(ModelHook):
    """On each block: run it and record the residual, or pass the inputs through.

    Stateful so that diffusers' ``cache_context`` and ``_reset_stateful_cache`` reach the
    shared :class:`BranchStates` (the first block's hook resets it). The decisions and the
    recording run outside ``torch.compile`` (``torch.compiler.disable``), the block itself
    inside it, so regional compilation (``compile_repeated_blocks``) compiles the blocks
    and leaves HyCa's bookkeeping to Python."""

    _is_stateful = True

    def __init__(self, index: int, spec: BlockList, root: "HyCaRoot") -> None:
        super().__init__()
        self.index = index
        self.spec = spec
        self.root = root
        self.states = root.router  # found by diffusers' cache_context; leads to the calling scope
        self.inert = False  # left in a chain HyCa could not take itself out of: plain forward
        self._names: tuple[str, ...] = ()

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        self._names = _parameter_names(type(module).forward)[1:]
        return module

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        if self.index == 0:
            self.root.reset()
        return module

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        # Under torch.compile the bookkeeping runs through torch.compiler.disable (a graph
        # break: it stays Python); outside it, directly: the disable wrapper costs a few
        # microseconds per call even when nothing compiles, twice per block and step.
        compiling = torch.compiler.is_compiling()
        action, scope, carried = (self._before_eager if compiling else self._before)(args, kwargs)
        if action == _COMPUTE:
            output = self.fn_ref.original_forward(*args, **kwargs)
            (self._after_eager if compiling else self._after)(scope, carried, output)
            return output
        if action == _PASS:
            return self._pass_through(module, carried, args, kwargs)
        return self.fn_ref.original_forward(*args, **kwargs)

    def _before(self, args: tuple, kwargs: dict) -> tuple[str, Any, Any]:
        """What to do with this block call: ``(_COMPUTE, scope, snapshot of the input stream)``,
        ``(_PASS, scope, stream to pass on)`` or ``(_PLAIN, None, None)``."""
        scope = ACTIVE.get()
        state = None if scope is None or scope.root is not self.root else scope.current
        if self.inert or state is None or scope.bypass:
            return _PLAIN, None, None
        scope.reports += 1
        stream = _argument(self._names, self.spec.stream, args, kwargs)
        if self.index == 0:
            scope.stream_tokens = stream.shape[1]
        if not state.computing and self.index == 0:
            why = None
            try:
                predicted = scope.engine.predicted_residual(state)
                if scope.output_target:  # the head takes it; the blocks only pass their inputs on
                    scope.head_forecast = predicted
                else:
                    stream = stream + predicted.to(device=stream.device, dtype=stream.dtype)
            except Exception as error:  # compute this step and the rest of this generation instead
                why = f"forecast failed ({error})"
            why = self.root.agreed(scope, why, "the forecast failed on another context-parallel rank")
            if why is not None:
                scope.engine.fail(state, why)  # the engine marks this step and the rest computed
        if state.computing:
            if scope.output_target:  # the head's input is recorded, not the blocks' residuals
                return _PLAIN, None, None
            return _COMPUTE, scope, None if state.failed else self.root.meter.before(self.index, stream)
        return _PASS, scope, stream

    def _after(self, scope: BranchStates, snapshot: Any, output: Any) -> None:
        state = scope.current
        if snapshot is None or state is None or state.failed:
            return
        returns = self.spec.returns
        out_stream = output if isinstance(returns, str) else output[returns.index(self.spec.stream)]
        try:
            residual = self.root.meter.residual(snapshot, out_stream)
            scope.engine.record(state, self.index, self._output_part(scope, residual))
        except Exception as error:
            scope.engine.fail(state, f"caching failed ({error})")

    _before_eager = torch.compiler.disable(_before)
    _after_eager = torch.compiler.disable(_after)

    def _output_part(self, scope: BranchStates, tokens: torch.Tensor) -> torch.Tensor:
        """The tokens of a stream that reach the transformer's output."""
        if self.spec.stream_tokens == "tail":
            return tokens[:, tokens.shape[1] - scope.stream_tokens:]
        if self.spec.stream_tokens == "head":
            return tokens[:, :scope.stream_tokens]
        return tokens

    def _pass_through(self, module: torch.nn.Module, stream: torch.Tensor, args: tuple, kwargs: dict):
        returns = self.spec.returns
        if isinstance(returns, str):
            return stream
        dropped = text_dropped(self.spec.layout, module)
        return tuple(stream if name == self.spec.stream else
                     None if dropped else _argument(self._names, name, args, kwargs)
                     for name in returns)
