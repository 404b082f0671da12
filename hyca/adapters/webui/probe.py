"""Probing inside a WebUI generation: the first pass of a model without a profile runs
fully computed while :class:`hyca.probing.recorder.SketchRecorder` records it, and the
profile chosen from that record serves the following generations.

The recorder offers the engine's hook-facing methods, so it takes the engine's place in
a :class:`~.session.PassSession`: the session maps calls to steps and branches exactly as
it does for caching, the blocks report the same residuals, and the recorder keeps the
first (cond) branch.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any

from ...engine.cache import BranchState, RunStats
from ...engine.schedule import Schedule
from ...profiles.profile import Profile
from ...profiles.settings import RunSettings


def available() -> bool:
    try:
        from ...probing import analysis, recorder  # noqa: F401
    except ImportError:
        return False
    return hasattr(analysis, "analyse") and hasattr(recorder, "SketchRecorder")


class ProbeEngine:
    """The engine contract (:mod:`hyca.engine.contract`) for a probing pass, backed by a
    SketchRecorder created once the pass's step count is known (:meth:`begin_run`)."""

    positions = "step"
    target = "residual"

    def __init__(self, num_blocks: int, schedule: Schedule, seed: int = 0) -> None:
        self.num_blocks, self.schedule, self.seed = num_blocks, schedule, seed
        self.recorder, self.steps = None, None

    def prepare(self, steps: int | None) -> None:
        """Called with the pass's step count once the sampler is known."""
        from ...probing.recorder import SketchRecorder

        if not steps:
            raise RuntimeError("cannot probe: the frontend does not tell this pass's step count")
        self.recorder = SketchRecorder(self.num_blocks, steps, self.schedule, "step", seed=self.seed)
        self.steps = steps

    def new_state(self) -> BranchState:
        return BranchState()

    def begin_run(self, settings: RunSettings) -> None:
        self.prepare(settings.steps)

    def end_run(self) -> None:
        """The recording stays for :meth:`profile`."""

    def call_position(self, state: BranchState, position: float) -> None:
        """The recorder takes positions per sigma at :meth:`begin_step`."""

    def fail(self, state: BranchState, why: str) -> None:
        if self.recorder is not None:
            self.recorder.fail(state, why)
        state.failed = True

    def stats(self, state: BranchState) -> RunStats:
        return state.stats

    def begin_step(self, state: BranchState, position: float | None, signature: Any, total_steps: int | None = None,
                   step: int | None = None) -> bool:
        if step is not None:
            state.step = step
        self.recorder.begin_step(state, position, signature, total_steps)
        state.computing = True
        return True

    def record(self, state: BranchState, block: int, residual: Any) -> None:
        self.recorder.record(state, block, residual)

    def end_step(self, state: BranchState) -> None:
        self.recorder.end_step(state)
        state.stats.computed += 1

    def predicted_residual(self, state: BranchState) -> Any:
        raise RuntimeError("a probing pass computes every step")

    def profile(self, fp: dict[str, Any], clusters: int = 4, run_settings: Any = None) -> Profile:
        """The profile chosen from what was recorded (raises if the pass was incomplete).
        ``run_settings``: the probing pass's :class:`~hyca.profiles.settings.RunSettings`
        (steps, guidance scale, sigmas, N, warm-up, last step, positions), stored as the
        profile's ``chosen_for``."""
        from ...probing.analysis import analyse

        if self.recorder is None:
            raise RuntimeError("the probing pass made no model call")
        indicators, replay = self.recorder.finish()
        profile, report = analyse(indicators, replay, clusters)
        profile.metadata = {
            "method": "hyca", "fingerprint": fp, "interval": self.schedule.interval, "warmup": self.schedule.warmup,
            "compute_last": self.schedule.compute_last, "positions": "step",
            "probe": {"frontend": "webui", "steps": self.steps, "clusters": clusters},
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "selection": report,
        }
        if run_settings is not None:
            profile.metadata["chosen_for"] = run_settings.to_json()
            if run_settings.guidance_scale is not None:
                profile.metadata["probe"]["guidance_scale"] = run_settings.guidance_scale
        return profile
