"""The output targets on a diffusers transformer (:mod:`hyca.engine.targets`): a profile
that forecasts the output head's input (``"output"``) or the transformer's output
(``"model_output"``) instead of the blocks' residuals.

Either way the blocks neither record nor add a forecast: at a computed step the head's
input or the call's output is recorded as block 0; at a skip step the first block makes the
forecast and the rest pass their inputs on, and the head's pre-hook or the root's post-hook
puts the forecast in place.

**A model-output skip step runs no transformer at all.** Its output is the forecast alone:
the embeddings, the blocks and the head compute nothing it keeps. A torch forward hook
cannot skip the forward it surrounds, so :class:`SkipHook`, one diffusers ``ModelHook`` on
the transformer, returns at such a call the branch's latest computed output (its sample an
empty stand-in of the same shape) and the transformer's forward is not called; the root's
post-hook then puts the forecast in as for a call that ran. The WebUI and ComfyUI hosts do
the same on their model call (``hyca/adapters/webui/model_call.py``). Only an optimisation:
where the hook is not in the forward chain (unwrapped by another library), while
``torch.compile`` traces, under context parallelism (each rank's forward gathers the
output), or before the branch has a computed output called with the same ``return_dict``,
the call runs and the blocks pass their inputs on. The output is the same bits either way:
the forecast does not depend on the forward.
"""

from __future__ import annotations

from typing import Any

import torch

from ...engine.state import BranchState
from ...engine.targets import MODEL_OUTPUT, OUTPUT, from_tokens, output_tokens
from .calls import _argument, sample_of, with_sample
from .compat import ModelHook
from .scopes import ACTIVE, BranchStates, HostState

SKIP_HOOK = "hyca_skip"


class SkipHook(ModelHook):
    """On the transformer: return a model-output skip call's output without running the
    forward, when the root's pre-hook found the call skippable (``BranchStates.may_skip``)."""

    def __init__(self, root: Any) -> None:
        super().__init__()
        self.root = root
        self.inert = False  # left in a chain HyCa could not take itself out of: plain forward

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if not self.inert and not torch.compiler.is_compiling():
            scope = ACTIVE.get()
            if scope is not None and scope.root is self.root and scope.may_skip:
                output = self.root.skipped_call(scope)
                if output is not None:
                    return output
        return self.fn_ref.original_forward(*args, **kwargs)


class OutputTargets:
    """The output-target half of :class:`~.root.HyCaRoot`."""

    def _may_skip(self, states: BranchStates, state: HostState, args: tuple, kwargs: dict) -> bool:
        """Whether this call (begun, not computing) may return its forecast without running
        the forward (see the module doc); notes the call's ``return_dict`` (model-output target)."""
        if states.engine.target != MODEL_OUTPUT:
            return False
        states.return_dict = (_argument(self._names, "return_dict", args, kwargs) if "return_dict" in self._names
                              else None)
        return (not state.computing and states.parallel is None and state.output_like is not None
                and state.output_return_dict == states.return_dict)

    def skipped_call(self, states: BranchStates) -> Any:
        """For :class:`SkipHook`: make this skip step's forecast (as the first block would)
        and return the output the forward would have had around it; None when the forecast
        failed (the step and the rest of the run are then computed, said once)."""
        state = states.current
        try:
            states.head_forecast = states.engine.predicted_residual(state)
        except Exception as error:
            states.engine.fail(state, f"forecast failed ({error})")
            return None
        states.skipped = True
        return state.output_like

    @torch.compiler.disable
    def _head_pre(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Output target: record the head's input on a computed step; replace it with the
        forecast made at the first block on a skipped one."""
        states = ACTIVE.get()
        state = None if states is None or states.root is not self else states.current
        if state is None or states.bypass or states.engine.target != OUTPUT:
            return None
        x = args[0] if args else kwargs["input"]
        forecast = self._record_or_take(states, state, lambda: x, "the output head")
        if forecast is None:
            return None
        forecast = forecast.to(device=x.device, dtype=x.dtype)
        return ((forecast, *args[1:]), kwargs) if args else (args, {**kwargs, "input": forecast})

    def _model_output(self, states: BranchStates, state: HostState, output: Any) -> Any:
        """Target ``"model_output"``: record the call's output at a computed step (and keep
        its form for skipped calls); at a skip step return the output with the forecast in
        place of its sample. Returns the replacement output, or None to keep the call's."""
        sample = sample_of(output)
        forecast = self._record_or_take(states, state, lambda: output_tokens(sample, states.engine.profile),
                                        "the model output")
        if forecast is None:
            if state.computing and not state.failed and isinstance(sample, torch.Tensor):
                # the form only: a one-element tensor seen in the sample's shape holds no memory
                state.output_like = with_sample(output, sample.new_empty(1).expand(sample.shape))
                state.output_return_dict = states.return_dict
            return None
        return with_sample(output, from_tokens(forecast, sample))

    @staticmethod
    def _record_or_take(states: BranchStates, state: BranchState, value: Any, where: str) -> torch.Tensor | None:
        """The output targets' part: at a computed step record ``value()`` as block 0 (a
        failure computes the rest of the run and says why) and return None; at a skip step
        return the forecast the first block made (``where`` names the place, for the error)."""
        if state.computing:
            if not state.failed:
                try:
                    states.engine.record(state, 0, value())
                except Exception as error:
                    states.engine.fail(state, f"caching failed ({error})")
            return None
        forecast, states.head_forecast = states.head_forecast, None
        if forecast is None:
            raise RuntimeError(f"HyCa: a forecast step reached {where} without a forecast")
        return forecast
