"""One sampling pass of a WebUI generation: which step each model call belongs to, which
guidance branch it serves, and whether its blocks run or are forecast.

Frontends call the model once per branch chunk per evaluation, and second-order samplers
evaluate it more than once per step, so calls are mapped to steps by their sigma, never
by counting: a call belongs to step ``k`` of the pass's sigma schedule when
``s_k >= sigma > s_{k+1}``. The first call of a step begins it in the engine; further
calls of the same step (Heun's correction, DPM2's midpoint) repeat its decision: on a
computed step they run the blocks without recording, on a forecast step they forecast at
their fractional position. Without a schedule, each new lower sigma opens a step.

Branches: a call carries a hint (Forge's ``cond_or_uncond``; ``None`` where the frontend
does not say) and an input shape; calls with the same hint and shape at one sigma are
numbered, and the number of such calls at the pass's first sigma fixes how many branches
share that key. A HyCa-internal error raises :class:`HyCaFailure`, which the frontend
glue turns into an uncached re-run of the call and uncached sampling for the rest of the
pass (one console line).

Residuals: a block's residual is its output stream minus its input stream *as it was
before the call* (:class:`~hyca.engine.residual.ResidualMeter`): Forge Neo's FLUX blocks
update their input in place and hand the same tensor back, so "output minus input" taken
afterwards is zero. A block that hands back its own input while no copy of it was kept
(inference tensors carry no version counter to tell a write) would record an identically
zero residual: that is a :class:`HyCaFailure`, never a silent zero.

Forecast: on a forecast call every block hands its inputs on unchanged, except the first
block that actually runs in that call, which adds the forecast summed residual. Which
block that is does not matter (Forge's SD3.5 skip list, layer-skip patches).

Output head (an engine whose ``target`` is ``"output"``, :mod:`hyca.engine.targets`): the
blocks record nothing; the head's input (the adapter's ``head``, hooked by
:func:`.kinds.gate_head`) is recorded as block 0 on the call that begins a computed step,
and on a forecast call every block hands its inputs on and the head's input is the
engine's forecast, as the diffusers root does (``HyCaRoot._head_pre`` /
``_record_or_take``). A recording or forecast call that never reaches the head is a
:class:`HyCaFailure` (its output would be the blocks' pass-through, not the forecast).

Model output (``target`` ``"model_output"``, :mod:`.model_call`): the blocks record nothing;
the call that begins a computed step records its output's derivative as block 0, and a
forecast call does not run the model at all: its output is made from the forecast
(diffusers' TaylorSeer lite strategy, on the frontend's own model call).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ...engine.cache import BranchState, HybridCache, RunStats
from ...engine.guard import Switch
from ...engine.residual import ResidualError, ResidualMeter, Snapshot
from ...engine.targets import MODEL_OUTPUT, OUTPUT
from ...profiles.off_settings import OffSettings
from ...profiles.settings import RunSettings
from .model_call import ModelOutputs
from .results import PassStats, of_image

logger = logging.getLogger("hyca.webui")


class HyCaFailure(RuntimeError):
    """Something inside HyCa went wrong: the call is re-run uncached, never the host's fault.
    ``output``: the call's own output, when the model already ran it unchanged (it is
    returned instead of running the model again)."""

    def __init__(self, message: str, output: Any = None) -> None:
        super().__init__(message)
        self.output = output


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    try:
        return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensors without storage (fake, meta)
        return False


class BlockMeter(ResidualMeter):
    """:class:`ResidualMeter` that also treats a block handing back its own input tensor
    (or a view of it) as writing in place: such a block is measured against a copy of its
    input from then on. Without a copy and without a version counter (inference tensors)
    such a call cannot be measured: its residual would be identically zero."""

    def residual(self, snapshot: Snapshot, out_stream: torch.Tensor) -> torch.Tensor:
        if _same_memory(out_stream, snapshot.stream):
            self._in_place[snapshot.key] = True  # from now on its input is copied before the call
            if snapshot.copy is None and snapshot.version is None:
                raise ResidualError(
                    f"block {snapshot.key!r} handed back its own input tensor, which it had not done before, and "
                    "no copy of the input was kept (inference tensors carry no version counter), so its "
                    "recorded residual would be identically zero")
        return super().residual(snapshot, out_stream)


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-5 * max(1.0, abs(a), abs(b))


def step_of(sigma: float, schedule: list[float], start: int = 0) -> tuple[int, float] | None:
    """Step ``k`` with ``s_k >= sigma > s_{k+1}`` and the fraction of the way from
    ``s_k`` to ``s_{k+1}``, the first from step ``start`` on; ``None`` when ``sigma`` lies
    outside the schedule (from ``start``)."""
    if not schedule or start == 0 and sigma > schedule[0] and not _close(sigma, schedule[0]):
        return None
    for k in range(start, len(schedule) - 1):
        high, low = schedule[k], schedule[k + 1]
        if _close(sigma, high):
            return k, 0.0
        if high > sigma > low and not _close(sigma, low):
            return k, (high - sigma) / (high - low)
    return None


@dataclass
class Branch:
    state: BranchState
    step: int = -1              # the pass step this branch last began
    decision: bool = True       # whether that step computes
    sigma: float | None = None  # the sigma of its last call


@dataclass
class Call:
    """What the blocks of one model call need to know."""

    branch: Branch
    computing: bool
    began: bool                       # the first call of its step: its residuals are recorded
    image_tokens: int | None = None   # length of the image stream, for concatenated streams
    forecast_pending: bool = True     # a forecast call: no block has added the forecast yet
    head_reached: bool = False        # output target: the head's input was recorded / replaced

    @property
    def record(self) -> bool:
        return self.computing and self.began


class PassSession:
    """State of one pass; created when the pass starts, dropped when it ends."""

    def __init__(self, engine: HybridCache, schedule: list[float] | Callable[[], list[float] | None] | None,
                 label: str = "pass", on_schedule: Callable[[list[float] | None], None] | None = None) -> None:
        """``on_schedule``: told the pass's sigma schedule once it is known (at the first
        call when ``schedule`` is a callable, else now); its errors are only logged."""
        self.engine = engine
        self.meter = BlockMeter()
        self._on_schedule = on_schedule
        # A callable is asked at the first call: A1111 creates its sampler after process_batch.
        self._schedule_source = schedule if callable(schedule) else None
        self.schedule = [float(s) for s in schedule] if schedule is not None and not callable(schedule) else None
        self.label = label
        self.failed = False
        self.stopped: str | None = None  # why HyCa stopped caching part-way
        #: images per unnamed call that batches cond then uncond (A1111): its switches are named
        #: by branch and image, as a named call's are; None when calls are not so known
        self.halves_of: int | None = None
        self.active: Call | None = None
        self._branches: dict[tuple, Branch] = {}
        self._per_key: dict[Any, int] = {}        # branches per (hint, shape), fixed after the first sigma
        self._ordinals: dict[Any, int] = {}       # calls per (hint, shape) at the current sigma
        self._sigma: float | None = None
        self._first_sigma: float | None = None
        self._fallback_steps: list[float] = []    # distinct sigmas seen, when there is no schedule
        self.calls_computed = 0
        self.calls_forecast = 0
        self.outputs = ModelOutputs(engine)
        if self._schedule_source is None:
            self._tell_schedule()

    def _tell_schedule(self) -> None:
        if self._on_schedule is not None:
            try:
                self._on_schedule(list(self.schedule) if self.schedule else None)
            except Exception as error:  # noqa: BLE001 - a message, never the pass's fault
                logger.info("HyCa: %s", error)

    # --- calls ------------------------------------------------------------------------

    @property
    def total_steps(self) -> int | None:
        return len(self.schedule) - 1 if self.schedule else None

    def locate(self, sigma: float, branch: Branch | None = None) -> tuple[int, float]:
        """The step (and fraction of it) of a call at ``sigma``. With the branch it comes from,
        searched from the branch's step on, so a schedule of its own that repeats a sigma
        (``s_{k+1} = s_k``) or revisits one counts each step: the branch's call at its step's
        sigma again is the next step when the schedule repeats that sigma there (a Heun
        step's call after its correction, at the same sigma, is not)."""
        if self.schedule is not None:
            start = max(branch.step, 0) if branch is not None else 0
            if (branch is not None and branch.sigma is not None and _close(sigma, branch.sigma)
                    and 0 <= branch.step < len(self.schedule) - 2
                    and _close(self.schedule[branch.step], sigma) and _close(self.schedule[branch.step + 1], sigma)):
                start = branch.step + 1
            found = step_of(sigma, self.schedule, start) or step_of(sigma, self.schedule)
            if found is not None:
                return found
            logger.warning("HyCa: sigma %.6g is not on this pass's schedule; counting steps by sigma instead", sigma)
            self.schedule = None
        if not self._fallback_steps or (sigma < self._fallback_steps[-1] and not _close(sigma, self._fallback_steps[-1])):
            self._fallback_steps.append(sigma)
        return len(self._fallback_steps) - 1, 0.0

    def _branch_for(self, sigma: float, key: Any, named: bool = False) -> Branch:
        if self._sigma is None or not _close(sigma, self._sigma):
            if self._sigma is not None and self._first_sigma is not None and _close(self._sigma, self._first_sigma):
                self._per_key.update({k: n for k, n in self._ordinals.items() if k not in self._per_key})
            self._sigma, self._ordinals = sigma, {}
            if self._first_sigma is None:
                self._first_sigma = sigma
        ordinal = self._ordinals.get(key, 0)
        self._ordinals[key] = ordinal + 1
        if named:  # by the conditioning's ids (ComfyUI): the same ids again is the same branch (at a sigma
            slot = 0  # the schedule repeats, its next step: :meth:`locate`)
        else:
            slot = ordinal % self._per_key[key] if key in self._per_key else ordinal
        branch_key = (key, slot)
        if branch_key not in self._branches:
            self._branches[branch_key] = Branch(self.engine.new_state())
        return self._branches[branch_key]

    def begin_call(self, x: torch.Tensor, sigma: Any, hint: Any = None, ids: tuple | None = None) -> Call | None:
        """Decide what this call's blocks do; ``None`` when HyCa stays out of it. ``ids``: the
        identity of the call's conditioning where the host gives one (ComfyUI's per-cond
        ``uuids``): calls of other conditionings are other branches, however many there were
        at the first sigma (a cond that starts part-way through the run gets its own)."""
        if self.failed:
            return None
        try:
            if self._schedule_source is not None:
                source, self._schedule_source = self._schedule_source, None
                found = source()
                self.schedule = [float(s) for s in found] if found else None
                self.engine.begin_run(RunSettings(steps=self.total_steps))
                self._tell_schedule()
            sigma = float(torch.as_tensor(sigma).flatten()[0])
            key = (hint, tuple(x.shape)) + ((ids,) if ids is not None else ())
            branch = self._branch_for(sigma, key, named=ids is not None)
            step, fraction = self.locate(sigma, branch)
            branch.sigma = sigma
            began = step > branch.step
            if began:  # steps are counted by sigma, not by calls
                branch.decision = self.engine.begin_step(branch.state, sigma, key, self.total_steps,
                                                         step)
                branch.step = step
            self.engine.call_position(branch.state, step + fraction if self.engine.positions == "step" else sigma)
            return Call(branch, computing=branch.decision, began=began)
        except Exception as error:  # noqa: BLE001 - HyCa must never break the host
            raise HyCaFailure(f"could not place the call on the schedule ({error})") from error

    @property
    def output_target(self) -> bool:
        """The engine forecasts the output head's input, not the blocks' residuals."""
        return self.engine.target == OUTPUT

    @property
    def model_target(self) -> bool:
        """The engine forecasts the model call's output (:mod:`.model_call`)."""
        return self.engine.target == MODEL_OUTPUT

    def end_call(self, call: Call) -> None:
        """Count the call; the call that began a step closes it in the engine (its
        residuals, recorded by the blocks, join the history)."""
        if self.output_target and not call.head_reached and (call.record or not call.computing):
            raise HyCaFailure("the output head did not run in this model call, so its input could not be "
                              f"{'recorded' if call.computing else 'replaced by the forecast'}")
        try:
            if call.computing:
                self.calls_computed += 1
            else:
                self.calls_forecast += 1
            if call.began:
                self.engine.end_step(call.branch.state)
        except Exception as error:  # noqa: BLE001
            raise HyCaFailure(f"could not close the step ({error})") from error

    def fail(self, why: str) -> None:
        if not self.failed:
            where = self.label if self.label.split()[-1].isdigit() else f"this {self.label}"  # "run 2", "this pass"
            logger.warning("HyCa: %s; sampling continues uncached for the rest of %s", why, where)
            print(f"[HyCa] {why}; sampling continues uncached for the rest of {where}")
            self.stopped = why
        self.failed = True
        self.active = None

    def run_call(self, x: torch.Tensor, sigma: Any, hint: Any, model_call: Callable[[], Any],
                 output: str = "denoised", ids: tuple | None = None) -> Any:
        """Run one model call under HyCa: ``x`` the call's input latent ``(batch, channels,
        *spatial)``, ``sigma`` its noise level (a float or one per row), ``output`` what the
        call returns (:data:`.model_call.OUTPUTS`; used by a model-output engine only). A HyCa
        failure re-runs the call uncached and leaves the rest of the pass uncached; the
        host's own exceptions (interrupts, out of memory) pass through untouched, with no
        call left active. ``ids``: see :meth:`begin_call`."""
        if self.failed or self.active is not None:  # nested: HyCa's wrapper ended up in a chain twice
            return model_call()
        try:
            call = self.begin_call(x, sigma, hint, ids)
        except HyCaFailure as error:
            self.fail(str(error))
            return model_call()
        self.active = call
        try:
            out = self._model_output(call, x, sigma, model_call, output) if self.model_target else model_call()
            self.end_call(call)
            return out
        except HyCaFailure as error:
            self.fail(str(error))
            return error.output if error.output is not None else model_call()
        finally:
            self.active = None

    def parts(self, call: Any) -> list[tuple[slice, Call]]:
        """The rows of a call's batch and the branch call each belongs to."""
        return [(slice(None), call)]

    def _model_output(self, call: Any, x: torch.Tensor, sigma: Any, model_call: Callable[[], Any],
                      output: str) -> Any:
        """Model-output target: the model runs when a branch of the call computes (the host's
        exceptions pass through); :class:`.model_call.ModelOutputs` records and forecasts."""
        parts = self.parts(call)
        try:
            self.outputs.check_width(x)
        except ValueError as error:  # before the model runs: the fallback runs it once
            raise HyCaFailure(str(error)) from error
        try:
            forecasts = self.outputs.forecasts(parts)
        except Exception as error:  # noqa: BLE001
            raise HyCaFailure(f"could not forecast the model output ({error})") from error
        # the model runs outside HyCa's error handling: the host's own exceptions (interrupts,
        # out of memory) pass through untouched
        needed = any(part.computing for _, part in parts) or any(f is None for f in forecasts.values())
        out = model_call() if needed else None
        try:
            return self.outputs.record_and_assemble(parts, x, sigma, out, output, forecasts)
        except Exception as error:  # noqa: BLE001 - the model's own output, when it ran, is still right
            raise HyCaFailure(f"could not apply the model-output profile ({error})", out) from error

    # --- blocks -----------------------------------------------------------------------

    def block(self, index: int, stream: torch.Tensor, run: Callable[[], Any],
              out_stream: Callable[[Any], torch.Tensor],
              passthrough: Callable[[torch.Tensor | None], Any]) -> Any:
        """Run block ``index`` (``run``) and record the residual of the stream that reaches
        the output (``out_stream(out)`` minus ``stream`` as it was before the call), or, on
        a forecast call, hand the inputs on (``passthrough(None)``), the first block that
        runs in the call with the forecast added to its stream (``passthrough(stream)``)."""
        call = self.active
        if call is None or self.model_target:  # model output: the call is run or forecast whole
            return run()
        if self.output_target:  # the head's input is recorded or forecast; the blocks run or hand on
            return run() if call.computing else passthrough(None)
        if call.computing:
            if not call.record:
                return run()
            try:
                snapshot = self.meter.before(index, stream)
            except Exception as error:  # noqa: BLE001
                raise HyCaFailure(f"could not keep block {index}'s input ({error})") from error
            out = run()
            try:
                residual = self.meter.residual(snapshot, out_stream(out))
                self.engine.record(call.branch.state, index, residual)
            except ResidualError as error:
                raise HyCaFailure(str(error)) from error
            except Exception as error:  # noqa: BLE001
                raise HyCaFailure(f"could not record block {index} ({error})") from error
            return out
        try:
            if call.forecast_pending:
                call.forecast_pending = False
                forecast = self.engine.predicted_residual(call.branch.state)
                return passthrough(stream + forecast.to(stream.dtype))
            return passthrough(None)
        except Exception as error:  # noqa: BLE001
            raise HyCaFailure(f"could not forecast block {index} ({error})") from error

    def head_input(self, x: torch.Tensor) -> torch.Tensor | None:
        """The output head is about to run on ``x`` (``(batch, tokens, hidden)``). Output
        target: on the call that begins a computed step, record ``x`` as block 0 and return
        None; on a forecast call return the engine's forecast (``x``'s shape, dtype and
        device) to run the head on instead. None also when no call is active or the engine
        forecasts residuals. Raises :class:`HyCaFailure` when recording or forecasting fails."""
        call = self.active
        if call is None or not self.output_target:
            return None
        call.head_reached = True
        if call.computing:
            if call.record:
                try:
                    self.engine.record(call.branch.state, 0, x)
                except Exception as error:  # noqa: BLE001
                    raise HyCaFailure(f"could not record the output head's input ({error})") from error
            return None
        try:
            forecast = self.engine.predicted_residual(call.branch.state)
        except Exception as error:  # noqa: BLE001
            raise HyCaFailure(f"could not forecast the output head's input ({error})") from error
        if tuple(forecast.shape) != tuple(x.shape):
            raise HyCaFailure(f"the output head's input has shape {tuple(x.shape)}, its forecast "
                              f"{tuple(forecast.shape)}")
        return forecast.to(device=x.device, dtype=x.dtype)

    # --- results ----------------------------------------------------------------------

    def stats(self) -> PassStats:
        steps = RunStats()
        switches: list[tuple[str, Switch]] = []
        notes: list[str] = []
        off_settings: OffSettings | None = None
        for key, branch in self._branches.items():
            steps.computed = max(steps.computed, branch.state.stats.computed)
            steps.forecast = max(steps.forecast, branch.state.stats.forecast)
            switches += [of_image(key, branch.state.items, d, self.halves_of) for d in branch.state.stats.switches]
            notes += [n for n in branch.state.stats.notes if n not in notes]
            off_settings = off_settings or branch.state.stats.off_settings
        return PassStats(steps, self.calls_computed, self.calls_forecast, switches, notes, off_settings, self.stopped)
