"""Per transformer: the root controller, which runs before and after every transformer
call and decides whose run the call belongs to and whether its blocks run (see :mod:`.hooks`)."""

from __future__ import annotations

import logging
import sys
from dataclasses import replace
import threading
import weakref
from typing import Any

import torch

from ...engine.cache import BranchState
from ...engine.state import RunStats
from ...engine.residual import ResidualMeter
from ...engine.targets import MODEL_OUTPUT, OUTPUT
from ...profiles.settings import RunSettings
from . import parallel
from .block import BLOCK_HOOK, HyCaBlockHook
from .calls import _argument, _parameter_names, _scalar, _shape_signature
from .chain import HookChain
from .outputs import OutputTargets, SkipHook
from .conflicts import CacheConflict, conflict_message, other_cache
from .families import BlockList, Family, head_of
from .runs import Run, Steps, _weak, calling_pipeline
from .scopes import ACTIVE, DEFAULT_BRANCH, REQUEST, UNANNOUNCED, BranchStates, Request, ScopeRouter, fresh_engine
from .settings import guidance_name, guidance_of, schedule_shift

logger = logging.getLogger("hyca")

#: Threads whose latest run ``hyca.stats`` can report (the oldest are forgotten first).
MAX_THREADS_REMEMBERED = 256


class ProbeBusy(RuntimeError):
    """A transformer call from another thread while HyCa probes the transformer."""


class HyCaRoot(HookChain, OutputTargets):
    """Per transformer: the engine it was enabled with, the scopes' router, the step source
    and the hooks. The run state lives in scopes (:mod:`.scopes`): one per request, and the
    default scope, whose engine is ``engine``, for calls made outside any pipeline call."""

    def __init__(self, transformer: torch.nn.Module, blocks: list[tuple[BlockList, torch.nn.Module]],
                 engine: Any, family: Family, total_steps: Any, run_log_level: int = logging.INFO) -> None:
        self.engine = engine
        #: the level of each finished run's line and of this root's notes (a probe's runs: DEBUG)
        self.run_log_level = run_log_level
        self.family = family
        self.total_steps = total_steps  # a :class:`Steps`, or a callable ``(count_from_context) -> count``
        self.router = ScopeRouter(self)
        self.default = BranchStates(engine, self.router, self)
        self._latest: dict[int, BranchStates] = {}  # thread -> the scope of its latest run
        #: thread -> guidance branch -> its transformer calls computed in full since its latest
        #: cached run began (training mode, gradients): what ``hyca.stats`` reports for it then
        self._uncached: dict[int, dict[str, RunStats]] = {}
        self.meter = ResidualMeter()
        self.blocks = [block for _, block in blocks]
        self.block_hooks = [HyCaBlockHook(i, spec, self) for i, (spec, _) in enumerate(blocks)]
        self.skip_hook = SkipHook(self)  # on the transformer: a model-output skip call runs no forward
        self._skip_wrapper: Any = None  # the forward diffusers made for it
        self._transformer = weakref.ref(transformer)
        self._names = _parameter_names(type(transformer).forward)[1:]
        self._handles: list[Any] = []
        self._wrappers: list[Any] = []  # per block: the forward wrapper diffusers made for HyCa's hook
        self._seen: list[Any] = []  # per block: its ``forward`` when HyCa last found its hook in the chain
        self._seen_ours: list[Any] = []  # per block: the hook's ``fn_ref.forward`` then (None: not HyCa's)
        self.lost: str | None = None  # why HyCa cannot run, once that is known
        self.said_uncached = False  # calls HyCa stayed out of (training, gradients): logged once per model
        self.said_copied = False  # a deep copy's calls run uncached: logged once per copy
        self.probing: int | None = None  # a probe's root: the thread probing (set by the probe's _hooked)
        self._told_unknown = False  # "step count unknown" said once in the log
        self.told_notes: set[str] = set()  # run notes this root logged (each once)
        self.head = head_of(transformer, family)
        # target "output": the engine forecasts the head's input (the final hidden state), not the residuals
        if self.default.engine.target == OUTPUT and self.head is None:
            raise ValueError(f"{type(transformer).__name__}: a profile that forecasts the output head needs a head "
                             "(the family table has none for this model); use a residual profile")

    # --- per call -------------------------------------------------------------------------

    @torch.compiler.disable
    def _pre(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if torch.is_grad_enabled() or module.training:  # training, or a forward to differentiate: not ours
            ACTIVE.set(None)
            self._pass_training(module)
            return None
        if not self.serves(module):  # copy.deepcopy of an enabled model: its block hooks are the original's
            ACTIVE.set(None)
            self._say_copied(module)
            return None
        if self.probing is not None and threading.get_ident() != self.probing:
            ACTIVE.set(None)
            raise ProbeBusy(f"HyCa is probing this {type(module).__name__} in another thread (a first call at new "
                            "settings, or hyca.probe), so it cannot sample here meanwhile: its calls would mix with "
                            "the probe's runs. A pipeline passed to hyca.enable waits for the probe; pass this one "
                            "too (hyca.enable(pipe)), or call it after the probe")
        pipe = calling_pipeline(module, sys._getframe(1))  # one stack walk per call, shared below
        states = self.scope_for_call(module, pipe)
        ACTIVE.set(states)
        if states.open is not None:  # the previous call raised inside the transformer: that run is over
            self._finish(states, states.open, "a transformer call failed")
            states.open = None
        states.current, states.reports, states.may_skip, states.skipped = None, 0, False, False
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
        run = self._run(module, context, pipe)
        index = getattr(context, "step_index", None) if context is not None else None
        ended = self._ended(state, run, position, signature, index, "down" if from_context else
                            self.family.timestep_direction)
        if ended is not None:
            self._finish(states, state, ended)
            self._finish_stale(states, run)
        if state.step == 0:
            self._other_pipeline_run(states, state, module, run, pipe)
            self._run_notes(states, state, run)
            self._remember(states)
            self.engine_facts(states, module, pipe)
            found = other_cache(module, scan=True)
            if found is not None:
                raise CacheConflict(conflict_message(module, found, hyca_first=True))
            if run.total is None:
                message = ("step count unknown (no pipeline, running scheduler or cache context gave it): the "
                           "last step is computed only if the schedule computes it anyway; pass the scheduler "
                           "that drives the loop as scheduler= to hyca.enable")
                states.engine.note(state, message)
                if not self._told_unknown:
                    self._told_unknown = True
                    logger.warning("HyCa: %s", message)
        states.engine.begin_step(state, position, signature, run.total, state.step)  # runs told apart above
        states.may_skip = self._may_skip(states, state, args, kwargs)
        state.run = run.token if state.run is None else state.run
        state.last_position, state.last_index = position, index
        states.current = state
        states.open = state
        return None

    @torch.compiler.disable
    def _post(self, module: torch.nn.Module, args: tuple, output: Any) -> Any:
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
        if states.reports != len(self.block_hooks) and not state.failed and not states.skipped:
            if not state.computing:
                states.engine.fail(state, "block hooks were removed during a forecast step")
                raise RuntimeError(
                    f"HyCa: only {states.reports} of {len(self.block_hooks)} block hooks ran in a forecast step: "
                    "something removed them during sampling, and this step's output is wrong. Call hyca.enable again")
            states.engine.fail(state, f"only {states.reports} of {len(self.block_hooks)} block hooks ran")
        replaced = self._model_output(states, state, output) if states.engine.target == MODEL_OUTPUT else None
        if state.computing and states.parallel is not None:  # one rank's failure is every rank's
            why = self.agreed(states, "recording failed" if state.failed else None,
                              "caching failed on another context-parallel rank")
            if why is not None:
                states.engine.fail(state, why)
        states.engine.end_step(state)
        if state.total_steps is not None and state.step >= state.total_steps:
            self._finish(states, state, None)  # the run is complete: free its cache now
        return replaced

    def _other_pipeline_run(self, states: BranchStates, state: BranchState, module: torch.nn.Module, run: Run,
                            pipe: Any) -> None:
        """A run of a pipeline not passed to ``hyca.enable`` (no request of its own) begins:
        its scope takes the engine for its call's settings (:mod:`.requests`)."""
        if pipe is None or REQUEST.get() is not None or states is self.default:
            return
        from .requests import engine_for_other_pipeline

        states.engine, note = engine_for_other_pipeline(module, pipe, run.total, states.engine)
        if note is not None:
            states.engine.note(state, note)

    def _run_notes(self, states: BranchStates, state: BranchState, run: Run) -> None:
        """At a run's first step: the profile it uses (``RunStats.profile``), and a note when
        the interval spans the whole run (:meth:`~hyca.engine.schedule.Schedule.interval_beyond`)."""
        profile, schedule = states.engine.profile, states.engine.schedule
        if profile is not None:
            state.stats.profile = profile.source or "a Profile object given to hyca.enable"
        state.stats.branch = states.branch_name()
        beyond = schedule.interval_beyond(run.total) if schedule is not None and run.total else None
        if beyond is not None:
            states.engine.note(state, beyond)
            self.say_once(beyond)

    def serves(self, module: torch.nn.Module) -> bool:
        """Whether this root caches ``module`` (False on a deep copy of an enabled model: see
        :meth:`_say_copied`)."""
        return self._transformer() is module

    def _say_copied(self, module: torch.nn.Module) -> None:
        """A deep copy of an enabled transformer runs uncached (its block hooks still serve the
        original, whose weakref a copy keeps): said once per copy."""
        if self.said_copied:  # (this root is the copy's own: the deepcopy copied it with the module)
            return
        self.said_copied = True
        logger.warning("HyCa: this %s is a copy (copy.deepcopy) of one HyCa was enabled on; a copy's hooks still "
                       "serve the original, so it runs uncached. Call hyca.enable on the copy (or its pipeline) to "
                       "cache it", type(module).__name__)

    def say_once(self, message: str, said: bool = False) -> None:
        """Log ``message`` once per root (a probe's candidate runs: at their level, DEBUG);
        ``said``: the caller logged it already."""
        if message not in self.told_notes:
            self.told_notes.add(message)
            if not said:
                logger.log(max(self.run_log_level, logging.WARNING) if self.run_log_level >= logging.INFO
                           else self.run_log_level, "HyCa: %s", message)

    def engine_facts(self, states: BranchStates, module: torch.nn.Module, pipe: Any) -> None:
        """Tell the scope's engine what is known of the run beginning now: the settings
        read from the pipeline call (:mod:`.requests`), completed from the pipeline."""
        request = REQUEST.get()
        told = request.settings.get(id(module)) if request is not None else None
        facts = self._run_facts(pipe)
        states.engine.begin_run(told.merged(facts) if told is not None else facts)

    def _run_facts(self, pipe: Any) -> RunSettings:
        """What this run's pipeline tells beyond the step count: the shift of the scheduler
        driving it (swapped after ``hyca.enable`` or not), and the guidance scale where the
        pipeline keeps it (``_guidance_scale``, when that is its classifier-free guidance;
        FLUX's is distilled guidance, its true CFG scale is not kept)."""
        if pipe is None:
            steps = self.total_steps
            scheduler = steps.outside_pipelines()[1] if isinstance(steps, Steps) else None
            return RunSettings(shift=schedule_shift(scheduler))
        kept = ({"guidance_scale": getattr(pipe, "_guidance_scale", None)} if guidance_name(pipe) == "guidance_scale"
                else {})
        return RunSettings(shift=schedule_shift(pipe.scheduler),
                           guidance_scale=guidance_of(pipe, kept) if kept else None)

    def _run(self, module: torch.nn.Module, context: Any, pipe: Any) -> Run:
        steps = self.total_steps
        if isinstance(steps, Steps):
            return steps.run(module, context, pipe)
        # a plain count callable (the probe's): the count is given; the schedule object, if
        # a pipeline is calling, still tells runs apart
        count = steps(getattr(context, "num_inference_steps", None) if context is not None else None)
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
        same_schedule = run.token is not None and state.run is not None and run.token() is state.run()
        if run.token is not None and state.run is not None and not same_schedule:
            return "a new schedule"
        if state.total_steps is not None and state.step >= state.total_steps:
            return "the previous run was complete"
        if index is not None and state.last_index is not None and index < state.last_index:
            return "the step index went back"
        # on the same schedule object, unfinished, a timestep that moves back is the schedule's own
        # (custom sigmas that revisit a noise level): one run, as the pipeline call is one
        if position is not None and state.last_position is not None and not same_schedule:
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
                states.engine.note(state, f"stopped after {state.step} of {state.total_steps} steps")
            logger.log(self.run_log_level, "HyCa [%s]: %s", name, state.stats.describe(branch=False))
        state.reset()

    # --- resets ---------------------------------------------------------------------------

    def close(self, states: BranchStates) -> None:
        """A request ends: a run it left unfinished (cancelled, or a call raised) says so and
        frees its cache; the scope's engine forgets the request's bookkeeping."""
        for state in states.all_states().values():
            if state.step > 0:
                self._finish(states, state, "the pipeline call ended")
        states.reset()
        states.engine.end_run()

    def reset(self, default: bool = False) -> None:
        """Drop the calling scope's run state (a pipeline call's end: diffusers'
        ``_reset_stateful_cache``); with ``default`` also the default scope's
        (``hyca.reset``)."""
        scope = self.scope()
        for states in [scope] + ([self.default] if default and scope is not self.default else []):
            for state in states.all_states().values():  # a run cut short (the pipeline's interrupt) says so
                self._finish(states, state, "the pipeline call ended")
            states.reset()
            states.engine.end_run()

    def _pipeline_cleanup(self, *args: Any, **kwargs: Any) -> None:
        self.reset()

    # --- scopes ---------------------------------------------------------------------------

    def scope_for_call(self, module: torch.nn.Module, pipe: Any) -> BranchStates:
        """The scope a transformer call beginning now belongs to (:mod:`.scopes`): the
        pipeline call's, else one per thread / task for a pipeline HyCa was not enabled
        on, else the default scope, claimed for this thread."""
        request = REQUEST.get()
        if request is not None:
            return request.scope(self)
        if pipe is not None:
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

    def latest_stats(self) -> RunStats:
        """What the calling thread's latest transformer calls did: its calls computed in
        full (training mode, gradients, with the note why) when those came after its latest
        cached run, else that run's stats (a copy)."""
        uncached = self._uncached.get(threading.get_ident())
        stats = next(reversed(uncached.values())) if uncached else self.latest().engine.last_stats
        return replace(stats, notes=list(stats.notes), switches=list(stats.switches))

    def _remember(self, states: BranchStates) -> None:
        self._uncached.pop(threading.get_ident(), None)
        latest = self._latest
        latest.pop(threading.get_ident(), None)
        latest[threading.get_ident()] = states
        while len(latest) > MAX_THREADS_REMEMBERED:
            latest.pop(next(iter(latest)))

    def forget_uncached(self) -> None:
        """A pipeline call begins: its thread's count of calls HyCa stayed out of starts again."""
        self._uncached.pop(threading.get_ident(), None)

    def _pass_training(self, module: torch.nn.Module) -> None:
        """A forward with gradients enabled or the model in training mode runs uncached and
        touches no run state (ParaAttention #15, mflux #136: forecasting it would mix autograd
        graphs across steps); said once, and counted as computed for the calling thread's
        ``hyca.stats`` per guidance branch (its diffusers cache context), as cached steps are."""
        branches = self._uncached.setdefault(threading.get_ident(), {})
        context = self.router._context
        name = getattr(context, "name", None) or DEFAULT_BRANCH
        uncached = branches.pop(name, None) or RunStats(branch=name)
        branches[name] = uncached  # the branch called last is the one reported, as for a cached run
        uncached.computed += 1
        while len(self._uncached) > MAX_THREADS_REMEMBERED:
            self._uncached.pop(next(iter(self._uncached)))
        why = "the model is in training mode" if module.training else "gradients are enabled"
        message = (f"{type(module).__name__} was called while {why}: HyCa runs inference only, so such calls are "
                   "computed in full and leave its state alone (sample under torch.no_grad() or "
                   "torch.inference_mode(), with model.eval(), to cache)")
        uncached.note(message)  # in the stats of these calls only; a later cached run has its own
        if not self.said_uncached:
            self.said_uncached = True
            logger.warning("HyCa: %s", message)
