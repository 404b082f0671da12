"""HyCa on diffusers' own hook machinery.

One stateful hook on the transformer decides, per call, whether the blocks run; one hook
per block either runs the block and reports its residual, or passes its inputs through.
On a skip step the first block adds the forecast of the summed residuals, so the rest of
the stack is a chain of cheap identities and the embeddings and output layers run as
usual. State lives in a ``StateManager``: one :class:`BranchState` per
``transformer.cache_context(name)``, reset by the pipeline when it finishes.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Callable

import torch
from diffusers.hooks.hooks import HookRegistry, ModelHook, StateManager

from ...engine.cache import BranchState, HybridCache
from .families import BlockList, Family

logger = logging.getLogger("hyca")

ROOT_HOOK = "hyca"
BLOCK_HOOK = "hyca_block"
DEFAULT_BRANCH = "default"


class BranchStates(StateManager):
    """diffusers' ``StateManager`` keyed by cache context, plus default branches for
    sampling loops that call the transformer without opening a ``cache_context``.

    Also the scratch space of one transformer call, shared by the root and block hooks:
    whether HyCa stays out of it (``bypass``) and how many tokens the output stream has
    (``stream_tokens``, for blocks that see it concatenated behind the text)."""

    def __init__(self, state_cls: type) -> None:
        super().__init__(state_cls)
        self._unnamed = DEFAULT_BRANCH
        self._last_unnamed_position: float | None = None
        self._calls_at_position = 0
        self.bypass = False
        self.stream_tokens: int | None = None

    def name_unnamed_call(self, position: float | None) -> None:
        """Pick the branch of a call made outside any ``cache_context``. Pipelines such as
        Chroma's and Lumina2's run cond, then uncond, at the same timestep without naming
        them: the k-th call at one position is the k-th branch of that step."""
        if self._context is not None:
            return
        same = position is not None and position == self._last_unnamed_position
        self._calls_at_position = self._calls_at_position + 1 if same else 0
        self._last_unnamed_position = position
        k = self._calls_at_position
        self._unnamed = DEFAULT_BRANCH if k == 0 else f"{DEFAULT_BRANCH}#{k + 1}"

    def get_state(self) -> BranchState:
        if self._context is None:
            if self._unnamed not in self._state_cache:
                self._state_cache[self._unnamed] = self._state_cls()
            return self._state_cache[self._unnamed]
        return super().get_state()

    def all_states(self) -> dict[str, BranchState]:
        return dict(self._state_cache)

    def reset(self) -> None:
        super().reset()
        self._unnamed, self._last_unnamed_position, self._calls_at_position = DEFAULT_BRANCH, None, 0


def _parameter_names(function: Callable) -> tuple[str, ...]:
    return tuple(inspect.signature(function).parameters)


def _argument(names: tuple[str, ...], name: str, args: tuple, kwargs: dict) -> Any:
    if name in kwargs:
        return kwargs[name]
    index = names.index(name)
    return args[index] if index < len(args) else None


def _shape_signature(sample: Any) -> tuple | None:
    """Shape of the model input (a tensor, or Z-Image's list of tensors): a new one
    means a new batch or resolution, and a fresh state."""
    if isinstance(sample, torch.Tensor):
        return tuple(sample.shape)
    if isinstance(sample, (list, tuple)) and all(isinstance(s, torch.Tensor) for s in sample):
        return tuple(tuple(s.shape) for s in sample)
    return None


class HyCaHook(ModelHook):
    """On the transformer: step counting, positions, and the compute/forecast decision."""

    _is_stateful = True

    def __init__(self, engine: HybridCache, family: Family, states: BranchStates,
                 total_steps: Callable[[int | None], int | None]) -> None:
        super().__init__()
        self.engine = engine
        self.family = family
        self.states = states
        self.total_steps = total_steps
        self._names: tuple[str, ...] = ()

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        self._names = _parameter_names(type(module).forward)[1:]
        return module

    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        bypass = self.states.bypass = any(
            _argument(self._names, name, args, kwargs) is not None for name in self.family.bypass_args)
        if bypass:  # e.g. SD3's skip-layer guidance pass: some blocks never run, nothing to cache
            return args, kwargs
        context = self.states._context
        timestep = _argument(self._names, self.family.timestep_arg, args, kwargs)
        position = None
        if context is not None and context.sigma is not None:
            position = float(context.sigma)
        elif timestep is not None:
            position = float(torch.as_tensor(timestep).flatten()[0])
        self.states.name_unnamed_call(position)
        state = self.states.get_state()
        sample = _argument(self._names, self.family.input_arg, args, kwargs)
        signature = _shape_signature(sample)
        total = context.num_inference_steps if context is not None and context.num_inference_steps else None
        self.engine.begin_step(state, position, signature, self.total_steps(total))
        return args, kwargs

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        if self.states.bypass:
            self.states.bypass = False
        else:
            self.engine.end_step(self.states.get_state())
        return output

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        for name, state in self.states.all_states().items():
            if state.stats.total:
                logger.info("HyCa [%s]: %s", name, state.stats.describe())
        self.states.reset()
        return module


class HyCaBlockHook(ModelHook):
    """On each block: run it and report the residual, or pass the inputs through."""

    def __init__(self, index: int, spec: BlockList, engine: HybridCache, states: BranchStates) -> None:
        super().__init__()
        self.index = index
        self.spec = spec
        self.engine = engine
        self.states = states
        self._names: tuple[str, ...] = ()

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        self._names = _parameter_names(type(module).forward)[1:]
        return module

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        if self.states.bypass:
            return self.fn_ref.original_forward(*args, **kwargs)
        state = self.states.get_state()
        stream = _argument(self._names, self.spec.stream, args, kwargs)
        if self.index == 0:
            self.states.stream_tokens = stream.shape[1]
        if not state.computing and self.index == 0:
            try:
                stream = stream + self.engine.predicted_residual(state).to(stream.dtype)
            except Exception as error:  # never break sampling: compute this step and the rest
                logger.warning("HyCa: forecast failed (%s); computing every remaining step", error)
                state.failed = state.computing = True
        if state.computing:
            return self._compute(state, stream, args, kwargs)
        return self._pass_through(module, stream, args, kwargs)

    def _compute(self, state: BranchState, stream: torch.Tensor, args: tuple, kwargs: dict):
        output = self.fn_ref.original_forward(*args, **kwargs)
        if not state.failed:
            returns = self.spec.returns
            out_stream = output if isinstance(returns, str) else output[returns.index(self.spec.stream)]
            try:
                self.engine.record(state, self.index, self._output_part(out_stream) - self._output_part(stream))
            except Exception as error:
                logger.warning("HyCa: caching failed (%s); computing every remaining step", error)
                state.failed = True
        return output

    def _output_part(self, tokens: torch.Tensor) -> torch.Tensor:
        """The tokens of a stream that reach the transformer's output."""
        if self.spec.stream_tokens == "tail":
            return tokens[:, tokens.shape[1] - self.states.stream_tokens:]
        if self.spec.stream_tokens == "head":
            return tokens[:, :self.states.stream_tokens]
        return tokens

    def _pass_through(self, module: torch.nn.Module, stream: torch.Tensor, args: tuple, kwargs: dict):
        returns = self.spec.returns
        if isinstance(returns, str):
            return stream
        dropped = self.spec.text_dropped_if is not None and getattr(module, self.spec.text_dropped_if, False)
        return tuple(stream if name == self.spec.stream else
                     None if dropped else _argument(self._names, name, args, kwargs)
                     for name in returns)


def register(transformer: torch.nn.Module, blocks: list[tuple[BlockList, torch.nn.Module]],
             engine: HybridCache, family: Family, total_steps: Callable[[int | None], int | None]) -> None:
    """``total_steps(count_from_cache_context)``: the number of calls this transformer
    will see in the current run, for ``compute_last``."""
    states = BranchStates(BranchState)
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    registry.register_hook(HyCaHook(engine, family, states, total_steps), ROOT_HOOK)
    for index, (spec, block) in enumerate(blocks):
        block_registry = HookRegistry.check_if_exists_or_initialize(block)
        block_registry.register_hook(HyCaBlockHook(index, spec, engine, states), BLOCK_HOOK)
    registry.invalidate_child_registries_cache()


def unregister(transformer: torch.nn.Module) -> bool:
    """Remove every HyCa hook; ``True`` when there was one."""
    registry = getattr(transformer, "_diffusers_hook", None)
    if registry is None or registry.get_hook(ROOT_HOOK) is None:
        return False
    registry.remove_hook(ROOT_HOOK, recurse=True)
    registry.remove_hook(BLOCK_HOOK, recurse=True)
    registry.invalidate_child_registries_cache()
    return True


def root_hook(transformer: torch.nn.Module) -> HyCaHook | None:
    registry = getattr(transformer, "_diffusers_hook", None)
    return None if registry is None else registry.get_hook(ROOT_HOOK)
