"""The engine contract: what a host may call on an engine, and what it gets back.

A *host* drives a transformer's sampling loop and reports what happens in it (the diffusers
hooks, the WebUI pass session, ComfyUI next); an *engine* decides which steps run the
blocks and forecasts the others. :class:`Engine` is the whole seam. Engines that implement
it: :class:`hyca.engine.cache.HybridCache` (caching), :class:`hyca.probing.recorder.SketchRecorder`
(records a fully computed run for the probe, :func:`hyca.probing.probe_host`, in every
host). A host tells
the engine facts (a run's settings, a step's position, a branch's residuals, a failure); it
never writes an engine's fields or a branch state's.

Lifetimes, who owns each, and its explicit reset:

* **model**: the engine object itself, with its profile, schedule and anything derived
  from them (block masks, cached forecast weights). Owned by the host's per-transformer
  root (one engine per request where the host serves requests at once). Reset: build a new
  engine (profile or settings changed).
* **run**: one generation (one pipeline call / WebUI pass), all its guidance branches. The
  engine keeps what spans branches (which branches began each step and the last branch's
  guard check, in :class:`~hyca.engine.run_branches.RunBranches`; the host's facts from
  :meth:`Engine.begin_run`). Owned by the engine; the
  host brackets it: :meth:`Engine.begin_run` at its first step, :meth:`Engine.end_run` when
  it ends (also when cancelled; a run left open is closed by the next one's step 0).
* **branch**: one guidance branch (cond, uncond, or one batched call) of one run: a
  :class:`~hyca.engine.cache.BranchState` from :meth:`Engine.new_state` (step count,
  history, solver per slot and batch item, stats). Owned by the host, which keeps one per
  branch and hands it to every call; only the engine writes it. Reset:
  ``state.reset()``, which the engine also does itself when the input shape changes or the
  sampler returns to the run's first position.
* **call**: one transformer call: from :meth:`Engine.begin_step` (or
  :meth:`Engine.call_position` for a further call in the same step) to :meth:`Engine.end_step`.
  The step's forecast and the residual sums live on the branch state for that long and are
  dropped at :meth:`Engine.end_step`.

The order of what happens at a step, per branch:

1. ``begin_run(settings)`` once per run, before the first branch's step 0 (hosts that learn
   facts late, such as the pipeline's shift, call it at each branch's step 0: it is
   idempotent within a run).
2. ``computing = begin_step(state, position, signature, total_steps, step)``: the engine
   resets the branch if it is a new generation, notes the branch, compares the run's
   settings with the profile's (at step 1), decides compute or forecast and, to forecast,
   makes the forecast and checks it is finite (a non-finite one: the step computes).
3. Computing: ``record(state, block, residual)`` for every block, in any order.
   Forecasting: ``predicted_residual(state)`` once (the first block adds it to its input
   stream, or the output head takes it for an ``"output"`` target, or it is the call's
   output for a ``"model_output"`` target).
4. Anything going wrong on the host's side: ``fail(state, why)``; every later step of
   the branch computes, and the stats say why.
5. ``end_step(state)``: a computed step's sums join the history (after the guard's check
   of this step), the step counter moves on.
6. ``stats(state)``: what the branch did, with its notes as sentences for the host to
   render (log, console, infotext, app status); ``end_run()`` when the generation ends.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from ..profiles.profile import Profile
from ..profiles.settings import RunSettings
from .cache import BranchState, RunStats
from .schedule import Schedule


@runtime_checkable
class Engine(Protocol):
    """What a host may call on an engine (see the module doc for lifetimes and order).

    ``positions``: the axis solvers extrapolate along, ``"step"`` or ``"sigma"``.
    ``target``: what a forecast replaces, ``"residual"`` (the summed block residuals, added
    to the first block's input stream), ``"output"`` (the output head's input) or
    ``"model_output"`` (the transformer's output, :mod:`hyca.engine.targets`).
    ``profile``: the profile it forecasts with, ``schedule``: which steps it computes (both
    None: an engine that computes and records every step, the probe's)."""

    positions: str
    target: str
    profile: Profile | None
    schedule: Schedule | None

    def new_state(self) -> BranchState:
        """A fresh branch state (branch lifetime), owned by the host, written by the engine."""
        ...

    def begin_run(self, settings: RunSettings) -> None:
        """Facts the host knows about the run starting now (step count, scheduler shift,
        guidance scale); fields left None are unknown. Idempotent within a run."""
        ...

    def begin_step(self, state: BranchState, position: float | None, signature: Any,
                   total_steps: int | None = None, step: int | None = None) -> bool:
        """Begin a step of ``state``'s branch at ``position`` (sigma or timestep; None when
        the host has none) for inputs of ``signature`` (shape facts; a change starts a new
        generation). ``step``: the host's step index when it counts steps or tells
        generations apart itself (a WebUI counts by sigma, and a pass may begin past step 0;
        diffusers' root hook ends a run on a new schedule, and a schedule of a call's own may
        come back to its first sigma); None: the engine counts calls, and a call back at the
        run's first position begins a new generation.
        Returns whether the blocks run (True) or the step is forecast (False)."""
        ...

    def call_position(self, state: BranchState, position: float) -> None:
        """A further call within the current step, at ``position`` on the engine's axis (a
        sampler's intermediate sigma, or ``step + fraction`` on the step axis)."""
        ...

    def record(self, state: BranchState, block: int, residual: torch.Tensor) -> None:
        """Block ``block``'s residual ``(batch, tokens, dim)`` at a computed step (output
        stream minus input stream; for an ``"output"`` target, the head's input as block 0;
        for ``"model_output"``, the model output as block 0, ``(batch, tokens, channels)``)."""
        ...

    def predicted_residual(self, state: BranchState) -> torch.Tensor:
        """The forecast at a skip step, float32, the residual's shape. Raises when there is
        none to give (a host then computes the step and reports :meth:`fail`)."""
        ...

    def fail(self, state: BranchState, why: str) -> None:
        """The host could not do its part for ``state`` (a block did not report, a residual
        could not be measured, a forecast could not be applied): the host computes the step
        in progress and every later step of the branch, and the stats say ``why`` (said once)."""
        ...

    def note(self, state: BranchState, message: str) -> None:
        """A fact of the host's for ``state``'s stats (the step count it could not learn, a
        run cut short): kept once among the branch's notes, for the host to render."""
        ...

    def end_step(self, state: BranchState) -> None:
        """The step's calls are done: a computed step's residuals join the history."""
        ...

    def stats(self, state: BranchState) -> RunStats:
        """What the branch did so far: steps computed and forecast, guard switches (per
        batch item), and ``notes``: sentences for the host to render."""
        ...

    def end_run(self) -> None:
        """The run ended (completed or cancelled): drop what the engine keeps across its
        branches. The hosts reset their branch states themselves."""
        ...


def missing_from(engine: Any) -> list[str]:
    """The contract's methods ``engine`` lacks or has with other parameters (names, kinds
    and defaults, compared with :func:`inspect.signature`); empty when it implements it."""
    import inspect

    problems = []
    for name, member in vars(Engine).items():
        if name.startswith("_") or not callable(member):
            continue
        found = getattr(engine, name, None)
        if found is None or not callable(found):
            problems.append(f"{name}: missing")
            continue
        want = [(p.name, p.kind, p.default) for p in list(inspect.signature(member).parameters.values())[1:]]
        have = [(p.name, p.kind, p.default) for p in inspect.signature(found).parameters.values()]
        if want != have:
            problems.append(f"{name}: parameters {have} instead of {want}")
    for name, kind in (("positions", str), ("target", str), ("profile", (Profile, type(None))),
                       ("schedule", (Schedule, type(None)))):
        if not hasattr(engine, name) or not isinstance(getattr(engine, name), kind):
            problems.append(f"{name}: not an attribute of type {kind}")
    return problems
