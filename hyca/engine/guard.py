"""All-time checking: every computed step is a free test of the forecasts.

At a computed step the engine has, before the step's residuals join the history, both the
history a skip step would have forecast from and the true summed residuals ``A_s`` of each
solver group ``s``. So, with no extra model call, it can measure what each group's solver
*would* have forecast for this step, and what a lower order would have:

    err(solver) = || sum_j w_j(solver) * A_s(t_j) - A_s(now) ||^2

A group whose solver did worse than a lower order (``taylor-1``, then ``reuse``) at
``STRIKES`` (two) judged checks in a row is switched to the one that did best at the
last of them; the profile's own solver stays a candidate, and wins its group back the
same way. Checks early in a run can go against a solver that wins every later one, so a
single loss does not demote, and with the way back the group returns to its solver once it
wins again (the measurements behind both: docs/engine.md).

A check only judges a solver when the forecast it replays looks like the forecasts still
to come (:func:`steady`): the target and the newest history points ``N`` steps apart. Right after
warm-up the history is one step apart and the target ``N`` ahead, where extrapolation
misses by far more than reuse though it beats reuse by far once the history is ``N``
apart; judging there demoted good solvers for good (docs/engine.md). Open-loop choosing (eq. 5)
scores forecasts on a fully computed trajectory; on the cached trajectory, with guidance
and at settings the profile was not chosen for, a high order can extrapolate noise
(issue 11). The check measures on the trajectory the run is actually on.

Guidance. Each branch's own errors do not show what guidance does: the guided output is
``u + g (c - u)``, and forecasts whose errors on ``c`` and on ``u`` differ get their
difference multiplied by ``g``: a solver can forecast each branch better than reuse at
every check and still give a worse image, being worse on ``c - u`` (docs/engine.md). So when two
branches check the same step, the second also compares the candidates on the difference of
the two branches' errors (through random sketches of the error tensors, kept from the first
branch: ``SKETCH_ROWS`` x ``dim`` per candidate, not the tensors), a loss there counts as a
strike, and both branches share the outcome. A batched call (both branches in one batch)
is one branch here.

Per image. Every decision is made per batch item (issue 18): errors, strikes and the solver
in use are kept per (group, item), and forecasts weigh each item with its own solver, so
an image's result does not depend on its batch-mates. In a batched-guidance call
(``[uncond..., cond...]`` in one batch: SD3, Sana, Z-Image, HiDream) item ``i`` and item
``i + B/2`` are one image's two halves; they are decided per item too, each half on its
own errors (the engine cannot see which half is which, and a half's decision depends only
on that half, as it would for the image alone). Between separate guidance branches item
``i`` of one pairs with item ``i`` of the other.

Deterministic: the errors are sums over the same tensors in a fixed order, and, under
context parallelism, summed over every rank (``reduce``) before anything is decided, so all
ranks switch alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..math.solvers import get_solver, pool
from .forecast import forecast, solver_weights

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
    """At computed step ``step``, one solver group switched from ``solver`` to ``to`` for
    batch item ``item``."""

    step: int
    solver: str
    to: str
    #: the batch item whose group switched; None: every item (a batch of one, or a switch
    #: made before the batch was seen)
    item: int | None = None

    def describe(self) -> str:
        image = "" if self.item is None else f" (image {self.item + 1})"
        return f"{self.solver} -> {self.to} at step {self.step}{image}"


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
    """What one branch measured at one computed step, per (slot, batch item).

    Rows are slot-major: row ``r`` is slot ``r // items``, item ``r % items``. ``table[r]``:
    pool indices of that row's candidates (its solver first, then the lower orders; only
    the solver when the slot was not judged). ``errors[r, c]``: squared error of candidate
    ``c`` on that item (summed over ranks); ``energy[r]``: the item's squared norm of the
    slot's true value. ``union[s]``: every candidate of slot ``s`` over its items, in the
    order of ``sketches[s]``: ``(len(union[s]), items, rows, dim)`` random projections of
    each candidate's error over each item's token axes (summed over ranks), for comparing
    branches; None for slots not judged or not sketched."""

    step: int
    table: list[list[int]]
    errors: torch.Tensor
    energy: torch.Tensor
    sketches: list[torch.Tensor | None]
    union: list[list[int]] = field(default_factory=list)
    items: int = 1

    @property
    def judged(self) -> bool:
        return any(len(row) > 1 for row in self.table)


def _projection(count: int, rows: int, seed: int, like: torch.Tensor) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, count, generator=generator) / rows ** 0.5).to(like.device)


def measure(histories: Sequence[Sequence[torch.Tensor]], positions: Sequence[float], target: float,
            actuals: Sequence[torch.Tensor], active: Sequence[int], judged: Sequence[bool], step: int,
            reduce: Callable[[torch.Tensor], torch.Tensor] | None = None, rows: int = 0,
            seed: int = 0, original: Sequence[int] | None = None, items: int = 1) -> Check:
    """Forecast this step with each judged slot's :func:`candidates` and measure the errors
    of every batch item apart (and, with ``rows`` > 0, sketch them). ``histories[s]``: slot
    ``s``'s cached values ``(batch, ..., dim)`` (newest first), ``positions`` theirs;
    ``actuals[s]``: its true value at ``target``, just computed; ``active[s * items + i]``:
    the pool index item ``i`` of slot ``s`` forecasts with now; ``original[s]``: the
    profile's solver for slot ``s`` (default: ``active`` of item 0); ``judged[s]``: whether
    this check may judge slot ``s`` (:func:`steady`). ``items``: the batch size, or 1 when
    every item shares one solver entry. ``reduce`` sums over ranks.

    Sketches project each item's tokens with one ``(rows, tokens)`` matrix, the same for
    every item, so an item's sketch does not depend on its batch-mates. Under context
    parallelism each rank's error tensors are its token shard of ``(batch, tokens, dim)``: a
    ``reduce`` with ``projection(shape, rows, seed, like)`` (asked for a batch of one) gives
    each rank its columns of the projection one process would draw for the whole sequence,
    so the summed sketches (and the decisions) are one process's; without it, ``seed`` must
    differ between ranks (independent sketches of the shards add up to an unbiased sketch of
    the whole)."""
    slots = len(histories)
    original = [active[s * items] for s in range(slots)] if original is None else list(original)
    table = [candidates(original[s], active[s * items + i]) if judged[s] else [active[s * items + i]]
             for s in range(slots) for i in range(items)]
    width = max((len(row) for row in table), default=1)
    sketches: list[torch.Tensor | None] = [None] * slots
    union: list[list[int]] = [[] for _ in range(slots)]
    if not any(len(row) > 1 for row in table):  # nothing to judge, no reduce: that depends on steps only
        errors = torch.zeros(len(table), width + 1, dtype=torch.float64)
        return Check(step, table, errors[:, :-1], errors[:, -1], sketches, union, items)
    measured, projection = [], None
    for s in range(slots):
        own = table[s * items:(s + 1) * items]
        if len(own[0]) == 1:
            measured.append(torch.zeros(items, width + 1, dtype=torch.float64, device=actuals[s].device))
            continue
        union[s] = list(dict.fromkeys(c for row in own for c in row))
        actual = actuals[s].float()
        misses = [predict(histories[s], positions, target, solver) - actual for solver in union[s]]
        axes = tuple(range(1, actual.dim()))
        per_item = torch.stack([m.square().sum(dim=axes, dtype=torch.float64) for m in misses])  # (union, batch)
        energy = actual.square().sum(dim=tuple(range(1, actual.dim())), dtype=torch.float64)
        if per_item.shape[1] != items:  # one solver entry for a batch: the batch's sums
            per_item, energy = per_item.sum(dim=1, keepdim=True), energy.sum().view(1)
        # each item's candidates, picked out of the union (the last index is a zero: padding)
        padded = torch.cat([per_item, per_item.new_zeros(1, items)])
        index = torch.tensor([[union[s].index(c) for c in row] + [len(union[s])] * (width - len(row))
                              for row in own], device=padded.device)
        measured.append(torch.cat([padded.T.gather(1, index), energy.unsqueeze(1)], dim=1))
        if rows:
            flat = torch.stack([m.reshape(m.shape[0], -1, m.shape[-1]) for m in misses])  # (union, batch, tokens, dim)
            if projection is None or projection.shape[1] != flat.shape[2]:
                shard = getattr(reduce, "projection", None)  # context parallelism: this rank's columns
                projection = (_projection(flat.shape[2], rows, seed, flat) if shard is None
                              else shard((1, *misses[0].shape[1:]), rows, seed, flat))
            sketches[s] = (projection @ flat).double().cpu()
    errors = torch.cat(measured).cpu()  # on the CPU: ``reduce`` moves it if it must
    if reduce is not None:
        errors = reduce(errors)
        sketches = [None if k is None else reduce(k.reshape(k.shape[0], -1, k.shape[-1])).reshape(k.shape)
                    for k in sketches]
    return Check(step, table, errors[:, :-1], errors[:, -1], sketches, union, items)


def predict(history: Sequence[torch.Tensor], positions: Sequence[float], target: float, solver: int) -> torch.Tensor:
    """What ``solver`` forecasts for ``target`` from ``history`` (newest first), falling back
    with a short history exactly as the engine does at a skip step; float32."""
    count = min(len(history), pool()[solver].history)
    weights = solver_weights(solver, tuple(float(p) for p in positions[:count]), float(target))
    return forecast(list(history)[:len(weights)], weights)


def _verdicts(table: list[list[int]], errors: torch.Tensor, energy: torch.Tensor) -> dict[int, int | None]:
    out: dict[int, int | None] = {}
    for r, row in enumerate(table):
        if len(row) == 1:
            continue
        best = min(range(1, len(row)), key=lambda c: float(errors[r, c]))
        lost = float(errors[r, best]) < float(errors[r, 0]) and float(errors[r, 0]) > TOLERANCE * float(energy[r])
        out[r] = row[best] if lost else None
    return out


def own_verdicts(check: Check) -> dict[int, int | None]:
    """Per judged row (slot, item), the candidate that forecast this step better than the
    row's current solver on this branch, or None when the current one did best (or was
    within ``TOLERANCE`` of the truth)."""
    return _verdicts(check.table, check.errors, check.energy)


def difference_verdicts(check: Check, other: Check) -> dict[int, int | None]:
    """The same on the difference of two guidance branches at one step (``cond - uncond``,
    which guidance multiplies by its scale): per row judged on both with the same
    candidates, the candidate whose forecast of the difference was better. Item ``i`` of
    one branch pairs with item ``i`` of the other (one image's two halves: in separate
    calls, the hosts give both branches the same batch order)."""
    def sketch(c: Check, r: int) -> torch.Tensor | None:
        k = c.sketches[r // c.items]
        return None if k is None else k[:, r % c.items]

    table = []
    for r, (row, theirs) in enumerate(zip(check.table, other.table)):
        k, j = sketch(check, r), sketch(other, r)
        same = check.items == other.items and k is not None and j is not None and k.shape == j.shape
        table.append(row if len(row) > 1 and row == theirs and same else row[:1])
    errors = torch.zeros(len(table), check.errors.shape[1], dtype=torch.float64)
    for r, row in enumerate(table):
        if len(row) > 1:
            s = r // check.items
            mine, yours = sketch(check, r), sketch(other, r)
            for c, solver in enumerate(row):
                errors[r, c] = (mine[check.union[s].index(solver)] - yours[other.union[s].index(solver)]).square().sum()
    return _verdicts(table, errors, check.energy + other.energy)
