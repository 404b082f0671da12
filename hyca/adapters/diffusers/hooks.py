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
    """diffusers' ``StateManager`` keyed by cache context, plus one default branch for
    sampling loops that call the transformer without opening a ``cache_context``."""

    def get_state(self) -> BranchState:
        if self._context is None:
            if DEFAULT_BRANCH not in self._state_cache:
                self._state_cache[DEFAULT_BRANCH] = self._state_cls()
            return self._state_cache[DEFAULT_BRANCH]
        return super().get_state()

    def all_states(self) -> dict[str, BranchState]:
        return dict(self._state_cache)


def _parameter_names(function: Callable) -> tuple[str, ...]:
    return tuple(inspect.signature(function).parameters)


def _argument(names: tuple[str, ...], name: str, args: tuple, kwargs: dict) -> Any:
    if name in kwargs:
        return kwargs[name]
    index = names.index(name)
    return args[index] if index < len(args) else None


class HyCaHook(ModelHook):
    """On the transformer: step counting, positions, and the compute/forecast decision."""

    _is_stateful = True

    def __init__(self, engine: HybridCache, family: Family, states: BranchStates,
                 total_steps: Callable[[], int | None]) -> None:
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
        state = self.states.get_state()
        context = self.states._context
        timestep = _argument(self._names, self.family.timestep_arg, args, kwargs)
        position = None
        if context is not None and context.sigma is not None:
            position = float(context.sigma)
        elif timestep is not None:
            position = float(torch.as_tensor(timestep).flatten()[0])
        sample = _argument(self._names, self.family.input_arg, args, kwargs)
        signature = tuple(sample.shape) if isinstance(sample, torch.Tensor) else None
        total = context.num_inference_steps if context is not None and context.num_inference_steps else None
        self.engine.begin_step(state, position, signature, total or self.total_steps())
        return args, kwargs

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
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
        state = self.states.get_state()
        stream = _argument(self._names, self.spec.stream, args, kwargs)
        if not state.computing and self.index == 0:
            try:
                stream = stream + self.engine.predicted_residual(state).to(stream.dtype)
            except Exception as error:  # never break sampling: compute this step and the rest
                logger.warning("HyCa: forecast failed (%s); computing every remaining step", error)
                state.failed = state.computing = True
        if state.computing:
            return self._compute(state, stream, args, kwargs)
        return self._pass_through(stream, args, kwargs)

    def _compute(self, state: BranchState, stream: torch.Tensor, args: tuple, kwargs: dict):
        output = self.fn_ref.original_forward(*args, **kwargs)
        if not state.failed:
            returns = self.spec.returns
            out_stream = output if isinstance(returns, str) else output[returns.index(self.spec.stream)]
            try:
                self.engine.record(state, self.index, out_stream - stream)
            except Exception as error:
                logger.warning("HyCa: caching failed (%s); computing every remaining step", error)
                state.failed = True
        return output

    def _pass_through(self, stream: torch.Tensor, args: tuple, kwargs: dict):
        returns = self.spec.returns
        if isinstance(returns, str):
            return stream
        return tuple(stream if name == self.spec.stream else _argument(self._names, name, args, kwargs)
                     for name in returns)


def register(transformer: torch.nn.Module, blocks: list[tuple[BlockList, torch.nn.Module]],
             engine: HybridCache, family: Family, total_steps: Callable[[], int | None]) -> None:
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
