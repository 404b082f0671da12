"""Recording a fully computed run: block residuals reduced to sketches as they arrive.

The recorder stands in for the engine inside HyCa's own diffusers hooks
(:mod:`hyca.adapters.diffusers.hooks`): it offers the engine's hook-facing methods
(``begin_step``, ``record``, ``end_step``), always computes, and so receives exactly the
residual the engine would cache (the output-reaching stream of each block, per the model
family table) with the same step positions.

Each residual ``(batch, tokens, dim)`` becomes a sketch ``(rows, dim)``: the batch and
token axes are projected by one fixed, seeded Gaussian matrix ``P`` (entries of variance
``1/rows``), so for every dimension the norm over rows estimates the norm over tokens
without bias, and differences and weighted sums of sketches are sketches of differences
and weighted sums. At the end of each step the step's sketches ``(blocks, rows, dim)``
feed the incremental indicators and the schedule replay, and are dropped.

Branches and guidance: without guidance (``guidance_scale`` None or 1) one branch is
recorded, the one named ``branch`` ("cond") by the pipeline's ``cache_context``, or calls
made outside any context (a plain sampling loop); when several unnamed calls share one
timestep (pipelines that run cond then uncond without naming them) the first is
recorded. With guidance the engine's forecast errors reach the image through the guided
output ``u + g (c - u)``, where the error of ``c - u`` is amplified by ``g`` (issue 11:
forecasts that beat reuse on each branch lose to it on the guided image). So both
branches are recorded and the step's sketch is that of the guided residual
``R_u + g (R_c - R_u)``: every solver is linear, so its forecast error on this
combination is the combination of its errors on the branches. Branches are the contexts
named ``branch`` and ``uncond_branch`` ("uncond"; diffusers' guiders name them
``pred_cond`` / ``pred_uncond``), or the first and second unnamed call at a timestep; with
``batched_guidance`` ("uncond-first" or "cond-first", the order of the halves of a batched
call such as SD3's) the halves of each residual. A step is
complete when a call at another timestep begins, or at :meth:`finish`. A batch of several
images is one sketch over all of them.

Where the accumulators live (``accumulate_on``): on the CPU by default, about 125 MiB for
FLUX.1-dev at 50 steps with 8 rows (2 for the spectrum), and some 0.1 s of CPU work per
step on one core; ``None`` keeps them next to the residuals (the GPU), where that work is
negligible.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..engine.cache import POSITION_AXES
from ..engine.state import BranchState, RunStats
from ..engine.schedule import Schedule
from ..math.indicators import IndicatorAccumulator
from ..math.selection import Replay, ReplayErrors
from ..math.solvers import Solver
from ..profiles.settings import RunSettings


def projection(rows: int, count: int, seed: int) -> torch.Tensor:
    """The ``(rows, count)`` Gaussian sketching matrix, on the CPU, from its own generator
    (the global random state is left alone)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, count, generator=generator, dtype=torch.float32) / math.sqrt(rows)


class SketchRecorder:
    """Turns one branch of a fully computed run into indicators and replay errors. An
    engine of :mod:`hyca.engine.contract` that always computes: ``target`` says what the
    hooks report as block 0 (``"output"``: the output head's input, one "block")."""

    target = "residual"
    profile = schedule = None  # it records every step; it forecasts none

    def __init__(self, num_blocks: int, steps: int, schedule: Schedule, positions: str = "step",
                 rows: int = 8, spectral_rows: int | None = 2, seed: int = 0, branch: str = "cond",
                 candidates: tuple[Solver, ...] | None = None, progress: Any = None,
                 accumulate_on: str | torch.device | None = "cpu", guidance_scale: float | None = None,
                 uncond_branch: str = "uncond", batched_guidance: str | None = None,
                 other_schedules: tuple[Schedule, ...] = ()) -> None:
        if positions not in POSITION_AXES:
            raise ValueError(f"positions must be one of {POSITION_AXES}, got {positions!r}")
        if not isinstance(rows, int) or rows < 1:
            raise ValueError(f"rows (sketch size) must be a positive integer, got {rows!r}")
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        if batched_guidance not in (None, "uncond-first", "cond-first"):
            raise ValueError(f"batched_guidance must be None, 'uncond-first' or 'cond-first', got {batched_guidance!r}")
        self.num_blocks, self.steps, self.positions = num_blocks, steps, positions
        self.rows, self.spectral_rows, self.seed, self.branch = rows, spectral_rows, seed, branch
        self.uncond_branch = uncond_branch
        #: context name -> role: ``branch`` / ``uncond_branch``, and the names diffusers' guiders
        #: give the same passes (``diffusers/guiders``: ``_input_predictions`` "pred_cond" /
        #: "pred_uncond", which HunyuanVideo 1.5's pipeline passes to ``cache_context``)
        self._roles = {branch: "cond", uncond_branch: "uncond", f"pred_{branch}": "cond",
                       f"pred_{uncond_branch}": "uncond"}
        guided = guidance_scale is not None and abs(float(guidance_scale) - 1.0) > 1e-9
        self.guidance_scale = float(guidance_scale) if guided else None
        self.batched_guidance = batched_guidance if guided else None
        # one replay per schedule the probe chooses between (the same sketches feed them all)
        self.replays = [ReplayErrors(s.plan(steps), candidates) for s in (schedule, *other_schedules)]
        self.accumulator: IndicatorAccumulator | None = None
        self.progress = progress
        self.accumulate_on = accumulate_on  # None: where the residuals are (the GPU)
        self.states: Any = None  # the hooks' BranchStates, set by whoever registers the hooks
        self.error: BaseException | None = None
        self.step = 0
        self.branches_seen: set[str] = set()  # "cond" / "uncond": which went into the sketches
        self._states: dict[str, Any] = {}  # role -> the BranchState recorded for it
        self._current: Any = None  # that state while one of its calls runs, else None
        self._role: str | None = None  # "cond" or "uncond": the role of the call in progress
        self._position: float | None = None  # the timestep whose branches are being collected
        self._calls_here = 0  # unnamed calls at that timestep so far
        self._signature: tuple | None = None
        self._sketches: dict[str, dict[int, torch.Tensor]] = {}  # role -> block -> sketch
        self._pending = False  # sketches of a step not yet folded into the indicators
        self._projection: torch.Tensor | None = None

    # --- the engine contract (hyca.engine.contract) -----------------------------------------

    def new_state(self) -> BranchState:
        return BranchState()

    def begin_run(self, settings: RunSettings) -> None:
        """The recording's step count is fixed at construction; a run that says otherwise
        fails the recording (its replay would be of another schedule)."""
        if settings.steps is not None and settings.steps != self.steps and self.error is None:
            self._fail(ValueError(f"the run has {settings.steps} steps, the probe was set up for {self.steps}"))

    def end_run(self) -> None:
        """Nothing spans a recorded run but the recording, which :meth:`finish` reads."""

    def call_position(self, state: BranchState, position: float) -> None:
        """Positions are taken per timestep at :meth:`begin_step`; later calls add none."""

    def fail(self, state: BranchState, why: str) -> None:
        """The host could not record this branch: the probe fails (a partial record would
        choose from a wrong replay)."""
        state.failed = True
        state.stats.note(why)
        self._fail(RuntimeError(why))

    def stats(self, state: BranchState) -> RunStats:
        return state.stats

    def note(self, state: BranchState, message: str) -> None:
        state.stats.note(message)

    def begin_step(self, state: Any, position: float | None, signature: tuple | None,
                   total_steps: int | None = None, step: int | None = None) -> bool:
        state.computing = True
        new_step = (position is None or position != self._position or not self._pending
                    or self._recorded_here(state))
        if new_step:
            self._flush()
            self._position, self._calls_here = position, 0
        role = self._role_of(state)
        self._calls_here += 1
        self._current, self._role = (state, role) if role is not None else (None, None)
        if self._current is not None:
            if self._signature is not None and signature != self._signature:
                self._fail(ValueError(f"the input shape changed from {self._signature} to {signature} "
                                      "during the probe; probe one resolution and batch size at a time"))
                raise self.error
            self._signature = signature
            self._sketches[role] = {}
            self._pending = True
        return True

    def record(self, state: Any, block: int, residual: torch.Tensor) -> None:
        if state is not self._current or self.error is not None:
            return
        try:
            if residual.numel() == 0:  # e.g. a 0-pixel image: a profile of nothing would read as "reuse"
                raise ValueError(f"block {block} produced an empty residual {tuple(residual.shape)}: the probe's "
                                 "image (or token count) is empty")
            if self.batched_guidance is not None:
                residual = self._guided_halves(residual)
            self._sketches[self._role][block] = self._sketch(residual)
        except Exception as error:  # the hooks would only log it; the probe must fail
            self._fail(error)
            raise

    def end_step(self, state: Any) -> None:
        if state is not self._current:
            return
        self._current = None
        if self.error is not None:  # raised in a block hook, which only logs: stop the run here
            raise RuntimeError(f"the probe's recording failed: {self.error}") from self.error
        missing = sorted(set(range(self.num_blocks)) - set(self._sketches[self._role]))
        if missing:
            self._fail(RuntimeError(f"blocks {missing[:5]} did not run at step {self.step}; the probe needs a "
                                    "fully computed run (is another cache or a skip-layer option active?)"))
            raise self.error

    def predicted_residual(self, state: Any) -> torch.Tensor:
        raise RuntimeError("the probe computes every step; nothing is forecast")

    # --- results ---------------------------------------------------------------------------

    def finish(self) -> tuple[torch.Tensor, Replay]:
        """``(indicators (blocks, dim, 10), replay)`` once every step was recorded."""
        if self.error is None:
            try:
                self._flush()
            except Exception as error:
                self._fail(error)
        if self.error is not None:
            raise RuntimeError(f"the probe's recording failed: {self.error}") from self.error
        if self.step != self.steps:
            raise RuntimeError(
                f"the probe recorded {self.step} transformer calls of the {self.branch!r} branch, "
                f"but steps={self.steps}: pass the number of sampling steps the run makes"
            )
        return self.accumulator.finalize().cpu(), self.replays[0].result()

    def other_replays(self) -> list[Replay]:
        """The replays of ``other_schedules``, in their order (after :meth:`finish`)."""
        return [replay.result() for replay in self.replays[1:]]

    # --- helpers ---------------------------------------------------------------------------

    def _recorded_here(self, state: Any) -> bool:
        """Whether the call beginning now is the sampler's next step at the same timestep (a
        schedule that repeats a sigma): its named branch was already recorded at this
        timestep, or (unnamed calls) every call one step makes here was made."""
        context = getattr(self.states, "_context", None)
        if context is not None:
            return self._roles.get(context.name) in self._sketches
        calls_per_step = 2 if self.guidance_scale is not None and self.batched_guidance is None else 1
        return self._calls_here >= calls_per_step

    def _role_of(self, state: Any) -> str | None:
        """"cond", "uncond" or None (not recorded) for the call beginning now."""
        context = getattr(self.states, "_context", None)
        if context is not None:
            role = self._roles.get(context.name)
        else:  # unnamed: the first call at a timestep is cond, the second uncond
            role = {1: "cond", 2: "uncond"}.get(self._calls_here + 1)
        if role == "uncond" and self.guidance_scale is None or self.batched_guidance is not None and role != "cond":
            return None
        if role is not None and self._states.setdefault(role, state) is not state:
            return None  # another state under the same name: not the branch this recording follows
        return role

    def _guided_halves(self, residual: torch.Tensor) -> torch.Tensor:
        """A batched call's residual ``[uncond; cond]`` (or the other order) -> the guided one."""
        if residual.shape[0] % 2:
            raise ValueError(f"batched guidance needs an even batch, got {residual.shape[0]}")
        first, second = residual.chunk(2)
        uncond, cond = (first, second) if self.batched_guidance == "uncond-first" else (second, first)
        return uncond + self.guidance_scale * (cond - uncond)

    def _flush(self) -> None:
        """Fold the collected step into the indicators and the replay: the guided sketch
        when both branches were recorded under guidance, else the cond branch's."""
        if not self._pending:
            return
        self._pending = False
        per_role = {role: sketches for role, sketches in self._sketches.items()
                    if len(sketches) == self.num_blocks}
        self._sketches = {}
        if "cond" not in per_role:
            raise RuntimeError(f"step {self.step} recorded no {self.branch!r} branch")
        cond = torch.stack([per_role["cond"][b] for b in range(self.num_blocks)])
        if "uncond" in per_role:
            uncond = torch.stack([per_role["uncond"][b] for b in range(self.num_blocks)])
            sketch = uncond + self.guidance_scale * (cond - uncond)
            self.branches_seen.update(("cond", "uncond"))
        else:
            sketch = cond
            self.branches_seen.add("cond" if self.batched_guidance is None else "cond+uncond (batched)")
        self._finish_step(sketch)

    def _sketch(self, residual: torch.Tensor) -> torch.Tensor:
        flat = residual.detach().reshape(-1, residual.shape[-1])
        if self._projection is None:
            self._projection = projection(self.rows, flat.shape[0], self.seed).to(flat.device)
        if self._projection.shape[1] != flat.shape[0]:
            raise ValueError(f"a residual has {flat.shape[0]} tokens x batch, the first had "
                             f"{self._projection.shape[1]}; every block must see the same tokens")
        return self._projection @ flat.float()

    def _finish_step(self, sketch: torch.Tensor) -> None:
        if self.accumulate_on is not None:
            sketch = sketch.to(self.accumulate_on)
        if self.accumulator is None:
            self.accumulator = IndicatorAccumulator(self.num_blocks, sketch.shape[2], self.steps,
                                                    self.spectral_rows)
        if self.step >= self.steps:
            raise RuntimeError(f"the run made more than steps={self.steps} transformer calls in the "
                               f"{self.branch!r} branch; pass the number of sampling steps it makes")
        use_step = self.positions == "step" or self._position is None
        self.accumulator.update(sketch)
        for replay in self.replays:
            replay.update(sketch, float(self.step) if use_step else float(self._position))
        self.step += 1
        if self.progress is not None:
            self.progress.update(1)

    def _fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
