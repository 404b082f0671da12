"""The runtime: schedule, per-branch state, and the aggregated per-solver history (NOTES §4).

At a skip step every block is forecast and none computed, so the stack output telescopes,
``h_out = h_in + sum_l R_l``, and the forecast of that sum regroups by solver:

    sum_l R_hat_l = sum_s sum_j w_{s,j} * A_s(t_j),    A_s = sum_l mask_{l,s} * R_l

where ``mask_{l,s}`` selects the dimensions of block ``l`` whose cluster uses solver ``s``.
So one history per solver in use replaces one per block: S x K tensors instead of
blocks x K, with the same result up to float rounding.
"""

from __future__ import annotations

import hashlib
import logging
from collections import deque
from itertools import islice
from typing import Callable, Sequence

import torch

from ..math.solvers import Solver, pool, pool_names
from ..profiles.profile import Profile
from ..profiles.off_settings import PATHS, OffSettings, decide
from ..profiles.settings import RunSettings
from .forecast import bounded, finite, magnitudes, stacked_rows, stacked_weights, weighted_sum
from .guard import (ROBUST_START, SKETCH_ROWS, STRIKES, difference_verdicts, measure,
                    own_verdicts, steady)
from .run_branches import RunBranches, share
from .schedule import Schedule, with_profiles_start
from .slots import STACKED_BYTES, block_masks, stacked_masks
from .state import (LAST_FORECAST, NON_FINITE, UNGUARDED, BranchState, NonFiniteForecast,  # noqa: F401 (importable here)
                    RunStats)
from .targets import TARGETS  # what a profile forecasts: residuals, the head's input, the model output


POSITION_AXES = ("step", "sigma")

logger = logging.getLogger("hyca")


#: ``reduce(tensor) -> tensor``: sums a small float64 tensor over the processes holding shards
#: of one step (context parallelism), so the guard decides alike on all. ``None``: one process.
Reduce = Callable[[torch.Tensor], torch.Tensor]


class HybridCache:
    """Forecasts the summed block residuals of skipped steps from a :class:`Profile`."""

    def __init__(
        self,
        profile: Profile,
        schedule: Schedule,
        positions: str = "step",
        cache_dtype: torch.dtype | None = None,
        guard: bool | None = None,
        reduce: Reduce | None = None,
        compare_settings: bool = True,
        off_settings: str = "robust",
        log_notes: bool = True,
    ) -> None:
        """``guard``: check every computed step's forecast against what was computed and
        switch solver groups that did worse than a lower order (:mod:`hyca.engine.guard`).
        ``None``: on, except on runs at the settings of a profile whose metadata says
        ``guard: false`` (the closed loop chose it so); ``True``: on whatever the profile says;
        ``False``: off, the paper's behaviour. ``reduce``: see :data:`Reduce`.
        ``compare_settings``: at each run's second step, say once what differs between the
        run and the settings the profile was chosen for (a host that knows the run's
        settings up front, such as a WebUI pass, tells them with :meth:`expect` and passes False).
        ``off_settings``: what a run that differs from the profile's settings does, one of
        :data:`hyca.profiles.off_settings.PATHS` (``"robust"``: start solver groups from a low
        order, the guard deciding; ``"profile"``: the robust path off). ``log_notes``: a note
        (nothing forecast, a non-finite forecast) is also logged once; False for a host that
        shows every run's notes itself (a WebUI or ComfyUI console), which would say it twice."""
        if off_settings not in PATHS:
            raise ValueError(f"off_settings must be one of {PATHS}, got {off_settings!r}")
        if positions not in POSITION_AXES:
            raise ValueError(f"positions must be one of {POSITION_AXES}, got {positions!r}")
        self.profile = profile
        self.target = profile.metadata.get("target", "residual")
        if self.target not in TARGETS:
            raise ValueError(f"profile target must be one of {TARGETS}, got {self.target!r}")
        self.schedule = with_profiles_start(schedule, profile)
        self.asked_compute_last = schedule.compute_last  # the run's setting, whatever end the profile chose
        self.positions = positions
        self.cache_dtype = cache_dtype
        self.guard_option = guard  # as given: a copy of this engine for another run keeps it
        self.guard = guard is not False
        self.unguarded = guard is None and profile.metadata.get("guard") is False  # see _guarded
        self.reduce = reduce
        #: seeds the guard's sketches; ranks of one context-parallel group need different ones
        self.sketch_seed = 0
        self.branches = RunBranches()  # which branch states make up the run in progress
        #: what the profile was chosen for; a run that differs is told so (once) and noted in its stats
        self.chosen_for = RunSettings.of_profile(profile.metadata)
        self.compare_settings = compare_settings
        self._told: set[str] = set()
        self.log_notes = log_notes
        self.off_settings = off_settings
        self._expected: OffSettings | None = None  # set by expect: applied to every branch at its step 0
        self._compute_all: str | None = None  # set by expect: why every step of the runs computes
        #: what every run of this engine says at its step 0 (log once, each run's stats): set by
        #: the host that made it (a probe for the run's settings that failed, say)
        self.run_notes: tuple[str, ...] = ()
        #: what the host can tell about the run in progress beyond the engine's own view (the
        #: scheduler's shift, a guidance scale the pipeline keeps); set by the host at step 0
        self.host_run = RunSettings()
        dim_solvers = profile.dim_solvers()  # (blocks, dim)
        self.solver_ids: list[int] = torch.unique(dim_solvers).tolist()
        self.solvers: list[Solver] = [pool()[i] for i in self.solver_ids]
        # one_hot[l, s, d] = 1 where dimension d of block l uses the s-th solver in use
        ids = torch.tensor(self.solver_ids)
        self._one_hot = (dim_solvers.unsqueeze(1) == ids.view(1, -1, 1))
        self._masks_key = hashlib.sha1(dim_solvers.numpy().tobytes()).hexdigest() + str(tuple(dim_solvers.shape))
        self._max_history = max(s.history for s in self.solvers)
        self.last_stats = RunStats()

    # --- the contract (hyca.engine.contract) ------------------------------------

    def new_state(self) -> BranchState:
        return BranchState()

    def begin_run(self, settings: RunSettings) -> None:
        """What the host can tell about the run beyond the engine's own view (the
        scheduler's shift, a guidance scale the pipeline keeps), compared with the
        profile's settings at the run's second step."""
        self.host_run = settings

    def end_run(self) -> None:
        self.forget_runs()

    def call_position(self, state: BranchState, position: float) -> None:
        state.current_position = float(position)

    def fail(self, state: BranchState, why: str) -> None:
        """The host computes the step in progress (a forecast it could not apply) and every
        later step of ``state``'s run; said once in the log and the stats."""
        if not state.failed:
            message = f"{why}; every later step of this run computed"
            logger.warning("HyCa: %s", message)
            state.stats.note(message)
        state.failed = True
        state.computing = True

    def stats(self, state: BranchState) -> RunStats:
        return state.stats

    def note(self, state: BranchState, message: str) -> None:
        state.stats.note(message)

    # --- per step ---------------------------------------------------------------

    def begin_step(self, state: BranchState, position: float | None, signature: tuple,
                   total_steps: int | None = None, step: int | None = None) -> bool:
        """Decide whether this step runs the blocks. Resets the branch when the input
        shape changes (batch or resolution) or, for a host that gives no ``step``, the
        sampler is back at its first position (a new generation that nobody reset).
        ``step``: the host's step index, when it counts steps or tells generations apart
        itself (see :class:`~hyca.engine.contract.Engine`)."""
        if step is not None:
            state.step = step
        # back at the run's first position: a new generation nobody reset, unless the host tells
        # generations apart itself (it gives ``step``), where a schedule of its own may revisit it
        if state.step > 0 and (signature != state.signature or
                               (step is None and position is not None and position == state.first_position)):
            state.reset()
        if state.step == 0:
            if self.branches.left_over(state):
                self.forget_runs()
            if total_steps is not None and all(self.schedule.plan(total_steps)):
                self._say(state, f"the schedule (warm-up {self.schedule.warmup}, N={self.schedule.interval}) "
                                 f"forecasts none of this run's {total_steps} step{'s' if total_steps != 1 else ''}: every step is computed")
            state.first_position = position
            state.signature = signature
            state.total_steps = total_steps
            state.histories = [deque(maxlen=s.history) for s in self.solvers]
            state.magnitudes = [deque(maxlen=s.history) for s in self.solvers]
            state.positions = deque(maxlen=self._max_history)
            state.computed_steps = deque(maxlen=self._max_history)
            state.active = list(self.solver_ids)
            state.strikes = [0] * len(self.solver_ids)
            if self._expected is not None:
                self._take_path(state, self._expected, log=False)
            if self._compute_all is not None:
                self._say(state, self._compute_all)
            for message in self.run_notes:
                self._say(state, message)
        self.branches.began(state)
        if state.step == 1 and self._forecasts(state):  # (a run that forecasts nothing: said at step 0)
            if self.compare_settings:
                self._compare_settings(state)
            if self.guard and not self._guarded(state):
                state.stats.note(UNGUARDED)
            if self.asked_compute_last and not self.schedule.compute_last and state.total_steps:
                state.stats.note(LAST_FORECAST)
        use_step = self.positions == "step" or position is None
        state.current_position = float(state.step) if use_step else float(position)
        state.computing = (state.failed or not state.positions or self._compute_all is not None
                           or self.schedule.computes(state.step, state.total_steps))
        state.forecast = state.forecast_position = None
        if not state.computing:
            forecast, known_finite = self._forecast(state)
            if known_finite or finite(forecast):
                state.forecast, state.forecast_position = forecast, state.current_position
            else:  # computing this step costs time, forecasting it would cost the image
                state.computing = True
                state.stats.non_finite += 1
                self._say(state, NON_FINITE)
        if state.computing:
            state.accumulators = [None] * len(self.solvers)
            state.stacked = None
        return state.computing

    def record(self, state: BranchState, block: int, residual: torch.Tensor) -> None:
        """Add block ``block``'s residual (output stream minus input stream) to the
        per-solver sums of this compute step. Inference only: the cached sums never hold
        an autograd graph (the residual is detached)."""
        if residual.requires_grad:
            residual = residual.detach()
        if state.items is None:
            self._per_item(state, residual.shape[0])
        dtype = self.cache_dtype or residual.dtype
        masks = block_masks(self._one_hot, self._masks_key, residual.device, dtype)
        if len(self.solvers) * residual.numel() * dtype.itemsize <= STACKED_BYTES:
            self._record_stacked(state, block, residual, masks[block], dtype)
            return
        for s, mask in masks[block]:
            acc = state.accumulators[s]
            if acc is None:
                acc = state.accumulators[s] = self._fresh_accumulator(state, s, residual)
            if mask is None:
                acc.add_(residual)
            else:
                acc.addcmul_(residual, mask)

    def _record_stacked(self, state: BranchState, block: int, residual: torch.Tensor,
                        fed: list[tuple[int, torch.Tensor | None]], dtype: torch.dtype) -> None:
        """:meth:`record` for small residuals: every slot's sum is a row of one
        ``(slots, *residual.shape)`` tensor, updated by one ``addcmul_`` with the block's
        ``(slots, dim)`` mask instead of one update per slot (per-operation overhead is most
        of a small model's recording cost). Per element the same operation as the per-slot
        update (a slot the block does not feed adds an exact zero), so the sums are the same
        bits. A block that feeds one slot with every dimension (every block of a one-solver
        profile) adds to that row alone: the other rows would gain exact zeros (and, from a
        non-finite residual, NaN, which the per-slot path does not spread either). At the
        step's end each slot's history takes a copy of its row (a view would keep the whole
        stacked tensor alive as long as the longest history keeps its row; one slot keeps
        its row, which is all of it)."""
        if state.stacked is None:
            state.stacked = torch.zeros((len(self.solvers), *residual.shape), device=residual.device, dtype=dtype)
        if len(fed) == 1 and fed[0][1] is None:  # one slot, every dimension (a one-solver profile's blocks):
            state.stacked[fed[0][0]].add_(residual)  # its row gains exactly what the masked update adds
        else:
            masks = stacked_masks(self._one_hot, self._masks_key, residual.device, dtype)[block]
            state.stacked.addcmul_(residual.unsqueeze(0), masks.view(masks.shape[0], *[1] * (residual.dim() - 1), -1))
        for s, _ in fed:
            if state.accumulators[s] is None:
                state.accumulators[s] = state.stacked[s]

    def predicted_residual(self, state: BranchState) -> torch.Tensor:
        """The forecast of ``sum_l R_l`` at this skip step (float32, the residuals' shape),
        the one :meth:`begin_step` made and found finite. A host that moved the step's
        position since (a call at a fraction of a step) gets a fresh one; if that is not
        finite, :class:`NonFiniteForecast` (the host computes instead and says so)."""
        if state.forecast is not None and state.forecast_position == state.current_position:
            return state.forecast
        forecast, known_finite = self._forecast(state)
        if not (known_finite or finite(forecast)):
            state.stats.non_finite += 1
            raise NonFiniteForecast(NON_FINITE)
        return forecast

    def _forecast(self, state: BranchState) -> tuple[torch.Tensor, bool]:
        """One weighted sum over all per-solver histories (detached values and constant
        weights: no autograd graph), and whether it is finite by its bound
        (:func:`~hyca.engine.forecast.bounded`; False: not known, look at it). Knowing it
        from the magnitudes taken when the values were cached spares a skip step a reduction
        and a host sync."""
        key = self._weights_key(state)
        counts, _, scales = stacked_weights(*key)
        values, sizes = [], []
        for history, magnitude, count in zip(state.histories, state.magnitudes, counts):
            values.extend(islice(history, count))
            sizes.extend(islice(magnitude, count))
        first = values[0]
        return (weighted_sum(values, stacked_rows(*key, first.dim(), first.device)),
                len(sizes) == len(values) and bounded(sizes, scales, first.numel()))

    def _weights_key(self, state: BranchState) -> tuple:
        """What the forecast's weights depend on, as :func:`~hyca.engine.forecast.stacked_weights`
        takes it: the solver of each (slot, item), the history positions, this step's
        position, each slot's history length, the batch items."""
        return (tuple(state.active), tuple(state.positions), state.current_position,
                tuple(len(h) for h in state.histories), state.items or 1)

    def _per_item(self, state: BranchState, items: int) -> None:
        """The batch is known: one solver entry and strike count per (slot, item), each
        starting where the slot's shared entry stands."""
        state.items = items
        state.active = [solver for solver in state.active for _ in range(items)]
        state.strikes = [strikes for strikes in state.strikes for _ in range(items)]

    def end_step(self, state: BranchState) -> None:
        if state.computing:
            recorded = all(acc is not None for acc in state.accumulators)
            if not recorded:
                state.failed = True  # some block did not report: the history would be inconsistent
            if not state.failed and self._guarded(state) and state.positions and self.schedule.interval > 1:
                self._check(state)  # (N=1 forecasts nothing: nothing to check)
            if not state.failed:
                for history, magnitude, acc, size in zip(state.histories, state.magnitudes, state.accumulators,
                                                         magnitudes(state.accumulators, state.stacked)):
                    # a stacked row would keep every slot's row alive until the slot keeping
                    # history longest drops it: the history holds its own copy (one slot's row is all of it)
                    history.appendleft(acc if state.stacked is None or len(state.accumulators) == 1 else acc.clone())
                    magnitude.appendleft(size)
                state.positions.appendleft(state.current_position)
                state.computed_steps.appendleft(state.step)
            state.accumulators, state.stacked = [], None
            state.stats.computed += 1
        else:
            state.stats.forecast += 1
        state.forecast = state.forecast_position = None
        state.step += 1
        self.last_stats = state.stats

    def _forecasts(self, state: BranchState) -> bool:
        """Whether ``state``'s run forecasts any step (the profile plays a part in it)."""
        return self._compute_all is None and not (state.total_steps is not None
                                                  and all(self.schedule.plan(state.total_steps)))

    def _guarded(self, state: BranchState) -> bool:
        """On, unless the profile was chosen guard-off and the run is at its settings."""
        return self.guard and not (self.unguarded and state.stats.off_settings is None)

    def history_bytes(self, state: BranchState) -> int:
        return sum(t.numel() * t.element_size() for h in state.histories for t in h)

    # --- helpers -----------------------------------------------------------------

    def _check(self, state: BranchState) -> None:
        """The guard: this computed step is a free check of what each solver would have
        forecast for it; a second guidance branch at the same step also checks the forecasts
        of their difference (see :mod:`hyca.engine.guard`)."""
        judged = [steady([state.step, *state.computed_steps], self.schedule.interval)] * len(self.solver_ids)
        branches = max(self.branches.at(state.step - 1), self.branches.at(state.step))
        rows = SKETCH_ROWS if branches > 1 else 0  # sketches only serve a second guidance branch
        check = measure(list(state.histories), list(state.positions), state.current_position, state.accumulators,
                        state.active, judged, state.step, self.reduce, rows, self.sketch_seed, self.solver_ids,
                        state.items or 1)
        if not check.judged:
            return
        verdicts = own_verdicts(check)
        peer = self.branches.peer_of(state)
        if peer is not None:  # the guided-aware verdict decides where there is one
            verdicts.update(difference_verdicts(check, peer[1]))
        for row, better in verdicts.items():
            state.strikes[row] = 0 if better is None else state.strikes[row] + 1
            if state.strikes[row] >= STRIKES:
                state.switch(row, better, state.step)
        if peer is not None:
            share(state, peer[0])
        self.branches.last_check = (state, check)

    def run_settings(self, state: BranchState) -> RunSettings:
        """What this engine can tell about the run ``state`` belongs to: its schedule and
        axis, and the step count once known (guidance: see :meth:`guidance_branches`)."""
        return RunSettings(steps=state.total_steps, interval=self.schedule.interval, warmup=self.schedule.warmup,
                           compute_last=self.asked_compute_last, positions=self.positions)

    def guidance_branches(self) -> int:
        """How many branch states began the current run's first step: 2 with classifier-free
        guidance in separate calls (a batched call is one branch: its guidance cannot be seen)."""
        return self.branches.at(0)

    def _compare_settings(self, state: BranchState) -> None:
        """At a branch's second step (the branches of step 0 have all begun): compare the
        run with the settings the profile was chosen for and, where they differ, take the
        off-settings path (:func:`hyca.profiles.off_settings.decide`) and say so once."""
        run = self.run_settings(state).merged(self.host_run)
        branches = self.guidance_branches()
        extra = []
        if self.chosen_for.guided is False and branches > 1 and run.guided is None:
            extra.append("guidance: chosen without, this run has two guidance branches")
        elif self.chosen_for.guided and branches == 1 and run.guided is None:
            extra.append(f"guidance: chosen at {self.chosen_for.guidance_scale:g}, this run has one branch")
        off = decide(self.chosen_for, run, self.guard, self.off_settings, extra,
                     guided_branches=branches > 1 if branches else None)
        if off is not None:
            self._take_path(state, off, log=True)

    def expect(self, run: RunSettings, own_sigmas: bool = False, extra: Sequence[str] = (),
               start: str | None = None, compute_all: str | None = None) -> OffSettings | None:
        """For hosts that know the run's settings before it starts (a WebUI pass, a ComfyUI
        sampler): decide the off-settings path for ``run`` now; every branch that begins from
        now on takes it at its step 0 and carries it in its stats. ``extra`` and ``start``: as
        :func:`~hyca.profiles.off_settings.decide`'s (what the host sees beyond the settings,
        such as a sampler that re-noises every step, and where the robust path starts then).
        ``compute_all``: every step of the runs computes, for this reason (said once, in the stats).
        Returns the decision for the host to say (``None``: the run matches the profile's settings)."""
        self._compute_all = compute_all
        self._expected = None if compute_all else decide(self.chosen_for, run, self.guard, self.off_settings, extra,
                                                         own_sigmas=own_sigmas, start=start)
        return self._expected

    def _take_path(self, state: BranchState, off: OffSettings, log: bool) -> None:
        """``state``'s branch runs off its profile's settings: start its groups as ``off``
        says and note it in its stats (and the log, once, when the engine found it itself)."""
        state.stats.off_settings = off
        if off.start is not None:
            self.start_from(state, off.start)
        if log:
            self._say(state, off.describe())
        else:
            state.stats.note(off.describe())

    def start_from(self, state: BranchState, solver: str) -> None:
        """Switch every solver group of ``state`` to ``solver`` before it forecasts (a
        reuse group to taylor-1 too): the robust path for a profile used off its settings
        (:mod:`hyca.profiles.off_settings`). The guard's candidates for a group are then
        ``solver``, the profile's own solver and that solver's lower orders
        (:func:`guard.candidates`), so a check can move it down to reuse or give it its own
        solver back; the switches show in the stats. Why start low rather than let the guard
        demote: :mod:`hyca.profiles.off_settings`."""
        to = pool_names().index(solver)
        depth = pool()[to].history  # a slot keeps as much history as its solver reads: raised, it needs more
        state.histories = [h if h.maxlen >= depth else deque(h, maxlen=depth) for h in state.histories]
        state.magnitudes = [m if m.maxlen >= depth else deque(m, maxlen=depth) for m in state.magnitudes]
        if state.positions.maxlen < depth:
            state.positions = deque(state.positions, maxlen=depth)
            state.computed_steps = deque(state.computed_steps, maxlen=depth)
        for row, active in enumerate(state.active):
            if active != to:
                state.switch(row, to, state.step, by=ROBUST_START)

    def _say(self, state: BranchState, message: str) -> None:
        """A note in the run's stats, logged once per engine."""
        state.stats.note(message)
        if message not in self._told and self.log_notes:
            self._told.add(message)
            logger.warning("HyCa: %s", message)

    def forget_runs(self) -> None:
        """Drop what the engine keeps across the branches of one run (which branches began
        each step, the last guard check): a host calls it when it resets its branch states
        (a pipeline call's end); :meth:`begin_step` also does when a new run begins with
        bookkeeping left over from a run that was cut short."""
        self.branches.reset()

    def _fresh_accumulator(self, state: BranchState, s: int, residual: torch.Tensor) -> torch.Tensor:
        dtype = self.cache_dtype or residual.dtype
        history = state.histories[s]
        # The oldest value is recycled only when nothing reads it before this step ends:
        # the guard forecasts this step from the whole history at its end.
        if not self.guard and len(history) == history.maxlen and history[-1].shape == residual.shape:
            state.magnitudes[s].pop()
            return history.pop().zero_()  # the value about to fall out of the window
        return torch.zeros(residual.shape, device=residual.device, dtype=dtype)
