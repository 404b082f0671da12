"""HyCa on a diffusers transformer: a root controller plus one hook per block.

The root controller runs before and after every transformer call (torch forward hooks,
which survive anything that rewraps ``forward``: accelerate's CPU offload, cache-dit,
``torch.compile``). It decides which guidance branch and which generation a call belongs
to and whether its blocks run. One diffusers ``ModelHook`` per block either runs the block
and records its residual, or passes its inputs through; on a skip step the first block
adds the forecast of the summed residuals, so the rest of the stack is a chain of cheap
identities and the embeddings and output layers run as usual.

What a call belongs to is read from what the transformer is fed and who calls it, never
from state that can go stale:

- **branch**: ``transformer.cache_context(name)``; outside any context, a repeated call at
  the same timestep with the *same* input is the next guidance branch (Chroma's and
  Lumina2's pipelines run cond then uncond that way), and one with a *different* input is
  a later stage of a higher-order sampler (Heun's second call at the next sigma) in the
  same branch.
- **step count**: the scheduler of the pipeline whose ``__call__`` is running (found on
  the call stack; it holds this transformer), whatever pipeline or scheduler HyCa was
  enabled with; else the cache context's count; else the scheduler given to ``enable``.
- **generation**: a call starts a new one when the schedule object changed (every
  pipeline call sets new timesteps), the previous run reached its last call, the input
  shape changed, or the timestep moved back (against the direction the family's sampler
  moves). So aborted runs, pipelines that never clean up and transformers without
  diffusers' ``CacheMixin`` all start clean. A run that reaches its last call frees its
  cache at once; ``maybe_free_model_hooks`` resets every family's transformer.

Run state lives in scopes (:mod:`.scopes`), one per request: each pipeline call has its
own engine and branch states, so requests sharing the transformer in threads never mix;
calls outside any pipeline call use the transformer's default scope, one thread at a time.
The block hooks are stateful and hold the scopes' router (a ``StateManager``), so
``cache_context`` and ``_reset_stateful_cache`` reach the calling scope through diffusers'
own registry. A call with gradients enabled or the model in training mode passes through
untouched (inference only). Block hooks that something else unwraps (an offloading hook applied before
HyCa and removed later) are found before the blocks run and put back; a call whose blocks
did not all report is never forecast from.
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
from diffusers.hooks.hooks import HookFunctionReference, HookRegistry, ModelHook, StateManager

from ...engine.cache import BranchState, HybridCache
from ...engine.residual import ResidualMeter
from ...profiles.settings import RunSettings
from . import parallel
from .families import BlockList, Family, head_of
from .scopes import ACTIVE, DEFAULT_BRANCH, REQUEST, UNANNOUNCED, BranchStates, HostState, Request, ScopeRouter
from .settings import guidance_name, guidance_of, schedule_shift

logger = logging.getLogger("hyca")

ROOT_HOOK = "hyca"  # the attribute ``_hyca`` on the transformer holds the root controller
BLOCK_HOOK = "hyca_block"
ROOT_ATTRIBUTE = "_hyca"
PIPELINE_TRANSFORMERS = ("transformer", "transformer_2")
#: Threads whose latest run ``hyca.stats`` can report (the oldest are forgotten first).
MAX_THREADS_REMEMBERED = 256
#: How far up the call stack the calling pipeline is looked for (a pipeline's ``__call__``
#: is 3-6 frames above the transformer's hooks; decorators and helper methods add a few).
MAX_FRAMES = 48


def _parameter_names(function: Callable) -> tuple[str, ...]:
    return tuple(inspect.signature(function).parameters)


def _argument(names: tuple[str, ...], name: str, args: tuple, kwargs: dict) -> Any:
    if name in kwargs:
        return kwargs[name]
    index = names.index(name)
    return args[index] if index < len(args) else None


def _shape_signature(sample: Any) -> tuple | None:
    """Shape and device of the model input (a tensor, or Z-Image's list of tensors): a new
    one means a new batch, resolution or device, and a fresh state."""
    if isinstance(sample, torch.Tensor):
        return (tuple(sample.shape), sample.device.type)
    if isinstance(sample, (list, tuple)) and all(isinstance(s, torch.Tensor) for s in sample):
        return tuple((tuple(s.shape), s.device.type) for s in sample)
    return None


def _scalar(timestep: Any) -> float | None:
    """One number for a call's timestep input: per-sample (and Wan's per-token) timesteps
    are equal but for masked conditioning tokens at 0, so the largest is taken."""
    if timestep is None:
        return None
    value = torch.as_tensor(timestep)
    return float(value.max() if value.numel() > 1 else value.reshape(()))


# --- where the step count comes from ------------------------------------------------------


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


def calling_pipeline(transformer: torch.nn.Module) -> Any:
    """The pipeline whose method is calling ``transformer`` now: the nearest frame on the
    call stack whose ``self`` holds this transformer. ``None`` for hand-written loops."""
    frame = sys._getframe(1)
    for _ in range(MAX_FRAMES):
        if frame is None:
            return None
        code = frame.f_code
        if code.co_argcount and code.co_varnames[0] == "self":
            owner = frame.f_locals.get("self")
            if owner is not transformer and not isinstance(owner, torch.nn.Module) and _holds(owner, transformer):
                return owner
        frame = frame.f_back
    return None


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
    left = timesteps[index:]
    if expert is not None:
        boundary = pipe.config.boundary_ratio * scheduler.config.num_train_timesteps
        high = int((torch.as_tensor(left) >= boundary).sum())
        total = high if expert == "transformer" else len(left) - high
    else:
        total = len(left)
    return Run(total, _weak(timesteps), "scheduler")


class Steps:
    """Where a transformer's step count comes from (see the module doc). ``scheduler``: the
    one given to ``hyca.enable`` for hand-written loops; ``pipeline``: the pipeline HyCa
    was enabled on, whose *current* scheduler serves calls made outside any pipeline."""

    def __init__(self, scheduler: Any = None, pipeline: Any = None) -> None:
        self.scheduler = scheduler
        self._pipeline = _weak(pipeline) if pipeline is not None else None

    def run(self, transformer: torch.nn.Module, context: Any) -> Run:
        pipe = calling_pipeline(transformer)
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


# --- other caches -------------------------------------------------------------------------


def other_cache(transformer: torch.nn.Module, scan: bool = True) -> tuple[str, str] | None:
    """``(what, how to remove it)`` for another feature cache on ``transformer``, or
    ``None``. ``scan``: also look for diffusers cache hooks applied without
    ``enable_cache`` (a walk over the submodules: done once per generation, not per call)."""
    config = getattr(transformer, "_cache_config", None)
    if config is not None:
        return (f"a diffusers cache enabled ({type(config).__name__}, transformer.enable_cache)",
                "call transformer.disable_cache()")
    if transformer.__dict__.get("_is_cached") or "_context_manager" in transformer.__dict__:
        return "cache-dit enabled (cache_dit.enable_cache)", "call cache_dit.disable_cache(pipe)"
    if scan:
        for module in transformer.modules():
            registry = getattr(module, "_diffusers_hook", None)
            if registry is None:
                continue
            for name, hook in registry.hooks.items():
                if hook._is_stateful and name not in (BLOCK_HOOK, ROOT_HOOK):
                    return (f"a diffusers cache hook ({name!r}, {type(hook).__name__})",
                            "remove it (transformer.disable_cache(), or the registry's remove_hook)")
    return None


class CacheConflict(RuntimeError):
    """HyCa and another feature cache on one transformer."""


def conflict_message(transformer: torch.nn.Module, found: tuple[str, str], hyca_first: bool) -> str:
    name, (what, fix) = type(transformer).__name__, found
    if hyca_first:
        return (f"{name} has HyCa enabled and now also {what}. Two feature caches on one model skip or forecast "
                f"each other's steps, so nothing was sampled: use one of them ({fix}, or hyca.disable(pipe))")
    return f"{name} already has {what}; {fix} first, then hyca.enable"


# --- hooks --------------------------------------------------------------------------------


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
        action, scope, carried = self._before(args, kwargs)
        if action == _COMPUTE:
            output = self.fn_ref.original_forward(*args, **kwargs)
            self._after(scope, carried, output)
            return output
        if action == _PASS:
            return self._pass_through(module, carried, args, kwargs)
        return self.fn_ref.original_forward(*args, **kwargs)

    @torch.compiler.disable
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
                self.root.fall_back(state, why)
                state.computing = True
        if state.computing:
            if scope.output_target:  # the head's input is recorded, not the blocks' residuals
                return _PLAIN, None, None
            return _COMPUTE, scope, None if state.failed else self.root.meter.before(self.index, stream)
        return _PASS, scope, stream

    @torch.compiler.disable
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
            self.root.fall_back(state, f"caching failed ({error})")

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
        dropped = self.spec.text_dropped_if is not None and getattr(module, self.spec.text_dropped_if, False)
        return tuple(stream if name == self.spec.stream else
                     None if dropped else _argument(self._names, name, args, kwargs)
                     for name in returns)


class HyCaRoot:
    """Per transformer: the engine it was enabled with, the scopes' router, the step source
    and the hooks. The run state lives in scopes (:mod:`.scopes`): one per request, and the
    default scope, whose engine is ``engine``, for calls made outside any pipeline call."""

    def __init__(self, transformer: torch.nn.Module, blocks: list[tuple[BlockList, torch.nn.Module]],
                 engine: Any, family: Family, total_steps: Any) -> None:
        self.engine = engine
        self.family = family
        self.total_steps = total_steps  # a :class:`Steps`, or a callable ``(count_from_context) -> count``
        self.router = ScopeRouter(self)
        self.default = BranchStates(engine, self.router, self)
        self._latest: dict[int, BranchStates] = {}  # thread -> the scope of its latest run
        self.meter = ResidualMeter()
        self.blocks = [block for _, block in blocks]
        self.block_hooks = [HyCaBlockHook(i, spec, self) for i, (spec, _) in enumerate(blocks)]
        self._transformer = weakref.ref(transformer)
        self._names = _parameter_names(type(transformer).forward)[1:]
        self._handles: list[Any] = []
        self._wrappers: list[Any] = []  # per block: the forward wrapper diffusers made for HyCa's hook
        self._seen: list[Any] = []  # per block: its ``forward`` when HyCa last found its hook in the chain
        self.lost: str | None = None  # why HyCa cannot run, once that is known
        self.notes: list[str] = []  # said once per model, shown in every stats() (calls HyCa stayed out of)
        self._told_unknown = False  # "step count unknown" said once in the log
        self.head = head_of(transformer, family)
        # target "output": the engine forecasts the head's input (the final hidden state), not the residuals
        if self.default.output_target and self.head is None:
            raise ValueError(f"{type(transformer).__name__}: a profile that forecasts the output head needs a head "
                             "(the family table has none for this model); use a residual profile")

    # --- installation ---------------------------------------------------------------------

    def install(self, transformer: torch.nn.Module) -> None:
        for hook, block in zip(self.block_hooks, self.blocks):
            self._register_block(hook, block)
        self._install_root(transformer)
        setattr(transformer, ROOT_ATTRIBUTE, self)
        if not hasattr(type(transformer), "_reset_stateful_cache"):
            # Transformers without diffusers' CacheMixin (SD3, Lumina2, Z-Image, HiDream, Sana):
            # a pipeline's maybe_free_model_hooks() resets components that have this method.
            transformer._reset_stateful_cache = self._pipeline_cleanup
        HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()

    def _install_root(self, transformer: torch.nn.Module) -> None:
        self._handles = [transformer.register_forward_pre_hook(self._pre, with_kwargs=True),
                         transformer.register_forward_hook(self._post)]
        if self.head is not None:  # a request's profile may forecast the head's input
            self._handles.append(self.head.register_forward_pre_hook(self._head_pre, with_kwargs=True))

    def _register_block(self, hook: HyCaBlockHook, block: torch.nn.Module) -> None:
        registry = HookRegistry.check_if_exists_or_initialize(block)
        registry.register_hook(hook, BLOCK_HOOK)
        _mark(hook)
        wrapper = block.__dict__.get("forward")
        if hook.index < len(self._wrappers):
            self._wrappers[hook.index], self._seen[hook.index] = wrapper, wrapper
        else:
            self._wrappers.append(wrapper)
            self._seen.append(wrapper)

    def uninstall(self, transformer: torch.nn.Module) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for hook, block in zip(self.block_hooks, self.blocks):
            self._unregister_block(hook, block)
        if transformer.__dict__.get("_reset_stateful_cache") == self._pipeline_cleanup:
            del transformer._reset_stateful_cache
        if transformer.__dict__.get(ROOT_ATTRIBUTE) is self:
            delattr(transformer, ROOT_ATTRIBUTE)
        self.default.reset()
        HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()

    def _unregister_block(self, hook: HyCaBlockHook, block: torch.nn.Module) -> None:
        """Take HyCa's hook out of the block's forward chain without disturbing hooks
        others added after it (accelerate's offloading wraps the block from outside the
        diffusers registry, and diffusers' ``remove_hook`` would drop it)."""
        registry = getattr(block, "_diffusers_hook", None)
        if registry is None or registry.get_hook(BLOCK_HOOK) is not hook:
            hook.inert = True
            return
        index = registry._hook_order.index(BLOCK_HOOK)
        wrapper = self._wrappers[hook.index]
        below = hook.fn_ref.original_forward
        if index < len(registry._hook_order) - 1 or block.__dict__.get("forward") is wrapper:
            registry.remove_hook(BLOCK_HOOK, recurse=False)  # diffusers rewires the chain itself
            return
        if block.__dict__.get("_old_forward") is wrapper:  # accelerate wrapped HyCa's wrapper
            block._old_forward = below
            _forget(registry, BLOCK_HOOK)
            return
        if not _reaches(block, wrapper):  # already out of the chain
            _forget(registry, BLOCK_HOOK)
            return
        hook.inert = True  # wrapped by something HyCa cannot rewire: stay in the chain, do nothing

    # --- keeping the hooks in place -------------------------------------------------------

    def check_hooks(self, transformer: torch.nn.Module) -> None:
        """Before the blocks run: every block hook still in its block's forward chain,
        put back where something unwrapped it. Cheap when nothing changed."""
        if (len(self._handles) != 2 + (self.head is not None) or self._handles[0].id not in transformer._forward_pre_hooks
                or self._handles[1].id not in transformer._forward_hooks):
            for handle in self._handles:
                handle.remove()
            self._install_root(transformer)
        for i, (hook, block) in enumerate(zip(self.block_hooks, self.blocks)):
            current = block.__dict__.get("forward")
            if current is self._seen[i] and _is_ours(hook):
                continue
            self._repair(hook, block)
            self._seen[i] = block.__dict__.get("forward")

    def _repair(self, hook: HyCaBlockHook, block: torch.nn.Module) -> None:
        registry = HookRegistry.check_if_exists_or_initialize(block)
        if registry.get_hook(BLOCK_HOOK) is not hook:
            if BLOCK_HOOK in registry.hooks:
                _forget(registry, BLOCK_HOOK)
            self._register_block(hook, block)
            logger.info("HyCa: hook of block %d was replaced; registered again", hook.index)
            return
        if not _is_ours(hook):
            # diffusers' remove_hook of a hook below HyCa's rewired HyCa's forward to the one below
            hook.fn_ref.original_forward = hook.fn_ref.forward
            hook.fn_ref.forward = _bound_new_forward(hook, block)
        if not _reaches(block, self._wrappers[hook.index]):
            # e.g. accelerate's hooks were applied before HyCa and removed since: the block's
            # forward was restored to what it was before HyCa wrapped it
            _forget(registry, BLOCK_HOOK)
            self._register_block(hook, block)
            logger.info("HyCa: hook of block %d had been unwrapped by another library; registered again", hook.index)

    def live(self, transformer: torch.nn.Module) -> bool:
        """Are HyCa's hooks in place (after putting back any that were unwrapped)?"""
        if self.lost is not None or not self._handles:
            return False
        try:
            self.check_hooks(transformer)
        except Exception as error:  # never claim caching that cannot happen
            self.lost = f"its hooks could not be put back ({error})"
            return False
        return not any(hook.inert for hook in self.block_hooks)

    # --- per call -------------------------------------------------------------------------

    @torch.compiler.disable
    def _pre(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if torch.is_grad_enabled() or module.training:  # training, or a forward to differentiate: not ours
            ACTIVE.set(None)
            self._pass_training(module)
            return None
        states = self.scope_for_call(module)
        ACTIVE.set(states)
        if states.open is not None:  # the previous call raised inside the transformer: that run is over
            self._finish(states, states.open, "a transformer call failed")
            states.open = None
        states.current, states.reports = None, 0
        found = other_cache(module, scan=False)
        if found is not None:
            raise CacheConflict(conflict_message(module, found, hyca_first=True))
        self.check_hooks(module)
        states.parallel = parallel.attach(states.engine, module, self.blocks, BLOCK_HOOK)
        states.bypass = any(_argument(self._names, name, args, kwargs) is not None for name in self.family.bypass_args)
        if states.bypass:  # e.g. SD3's skip-layer guidance pass: some blocks never run, nothing to cache
            return None
        context = states._context
        timestep = _scalar(_argument(self._names, self.family.timestep_arg, args, kwargs))
        from_context = context is not None and context.sigma is not None
        position = float(context.sigma) if from_context else timestep
        sample = _argument(self._names, self.family.input_arg, args, kwargs)
        states.name_unnamed_call(position, sample)
        state = states.get_state()
        signature = _shape_signature(sample)
        run = self._run(module, context)
        index = getattr(context, "step_index", None) if context is not None else None
        ended = self._ended(state, run, position, signature, index, "down" if from_context else
                            self.family.timestep_direction)
        if ended is not None:
            self._finish(states, state, ended)
            self._finish_stale(states, run)
        if state.step == 0:
            self._remember(states)
            if hasattr(states.engine, "host_run"):
                self.engine_facts(states, module)
            found = other_cache(module, scan=True)
            if found is not None:
                raise CacheConflict(conflict_message(module, found, hyca_first=True))
            if run.total is None:
                message = ("step count unknown (no pipeline, running scheduler or cache context gave it): the "
                           "last step is computed only if the schedule computes it anyway; pass the scheduler "
                           "that drives the loop as scheduler= to hyca.enable")
                state.stats.note(message)
                if not self._told_unknown:
                    self._told_unknown = True
                    logger.warning("HyCa: %s", message)
        states.engine.begin_step(state, position, signature, run.total)
        state.run = run.token if state.run is None else state.run
        state.last_position, state.last_index = position, index
        states.current = state
        states.open = state
        return None

    @torch.compiler.disable
    def _head_pre(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Output target: record the head's input on a computed step; replace it with the
        forecast made at the first block on a skipped one."""
        states = ACTIVE.get()
        state = None if states is None or states.root is not self else states.current
        if state is None or states.bypass or not states.output_target:
            return None
        x = args[0] if args else kwargs["input"]
        if state.computing:
            if not state.failed:
                try:
                    states.engine.record(state, 0, x)
                except Exception as error:
                    self.fall_back(state, f"caching failed ({error})")
            return None
        forecast, states.head_forecast = states.head_forecast, None
        if forecast is None:
            raise RuntimeError("HyCa: a forecast step reached the output head without a forecast")
        forecast = forecast.to(device=x.device, dtype=x.dtype)
        return ((forecast, *args[1:]), kwargs) if args else (args, {**kwargs, "input": forecast})

    @torch.compiler.disable
    def _post(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        states = ACTIVE.get()
        if states is None or states.root is not self:  # a call HyCa stayed out of (training, gradients)
            return None
        ACTIVE.set(None)
        state, states.open = states.open, None
        states.current = None
        if states.bypass:
            states.bypass = False
            return None
        if state is None:
            return None
        if states.reports != len(self.block_hooks) and not state.failed:
            if not state.computing:
                state.failed = True
                raise RuntimeError(
                    f"HyCa: only {states.reports} of {len(self.block_hooks)} block hooks ran in a forecast step: "
                    "something removed them during sampling, and this step's output is wrong. Call hyca.enable again")
            self.fall_back(state, f"only {states.reports} of {len(self.block_hooks)} block hooks ran")
        if state.computing and states.parallel is not None:  # one rank's failure is every rank's
            why = self.agreed(states, "recording failed" if state.failed else None,
                              "caching failed on another context-parallel rank")
            if why is not None:
                self.fall_back(state, why)
        states.engine.end_step(state)
        if state.total_steps is not None and state.step >= state.total_steps:
            self._finish(states, state, None)  # the run is complete: free its cache now
        return None

    def engine_facts(self, states: BranchStates, module: torch.nn.Module) -> None:
        """Tell the scope's engine what is known of the run beginning now: the settings
        read from the pipeline call (:mod:`.requests`), completed from the pipeline."""
        request = REQUEST.get()
        told = request.settings.get(id(module)) if request is not None else None
        facts = self._run_facts(module)
        states.engine.host_run = told.merged(facts) if told is not None else facts

    def _run_facts(self, module: torch.nn.Module) -> RunSettings:
        """What this run's pipeline tells beyond the step count: the shift of the scheduler
        driving it (swapped after ``hyca.enable`` or not), and the guidance scale where the
        pipeline keeps it (``_guidance_scale``, when that is its classifier-free guidance;
        FLUX's is distilled guidance, its true CFG scale is not kept)."""
        pipe = calling_pipeline(module)
        if pipe is None:
            steps = self.total_steps
            scheduler = steps.outside_pipelines()[1] if isinstance(steps, Steps) else None
            return RunSettings(shift=schedule_shift(scheduler))
        kept = ({"guidance_scale": getattr(pipe, "_guidance_scale", None)} if guidance_name(pipe) == "guidance_scale"
                else {})
        return RunSettings(shift=schedule_shift(pipe.scheduler),
                           guidance_scale=guidance_of(pipe, kept) if kept else None)

    def _run(self, module: torch.nn.Module, context: Any) -> Run:
        steps = self.total_steps
        if isinstance(steps, Steps):
            return steps.run(module, context)
        # a plain count callable (the probe's): the count is given; the schedule object, if
        # a pipeline is calling, still tells runs apart
        count = steps(getattr(context, "num_inference_steps", None) if context is not None else None)
        pipe = calling_pipeline(module)
        token = _weak(getattr(pipe.scheduler, "timesteps", None)) if pipe is not None else None
        return Run(count, token, "given")

    @staticmethod
    def _ended(state: BranchState, run: Run, position: float | None, signature: Any, index: int | None,
               direction: str) -> str | None:
        """Why this call cannot continue the branch's generation, or ``None`` if it can."""
        if state.step == 0:
            return None
        if signature != state.signature:
            return "the input shape changed"
        if run.token is not None and state.run is not None and run.token() is not state.run():
            return "a new schedule"
        if state.total_steps is not None and state.step >= state.total_steps:
            return "the previous run was complete"
        if index is not None and state.last_index is not None and index < state.last_index:
            return "the step index went back"
        if position is not None and state.last_position is not None:
            back = position > state.last_position if direction == "down" else position < state.last_position
            if back or (position == state.first_position and state.step > 0):
                return "the timestep went back"
        return None

    def agreed(self, states: BranchStates, why: str | None, elsewhere: str) -> str | None:
        """Under context parallelism, whether any rank failed (``why`` here, ``elsewhere``
        for a failure on another rank): all ranks must compute, or all forecast, the same
        steps. One small all-reduce; a single process just returns ``why``."""
        if states.parallel is None:
            return why
        failed = states.parallel.any(why is not None)
        return why if why is not None else (elsewhere if failed else None)

    def fall_back(self, state: BranchState, why: str) -> None:
        """Compute every remaining step of this generation; said once in the log and in the stats."""
        if not state.failed:
            message = f"{why}; every later step of this run computed"
            logger.warning("HyCa: %s", message)
            state.stats.note(message)
        state.failed = True

    def _finish_stale(self, states: BranchStates, run: Run) -> None:
        """A new run has begun: every other branch still holding a run on another schedule
        (the uncond branch of a guided run that was cancelled, when the next run has no
        guidance and never calls it) ends now, so its summary is logged before the new
        run's and its cache is freed now rather than at the next cleanup."""
        if run.token is None or run.token() is None:
            return
        for other in states.all_states().values():
            if other.step > 0 and other.run is not None and other.run() is not run.token():
                self._finish(states, other, "a new schedule")

    def _finish(self, states: BranchStates, state: BranchState, why: str | None) -> None:
        """A generation ends: say what it did, and free its cache."""
        name = next((n for n, s in states.all_states().items() if s is state), "?")
        if state.stats.total:
            if why is not None and state.total_steps is not None and state.step < state.total_steps:
                state.stats.note(f"stopped after {state.step} of {state.total_steps} steps")
            logger.info("HyCa [%s]: %s", name, state.stats.describe())
        state.reset()

    # --- resets ---------------------------------------------------------------------------

    def close(self, states: BranchStates) -> None:
        """A request ends: a run it left unfinished (cancelled, or a call raised) says so and
        frees its cache; the scope's engine forgets the request's bookkeeping."""
        for state in states.all_states().values():
            if state.step > 0:
                self._finish(states, state, "the pipeline call ended")
        states.reset()
        forget = getattr(states.engine, "forget_runs", None)
        if forget is not None:
            forget()

    def reset(self, default: bool = False) -> None:
        """Drop the calling scope's run state (a pipeline call's end: diffusers'
        ``_reset_stateful_cache``); with ``default`` also the default scope's
        (``hyca.reset``)."""
        scope = self.scope()
        for states in [scope] + ([self.default] if default and scope is not self.default else []):
            for name, state in states.all_states().items():
                if state.stats.total:
                    logger.info("HyCa [%s]: %s", name, state.stats.describe())
            states.reset()
            forget = getattr(states.engine, "forget_runs", None)  # the probe's recorder has no runs to forget
            if forget is not None:
                forget()

    def _pipeline_cleanup(self, *args: Any, **kwargs: Any) -> None:
        self.reset()

    # --- scopes ---------------------------------------------------------------------------

    def scope_for_call(self, module: torch.nn.Module) -> BranchStates:
        """The scope a transformer call beginning now belongs to (:mod:`.scopes`): the
        pipeline call's, else one per thread / task for a pipeline HyCa was not enabled
        on, else the default scope, claimed for this thread."""
        request = REQUEST.get()
        if request is not None:
            return request.scope(self)
        if calling_pipeline(module) is not None:
            request = UNANNOUNCED.get()
            if request is None or request.thread != threading.get_ident():  # a context copied into another thread
                request = Request()
                UNANNOUNCED.set(request)
            return request.scope(self)
        self.default.claim(type(module).__name__)
        return self.default

    def scope(self) -> BranchStates:
        """The calling thread's / task's scope, without making one: the call in progress,
        the pipeline call, else the default scope."""
        active = ACTIVE.get()
        if active is not None and active.root is self:
            return active
        for var in (REQUEST, UNANNOUNCED):
            request = var.get()
            mine = request is not None and (var is REQUEST or request.thread == threading.get_ident())
            found = request.scope(self, create=False) if mine else None
            if found is not None:
                return found
        return self.default

    @property
    def states(self) -> BranchStates:
        """The calling scope's branch states (see :meth:`scope`)."""
        return self.scope()

    def engine_for(self, request: Request) -> Any:
        """The engine of a new request scope: the one chosen for the pipeline call's
        settings, else a fresh one like the engine HyCa was enabled with (a probe's
        engine, which runs one call at a time, is used as it is)."""
        transformer = self._transformer()
        chosen = request.engines.get(id(transformer)) if transformer is not None else None
        if chosen is not None:
            return chosen
        return fresh_engine(self.engine) if isinstance(self.total_steps, Steps) else self.engine

    def latest(self) -> BranchStates:
        """The scope of the calling thread's latest run (the default scope if none)."""
        return self._latest.get(threading.get_ident(), self.default)

    def _remember(self, states: BranchStates) -> None:
        latest = self._latest
        latest.pop(threading.get_ident(), None)
        latest[threading.get_ident()] = states
        while len(latest) > MAX_THREADS_REMEMBERED:
            latest.pop(next(iter(latest)))

    def _pass_training(self, module: torch.nn.Module) -> None:
        """A forward with gradients enabled or the model in training mode runs uncached and
        touches no run state (a training step after validation images, ParaAttention #15,
        mflux #136: forecasting it would mix autograd graphs across steps); said once."""
        if self.notes:
            return
        why = "the model is in training mode" if module.training else "gradients are enabled"
        message = (f"{type(module).__name__} was called while {why}: HyCa runs inference only, so such calls are "
                   "computed in full and leave its state alone (sample under torch.no_grad() or "
                   "torch.inference_mode(), with model.eval(), to cache)")
        self.notes.append(message)
        logger.warning("HyCa: %s", message)


def fresh_engine(engine: Any) -> Any:
    """A new engine like ``engine`` (a :class:`HybridCache`): same profile, schedule and
    options, none of its run bookkeeping, so that requests running at once never share it."""
    if not isinstance(engine, HybridCache):
        return engine
    made = HybridCache(engine.profile, engine.schedule, engine.positions, engine.cache_dtype, guard=engine.guard,
                       compare_settings=engine.compare_settings)
    made.sketch_seed, made._start_from_reuse = engine.sketch_seed, engine._start_from_reuse
    return made


def _mark(hook: HyCaBlockHook) -> None:
    """Tag the forward diffusers built from ``hook.new_forward`` so the chain check can
    tell it from one that replaced it."""
    hook.fn_ref.forward.__dict__["_hyca"] = hook


def _is_ours(hook: HyCaBlockHook) -> bool:
    return getattr(hook.fn_ref.forward, "__dict__", {}).get("_hyca") is hook


def _bound_new_forward(hook: HyCaBlockHook, block: torch.nn.Module) -> Callable:
    forward = functools.update_wrapper(functools.partial(hook.new_forward, block), hook.new_forward)
    forward.__dict__["_hyca"] = hook
    return forward


def _reaches(module: torch.nn.Module, target: Any) -> bool:
    """Does calling ``module`` go through ``target``? Follows the wrappers diffusers and
    accelerate put on ``forward`` (each keeps the one it wraps as ``__wrapped__``;
    accelerate's calls ``module._old_forward``)."""
    current = module.__dict__.get("forward")
    for _ in range(64):
        if current is None:
            return False
        if current is target:
            return True
        func = getattr(current, "func", None)
        if getattr(func, "__module__", "").startswith("accelerate") and "_old_forward" in module.__dict__:
            following = module.__dict__["_old_forward"]
            current = None if following is current else following
            continue
        current = getattr(current, "__wrapped__", None)
    return False


def _forget(registry: HookRegistry, name: str) -> None:
    """Drop a hook from a diffusers registry without touching the module's ``forward``
    (which no longer goes through it)."""
    index = registry._hook_order.index(name)
    del registry.hooks[name]
    registry._hook_order.pop(index)
    registry._fn_refs.pop(index)


def register(transformer: torch.nn.Module, blocks: list[tuple[BlockList, torch.nn.Module]],
             engine: Any, family: Family, total_steps: Any = None) -> HyCaRoot:
    """Hook ``engine`` into ``transformer``. ``total_steps``: a :class:`Steps` (what
    ``hyca.enable`` passes), or a callable ``(count_from_cache_context) -> count`` for a
    fixed count (the probe's)."""
    root = HyCaRoot(transformer, blocks, engine, family, total_steps if total_steps is not None else Steps())
    root.install(transformer)
    return root


def unregister(transformer: torch.nn.Module) -> bool:
    """Remove every HyCa hook; ``True`` when there was one."""
    root = root_hook(transformer)
    if root is None:
        return False
    root.uninstall(_uncompiled(transformer))
    return True


def _uncompiled(transformer: torch.nn.Module) -> torch.nn.Module:
    original = transformer.__dict__.get("_modules", {}).get("_orig_mod")
    return original if isinstance(transformer, torch._dynamo.eval_frame.OptimizedModule) else transformer


def root_hook(transformer: torch.nn.Module) -> HyCaRoot | None:
    """The transformer's HyCa controller (through a ``torch.compile`` wrapper made after
    ``hyca.enable``), or ``None``."""
    transformer = _uncompiled(transformer)
    root = transformer.__dict__.get(ROOT_ATTRIBUTE)
    return root if isinstance(root, HyCaRoot) else None
