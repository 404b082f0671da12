"""Where a transformer's step count comes from, and which pipeline is calling it (see
:mod:`.hooks`): the calling pipeline's scheduler, the cache context, or the scheduler given
to ``hyca.enable``."""

from __future__ import annotations

import sys
import weakref
from dataclasses import dataclass
from typing import Any

import torch

PIPELINE_TRANSFORMERS = ("transformer", "transformer_2")
#: How far up the call stack the calling pipeline is looked for (a pipeline's ``__call__``
#: is 3-6 frames above the transformer's hooks; decorators and helper methods add a few).
MAX_FRAMES = 48


@dataclass(frozen=True)
class Run:
    """What is known about the run a call belongs to."""

    total: int | None  # calls this transformer makes in its branch from this call to the end, this one included
    token: Any = None  # the run's schedule object (a scheduler's ``timesteps``), or None
    source: str = "none"  # "pipeline", "context", "scheduler" or "none"


def _weak(obj: Any) -> Any:
    try:
        return weakref.ref(obj)
    except TypeError:
        return None


#: torch's own module-call frames, between every pipeline and its transformer: their ``self``
#: is always the module, so they are passed without reading their locals (``f_locals`` copies
#: every local of the frame). Only torch's: a method shared by a module and a pipeline class
#: must be looked at every time.
_MODULE_CALLS = frozenset(getattr(getattr(torch.nn.Module, name, None), "__code__", None)
                          for name in ("_call_impl", "_wrapped_call_impl")) - {None}


def calling_pipeline(transformer: torch.nn.Module, frame: Any = None) -> Any:
    """The pipeline whose method is calling ``transformer`` now: the nearest frame on the
    call stack (from ``frame``, else the caller's) whose ``self`` holds this transformer.
    ``None`` for hand-written loops."""
    frame = frame if frame is not None else sys._getframe(1)
    for _ in range(MAX_FRAMES):
        if frame is None:
            return None
        code = frame.f_code
        if code.co_argcount and code.co_varnames[0] == "self" and code not in _MODULE_CALLS:
            owner = frame.f_locals.get("self")
            if owner is not transformer and not isinstance(owner, torch.nn.Module) and _holds(owner, transformer):
                return owner
        frame = frame.f_back
    return None


def call_arguments(pipe: Any) -> dict[str, Any]:
    """The local variables of ``pipe``'s ``__call__`` running now (its arguments, as far as
    the call has not reassigned them); empty when no such frame is on the stack."""
    frame = sys._getframe(1)
    for _ in range(MAX_FRAMES):
        if frame is None:
            return {}
        if frame.f_code.co_name == "__call__" and frame.f_locals.get("self") is pipe:
            return dict(frame.f_locals)
        frame = frame.f_back
    return {}


def _holds(owner: Any, transformer: torch.nn.Module) -> bool:
    return (getattr(owner, "scheduler", None) is not None
            and any(getattr(owner, a, None) is transformer for a in PIPELINE_TRANSFORMERS))


def _expert_of(pipe: Any, transformer: torch.nn.Module) -> str | None:
    """For a two-expert pipeline (Wan 2.2 A14B: ``transformer_2`` and ``boundary_ratio``),
    which expert ``transformer`` is; ``None`` for a pipeline with one transformer."""
    config = getattr(pipe, "config", None)
    ratio = config.get("boundary_ratio") if config is not None and hasattr(config, "get") else None
    if ratio is None or getattr(pipe, "transformer_2", None) is None:
        return None
    return "transformer_2" if pipe.transformer_2 is transformer else "transformer"


def scheduler_run(scheduler: Any, pipe: Any = None, expert: str | None = None) -> Run | None:
    """Calls left in the run ``scheduler`` drives, from its current position: its
    timesteps from ``step_index`` (before the first step, from ``begin_index``, which
    img2img pipelines set) to the end. Second-order schedulers list one timestep per model
    call, so this counts calls. For one expert of a two-expert pipeline, only the
    timesteps on its side of the boundary (Wan 2.2: ``t >= boundary_ratio *
    num_train_timesteps`` is the high-noise ``transformer``)."""
    timesteps = getattr(scheduler, "timesteps", None)
    if timesteps is None:
        return None
    index = getattr(scheduler, "step_index", None)
    if index is None:
        index = getattr(scheduler, "begin_index", None) or 0
    if index >= len(timesteps):  # a finished run: this scheduler is not the one driving the calls
        return None
    if expert is not None:
        left = timesteps[index:]
        boundary = pipe.config.boundary_ratio * scheduler.config.num_train_timesteps
        high = int((torch.as_tensor(left) >= boundary).sum())
        total = high if expert == "transformer" else len(left) - high
    else:
        total = len(timesteps) - index
    return Run(total, _weak(timesteps), "scheduler")


class Steps:
    """Where a transformer's step count comes from (see the module doc). ``scheduler``: the
    one given to ``hyca.enable`` for hand-written loops; ``pipeline``: the pipeline HyCa
    was enabled on, whose *current* scheduler serves calls made outside any pipeline."""

    def __init__(self, scheduler: Any = None, pipeline: Any = None) -> None:
        self.scheduler = scheduler
        self._pipeline = _weak(pipeline) if pipeline is not None else None

    def run(self, transformer: torch.nn.Module, context: Any, pipe: Any) -> Run:
        """The run a call of ``transformer`` belongs to; ``pipe``: the pipeline calling it
        (:func:`calling_pipeline`), or None."""
        if pipe is not None:
            found = scheduler_run(pipe.scheduler, pipe, _expert_of(pipe, transformer))
            if found is not None:
                return Run(found.total, found.token, "pipeline")
        if context is not None and getattr(context, "num_inference_steps", None):
            done = getattr(context, "step_index", None) or 0
            return Run(context.num_inference_steps - done, None, "context")
        owner, scheduler = self.outside_pipelines()
        if scheduler is not None:
            found = scheduler_run(scheduler, owner, _expert_of(owner, transformer) if owner is not None else None)
            if found is not None:
                return found
        return Run(None)

    def outside_pipelines(self) -> tuple[Any, Any]:
        """For calls no pipeline makes: the pipeline HyCa was enabled on (or None) and the
        scheduler that serves them (the one given to ``hyca.enable``, else that pipeline's
        current one)."""
        owner = self._pipeline() if self._pipeline is not None else None
        return owner, self.scheduler if self.scheduler is not None else getattr(owner, "scheduler", None)
