"""Whose run a transformer call belongs to: one run state per request.

A diffusers server shares one transformer between requests that run at once (a pipeline
and a scheduler per request, requests in threads or asyncio tasks). HyCa's run state
(the engine's per-run bookkeeping, each guidance branch's history, the scratch of the call
in progress) therefore lives in a *scope*, never on the transformer:

- a **request scope** per pipeline call: the call of a pipeline HyCa is enabled on opens a
  :class:`Request` (``hyca.adapters.diffusers.requests``) with the engine chosen for the
  call's settings; a call of another pipeline holding the same transformer gets one per
  thread or asyncio task, on the first transformer call it makes;
- the transformer's **default scope** for calls made outside any pipeline call (a
  hand-written sampling loop). It serves one thread at a time: a second thread that
  starts sampling while another's run is unfinished is refused (:class:`ScopeBusy`).

Scopes are found through :class:`contextvars.ContextVar` s, so each thread and each
asyncio task sees its own; diffusers' ``cache_context`` name is kept the same way
(:class:`ScopeRouter`), since ``transformer.cache_context`` writes it on a hook object
that every thread shares.
"""

from __future__ import annotations

import contextvars
import threading
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from ...engine.cache import BranchState, HybridCache
from .compat import StateManager

DEFAULT_BRANCH = "default"

#: The request scope of the pipeline call running in this thread / task (set by the
#: enabled pipeline's ``__call__``).
REQUEST: contextvars.ContextVar["Request | None"] = contextvars.ContextVar("hyca_request", default=None)
#: Scopes made on first use for calls of pipelines HyCa was not enabled on (one per thread / task).
UNANNOUNCED: contextvars.ContextVar["Request | None"] = contextvars.ContextVar("hyca_unannounced", default=None)
#: The scope of the transformer call in progress in this thread / task (set by the root's pre-hook).
ACTIVE: contextvars.ContextVar["BranchStates | None"] = contextvars.ContextVar("hyca_active", default=None)


class ScopeBusy(RuntimeError):
    """Two threads sampling at once through a transformer's default scope."""


@dataclass
class HostState(BranchState):
    """A branch's engine state plus what the adapter needs to tell generations apart."""

    run: Any = None  # weak reference to the schedule (scheduler.timesteps) this generation runs on
    last_position: float | None = None
    last_index: int | None = None  # the cache context's step_index at the previous call
    #: model-output target: the latest computed call's output and its ``return_dict``, the
    #: shape of a forecast call's output when the forward is skipped (:mod:`.skip`)
    output_like: Any = None
    output_return_dict: Any = None


class Request:
    """One pipeline call: per transformer (keyed by ``id(transformer)``), the engine chosen
    for the call's settings (``engines``) and those settings as read from the call
    (``settings``, a :class:`~hyca.profiles.settings.RunSettings`); the scopes opened so far."""

    def __init__(self, engines: dict[int, Any] | None = None, settings: dict[int, Any] | None = None) -> None:
        self.engines = dict(engines or {})
        self.settings = dict(settings or {})
        self.thread = threading.get_ident()  # where it was opened (asyncio.to_thread copies contexts)
        self._scopes: "weakref.WeakKeyDictionary[Any, BranchStates]" = weakref.WeakKeyDictionary()

    def close(self) -> None:
        """The pipeline call is over: each scope's unfinished run (a cancelled call) ends now."""
        for root, scope in list(self._scopes.items()):
            root.close(scope)

    def scope(self, root: Any, create: bool = True) -> "BranchStates | None":
        found = self._scopes.get(root)
        if found is None and create:
            found = self._scopes[root] = BranchStates(root.engine_for(self), root.router, root)
        return found


class BranchStates:
    """One scope's run state on one transformer: its engine, its branch states keyed by
    cache-context name (plus branches for calls made outside any ``cache_context``), and
    the scratch of the transformer call in progress, shared by the root and block hooks:
    the state of that call (``current``), whether HyCa stays out of it (``bypass``), how
    many tokens the output stream has (``stream_tokens``), how many block hooks ran
    (``reports``), the call that began and has not ended (``open``) and its
    context-parallel group (``parallel``)."""

    def __init__(self, engine: Any, router: "ScopeRouter", root: Any) -> None:
        self.engine = engine
        self.root = root
        self._router = router
        self._state_cache: dict[str, BranchState] = {}
        self.bypass = False
        self.stream_tokens: int | None = None
        self.current: BranchState | None = None
        self.reports = 0
        self.head_forecast: torch.Tensor | None = None  # output targets: made at the first block, used at the head / output
        self.may_skip = False  # this call may return its forecast without running the forward (:mod:`.skip`)
        self.skipped = False  # ... and did
        self.return_dict: Any = None  # this call's return_dict argument
        self.open: BranchState | None = None
        self.parallel: Any = None
        self.owner: int | None = None  # default scope: the thread whose run it holds
        self._forget_unnamed()

    @property
    def _context(self) -> Any:
        """The diffusers cache context this thread / task is in (see :class:`ScopeRouter`)."""
        return self._router._context

    @property
    def output_target(self) -> bool:
        """Whether this scope's engine forecasts something after the blocks (the output
        head's input, or the model output): the blocks neither record nor add a forecast,
        the first one hands the forecast over (``head_forecast``) and the rest pass through."""
        return self.engine.target in ("output", "model_output")

    def _forget_unnamed(self) -> None:
        self._unnamed = DEFAULT_BRANCH
        self._last_unnamed_position: float | None = None
        self._last_unnamed_input: Any = None
        self._calls_at_position = 0

    def name_unnamed_call(self, position: float | None, sample: Any = None) -> None:
        """Pick the branch of a call made outside any ``cache_context``: the k-th call at
        one timestep with the same input is branch k (cond, uncond); a call at the same
        timestep with another input is a sampler's next stage, branch 0 again."""
        if self._context is not None:
            return
        same = position is not None and position == self._last_unnamed_position
        if same and sample is not None and not _same_input(self._last_unnamed_input, sample):
            same = False
        self._calls_at_position = self._calls_at_position + 1 if same else 0
        self._last_unnamed_position = position
        self._last_unnamed_input = _snapshot_input(sample)
        k = self._calls_at_position
        self._unnamed = DEFAULT_BRANCH if k == 0 else f"{DEFAULT_BRANCH}#{k + 1}"

    def get_state(self) -> BranchState:
        name = self.branch_name()
        if name not in self._state_cache:
            self._state_cache[name] = HostState()
        return self._state_cache[name]

    def branch_name(self) -> str:
        return self._unnamed if self._context is None else self._context.name

    def all_states(self) -> dict[str, BranchState]:
        return dict(self._state_cache)

    def unfinished(self) -> bool:
        """Whether a run holds this scope: a call in progress or a branch part-way through."""
        return self.open is not None or any(state.step > 0 for state in self._state_cache.values())

    def claim(self, model: str) -> None:
        """For the default scope, before a call: take it for this thread, or refuse when
        another live thread's run holds it."""
        me = threading.get_ident()
        if self.owner not in (None, me) and self.unfinished() and _alive(self.owner):
            raise ScopeBusy(
                f"HyCa: two threads are sampling with {model} at once outside any pipeline call (a hand-written "
                "loop). Such calls share the transformer's one run state, and HyCa would mix the runs, so this call "
                "was refused. Run each request as a pipeline call (each pipeline call gets its own HyCa state, also "
                "in threads), or one after another; hyca.reset(model) frees a run another thread left unfinished")
        self.owner = me

    def reset(self) -> None:
        for state in self._state_cache.values():
            state.reset()
        self._state_cache.clear()
        self.current, self.bypass, self.reports, self.open, self.owner = None, False, 0, None, None
        self.head_forecast = None
        self.may_skip = self.skipped = False
        self._forget_unnamed()


class ScopeRouter(StateManager):
    """The ``StateManager`` the block hooks hold, so that diffusers' ``cache_context``
    finds it: it keeps the context per thread / task (a ``ContextVar``) and leads every
    other request to the calling scope's :class:`BranchStates`. ``reset`` (diffusers'
    ``_reset_stateful_cache`` at a pipeline call's end) resets the calling scope only."""

    def __init__(self, root: Any) -> None:  # no super().__init__: ``_context`` is a property here
        self._root = root
        self._state_cls = HostState
        self._init_args, self._init_kwargs = (), {}
        self._var: contextvars.ContextVar = contextvars.ContextVar(f"hyca_cache_context_{id(self)}", default=None)

    def __getstate__(self) -> dict[str, Any]:  # copy.deepcopy of an enabled model: contexts stay per thread
        return {k: v for k, v in self.__dict__.items() if k != "_var"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._var = contextvars.ContextVar(f"hyca_cache_context_{id(self)}", default=None)

    @property
    def _context(self) -> Any:
        return self._var.get()

    @property
    def _state_cache(self) -> dict[str, BranchState]:
        """The calling scope's branch states (what ``StateManager`` readers such as
        :mod:`hyca.bench.memory` look at)."""
        return self._root.scope()._state_cache

    @property
    def context(self) -> Any:
        if self._var.get() is None:
            raise ValueError("No cache context is set")
        return self._var.get()

    def set_context(self, context: Any) -> None:
        self._var.set(context)

    def get_state(self) -> BranchState:
        return self._root.scope().get_state()

    def all_states(self) -> dict[str, BranchState]:
        return self._root.scope().all_states()

    def reset(self, *args: Any, **kwargs: Any) -> None:
        self._root.reset()


def _alive(ident: int) -> bool:
    return any(thread.ident == ident for thread in threading.enumerate())


def _snapshot_input(sample: Any) -> Any:
    """A copy of a call's input to compare the next call's against (latents are small
    next to a transformer call); ``None`` for inputs that are not tensors."""
    if isinstance(sample, torch.Tensor):
        return sample.detach().clone()
    if isinstance(sample, (list, tuple)) and sample and all(isinstance(s, torch.Tensor) for s in sample):
        return [s.detach().clone() for s in sample]
    return None


def _same_input(kept: Any, sample: Any) -> bool:
    if kept is None:
        return True  # nothing to compare: keep the plain "k-th call at one timestep" rule
    if isinstance(sample, torch.Tensor):
        return isinstance(kept, torch.Tensor) and kept.shape == sample.shape and torch.equal(kept, sample)
    parts = list(sample) if isinstance(sample, (list, tuple)) else []
    return (isinstance(kept, list) and len(kept) == len(parts)
            and all(k.shape == s.shape and torch.equal(k, s) for k, s in zip(kept, parts)))


def fresh_engine(engine: Any) -> Any:
    """A new engine like ``engine`` (a :class:`HybridCache`): same profile, schedule and
    options, none of its run bookkeeping, so that requests running at once never share it."""
    if not isinstance(engine, HybridCache):
        return engine
    made = HybridCache(engine.profile, engine.schedule, engine.positions, engine.cache_dtype, guard=engine.guard_option,
                       compare_settings=engine.compare_settings, off_settings=engine.off_settings,
                       log_notes=engine.log_notes)
    made.sketch_seed, made._expected = engine.sketch_seed, engine._expected
    made.asked_compute_last = engine.asked_compute_last  # its schedule already has the profile's end
    made._told = engine._told  # a note is logged once per enabled model, and stays in each run's stats
    return made
