"""All-time checking: every computed step is a free test of the forecasts.

At a computed step the engine has, before the step's residuals join the history, both the
history a skip step would have forecast from and the true summed residuals ``A_s`` of each
solver group ``s``. So, with no extra model call, it can measure what each group's solver
*would* have forecast for this step, and what a lower order would have:

    err(solver) = || sum_j w_j(solver) * A_s(t_j) - A_s(now) ||^2

A group whose solver did worse than a lower order (``taylor-1``, then ``reuse``) at
``STRIKES`` (two) judged checks in a row is switched to the one that did best at the
last of them; the profile's own solver stays a candidate, and wins its group back the
same way. Checks early in a run can go against a solver that wins every later one:
taylor-1 at 50 steps, shift 3, N=8 had 5.7x reuse's error at step 18 and 0.1x at steps
26-42; at N=3 it lost the checks at steps 8 and 11 and won all later ones. Demoting at
the first loss cost 4.7 dB (28 steps, shift 3, N=6, where taylor-1 lost one check by 2%);
demoting for good after two cost 7.4 dB at 50 steps, shift 3, N=3. With the way back, the
group returns to its solver once it wins again.

A check only judges a solver when the forecast it replays looks like the forecasts still
to come (:func:`steady`): the target and the newest history points ``N`` steps apart. Right after
warm-up the history is one step apart and the target ``N`` ahead, where extrapolation
misses by far more than reuse (20-70x on the reference model) though it beats reuse by
5-50x once the history is ``N`` apart; judging there demoted good solvers for good
(measured: -5 dB at 50 steps, N=4). Open-loop choosing (eq. 5)
scores forecasts on a fully computed trajectory; on the cached trajectory, with guidance
and at settings the profile was not chosen for, a high order can extrapolate noise
(issue 11). The check measures on the trajectory the run is actually on.

Guidance. Each branch's own errors do not show what guidance does: the guided output is
``u + g (c - u)``, and forecasts whose errors on ``c`` and on ``u`` differ get their
difference multiplied by ``g``. On the reference model, taylor-1 forecast each branch 2-10x
better than reuse at every steady check of a 28-step run with guidance 2.5, yet its image
was 9 dB worse; on ``c - u`` it was 1.8-2.1x *worse* at every one of them. So when two
branches check the same step, the second also compares the candidates on the difference of
the two branches' errors (through random sketches of the error tensors, kept from the first
branch: ``SKETCH_ROWS`` x ``dim`` per candidate, not the tensors), a loss there counts as a
strike, and both branches share the outcome. Measured on that run: 22.2 -> 29.4 dB
(reuse: 31.1). A batched call (both branches in one batch) is one branch here.

Deterministic: the errors are sums over the same tensors in a fixed order, and, under
context parallelism, summed over every rank (``reduce``) before anything is decided, so all
ranks switch alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..math.solvers import get_solver, pool
from .forecast import forecast

#: The ladder of lower orders a solver can be demoted along, lowest last.
LADDER = ("taylor-1", "reuse")
#: Judged checks in a row a solver must lose before its group is switched.
STRIKES = 2
#: Forecasts within this relative squared error of the truth are not judged: exact
#: solvers differ from each other by float rounding, which must not switch them.
TOLERANCE = 1e-6
#: Rows of the random sketch that compares guidance branches (relative error of a squared
#: norm about sqrt(2 / rows): 25%, enough for the 2x effects it has to see).
SKETCH_ROWS = 32


@dataclass(frozen=True)
class Switch:
    """At computed step ``step``, one solver group switched from ``solver`` to ``to``."""

    step: int
    solver: str
    to: str

    def describe(self) -> str:
        return f"{self.solver} -> {self.to} at step {self.step}"


def candidates(original: int, active: int) -> list[int]:
    """What a check compares for one slot: the solver it forecasts with now (first), the
    profile's own solver (when the guard has switched away from it) and that solver's lower
    orders."""
    return [active, *(s for s in (original, *lower_orders(original)) if s != active)]


def lower_orders(solver: int) -> list[int]:
    """Pool indices of the lower-order solvers ``solver`` may be demoted to, best first."""
    names = [s.name for s in pool()]
    ladder = [names.index(get_solver(n).name) for n in LADDER]
    return ladder[ladder.index(solver) + 1:] if solver in ladder else ladder


def steady(steps: Sequence[int], interval: int) -> bool:
    """Whether a check at step ``steps[0]``, with history at steps ``steps[1:]`` (newest
    first), replays a steady-state forecast: the target and the two newest history values
    ``interval`` steps apart, as every forecast after the first cycle is. (Older values of
    a deep solver's window may still be warm-up steps one apart; they weigh on its
    higher-order terms only, and waiting for them would leave a three-point solver unjudged
    until the fourth cycle.)"""
    window = list(steps[:3])
    return len(window) == 3 and all(a - b == interval for a, b in zip(window, window[1:]))


def first_switch(plan: Sequence[bool], interval: int) -> int | None:
    """The earliest step at which the guard can switch a solver group on a run computing
    the steps ``plan`` marks: its second judged (:func:`steady`) check, since a switch
    takes ``STRIKES`` losses in a row. ``None``: the run gives it fewer checks than that,
    so the guard cannot change anything in it."""
    computed = [step for step, runs in enumerate(plan) if runs]
    judged = [step for i, step in enumerate(computed) if steady(computed[i::-1], interval)]
    return judged[STRIKES - 1] if len(judged) >= STRIKES else None


@dataclass
class Check:
    """What one branch measured at one computed step.

    ``table[s]``: pool indices of the candidates for slot ``s`` (its solver first, then the
    lower orders; only the solver when the slot was not judged). ``errors[s, c]``: squared
    error of candidate ``c`` (summed over ranks); ``energy[s]``: the squared norm of the
    slot's true value. ``sketches[s]``: ``(candidates, rows, dim)``
    random projections of each candidate's error tensor over its batch and token axes
    (summed over ranks), for comparing branches; None for slots not judged."""

    step: int
    table: list[list[int]]
    errors: torch.Tensor
    energy: torch.Tensor
    sketches: list[torch.Tensor | None]

    @property
    def judged(self) -> bool:
        return any(len(row) > 1 for row in self.table)


def _projection(count: int, rows: int, seed: int, like: torch.Tensor) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, count, generator=generator) / rows ** 0.5).to(like.device)


def measure(histories: Sequence[Sequence[torch.Tensor]], positions: Sequence[float], target: float,
            actuals: Sequence[torch.Tensor], active: Sequence[int], judged: Sequence[bool], step: int,
            reduce: Callable[[torch.Tensor], torch.Tensor] | None = None, rows: int = 0,
            seed: int = 0, original: Sequence[int] | None = None) -> Check:
    """Forecast this step with each judged slot's :func:`candidates` and measure the errors
    (and, with ``rows`` > 0, sketch them). ``histories[s]``: slot ``s``'s cached values
    (newest first), ``positions`` theirs; ``actuals[s]``: its true value at ``target``,
    just computed; ``active[s]``: the pool index it forecasts with now; ``original[s]``:
    the profile's solver for it (default: ``active``); ``judged[s]``: whether this check
    may judge slot ``s`` (:func:`steady`). ``reduce`` sums over ranks. Under context
    parallelism each rank's error tensors are its token shard of ``(batch, tokens, dim)``: a
    ``reduce`` with ``projection(shape, rows, seed, like)`` gives each rank its columns of
    the projection one process would draw for the whole sequence, so the summed sketches
    (and the decisions) are one process's; without it, ``seed`` must differ between ranks
    (independent sketches of the shards add up to an unbiased sketch of the whole)."""
    original = list(active) if original is None else list(original)
    table = [candidates(original[s], active[s]) if judged[s] else [active[s]] for s in range(len(active))]
    width = max((len(row) for row in table), default=1)
    errors = torch.zeros(len(table), width + 1, dtype=torch.float64)  # the last column: energy
    sketches: list[torch.Tensor | None] = [None] * len(table)
    if not any(len(row) > 1 for row in table):  # nothing to judge, no reduce: that depends on steps only
        return Check(step, table, errors[:, :-1], errors[:, -1], sketches)
    measured, projection = [], None
    for s, row in enumerate(table):
        if len(row) == 1:
            measured.append(torch.zeros(width + 1, dtype=torch.float64, device=actuals[s].device))
            continue
        misses = [predict(histories[s], positions, target, solver) - actuals[s].float() for solver in row]
        values = [m.square().sum(dtype=torch.float64) for m in misses]
        energy = actuals[s].float().square().sum(dtype=torch.float64)
        measured.append(torch.stack(values + [values[0].new_zeros(())] * (width - len(row)) + [energy]))
        if rows:
            flat = torch.stack([m.reshape(-1, m.shape[-1]) for m in misses])  # (candidates, n, dim)
            if projection is None or projection.shape[1] != flat.shape[1]:
                shard = getattr(reduce, "projection", None)  # context parallelism: this rank's columns
                projection = (_projection(flat.shape[1], rows, seed, flat) if shard is None
                              else shard(tuple(misses[0].shape), rows, seed, flat))
            sketches[s] = (projection @ flat).double().cpu()
    errors = torch.stack(measured).cpu()  # on the CPU: ``reduce`` moves it if it must
    if reduce is not None:
        errors = reduce(errors)
        sketches = [None if k is None else reduce(k) for k in sketches]
    return Check(step, table, errors[:, :-1], errors[:, -1], sketches)


def predict(history: Sequence[torch.Tensor], positions: Sequence[float], target: float, solver: int) -> torch.Tensor:
    """What ``solver`` forecasts for ``target`` from ``history`` (newest first), falling back
    with a short history exactly as the engine does at a skip step; float32."""
    count = min(len(history), pool()[solver].history)
    weights = torch.as_tensor(pool()[solver].weights(list(positions[:count]), target)).unsqueeze(1)
    return forecast(list(history)[:len(weights)], weights)


def _verdicts(table: list[list[int]], errors: torch.Tensor, energy: torch.Tensor) -> dict[int, int | None]:
    out: dict[int, int | None] = {}
    for s, row in enumerate(table):
        if len(row) == 1:
            continue
        best = min(range(1, len(row)), key=lambda c: float(errors[s, c]))
        lost = float(errors[s, best]) < float(errors[s, 0]) and float(errors[s, 0]) > TOLERANCE * float(energy[s])
        out[s] = row[best] if lost else None
    return out


def own_verdicts(check: Check) -> dict[int, int | None]:
    """Per judged slot, the candidate that forecast this step better than the slot's
    current solver on this branch, or None when the current one did best (or was within
    ``TOLERANCE`` of the truth)."""
    return _verdicts(check.table, check.errors, check.energy)


def difference_verdicts(check: Check, other: Check) -> dict[int, int | None]:
    """The same on the difference of two guidance branches at one step (``cond - uncond``,
    which guidance multiplies by its scale): per slot judged on both with the same
    candidates, the candidate whose forecast of the difference was better."""
    table = [row if len(row) > 1 and row == theirs and k is not None and j is not None and k.shape == j.shape
             else row[:1] for row, theirs, k, j in zip(check.table, other.table, check.sketches, other.sketches)]
    width = check.errors.shape[1]
    errors = torch.zeros(len(table), width, dtype=torch.float64)
    for s, row in enumerate(table):
        if len(row) > 1:
            errors[s, :len(row)] = (check.sketches[s] - other.sketches[s]).square().sum(dim=(1, 2))
    return _verdicts(table, errors, check.energy + other.energy)


def check_solvers(histories: Sequence[Sequence[torch.Tensor]], positions: Sequence[float], target: float,
                  actuals: Sequence[torch.Tensor], active: Sequence[int],
                  reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
                  judged: Sequence[bool] | None = None) -> dict[int, int | None]:
    """One branch's check alone: :func:`measure` then :func:`own_verdicts`."""
    judged = [True] * len(active) if judged is None else list(judged)
    return own_verdicts(measure(histories, positions, target, actuals, active, judged, 0, reduce))
