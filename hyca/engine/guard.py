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
is one branch here. Only a run of two branches pairs them: with a third (a conditioning
that joins part-way, a third guidance term) which two are one image's ``c`` and ``u`` is
not known, and pairing by call order would make the decisions depend on it (ComfyUI calls
its chunks in another order batched than one by one); each branch is then judged alone.

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
from functools import lru_cache
from typing import Callable, Sequence

import torch

from ..math.solvers import get_solver, pool
from .forecast import solver_weights

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
#: A pseudo-solver index for :func:`predict_all` whose forecast is zero.
ZERO = -1


#: ``Switch.by`` of the off-settings path's starting switches (the guard's own: ``"guard"``).
ROBUST_START = "robust start"


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
    #: who switched it: the guard's check, or the off-settings path's start
    #: (:meth:`hyca.engine.cache.HybridCache.start_from`, before the first forecast)
    by: str = "guard"

    def describe(self) -> str:
        """``taylor-2 -> taylor-1 at step 14 (image 2)``; the off-settings path's starting
        switches say so (``... at step 1 (robust start)``): no check decided them
        (:func:`describe_switches` of this one switch)."""
        return describe_switches([(None, self)])


def describe_switches(switches: Sequence[tuple[str | None, Switch]], branches: bool = False) -> str:
    """Switches as one line, each distinct switch once with the images it happened in:
    ``taylor-2 -> reuse at step 14 (images 1-3, 5), reuse -> taylor-1 at step 22 (image 2)``.
    Each switch comes with its guidance branch (or None); ``branches``: name it too
    (``(images 1-8, uncond)``), for a run with several."""
    groups: dict[tuple, list[int]] = {}
    for branch, switch in switches:
        key = (switch.solver, switch.to, switch.step, switch.by, branch if branches else None)
        groups.setdefault(key, [])
        if switch.item is not None:
            groups[key].append(switch.item + 1)
    said = []
    for (solver, to, step, by, branch), images in groups.items():
        where = [_images(sorted(set(images)))] if images else []
        where += [by] if by != "guard" else []
        where += [branch] if branch is not None else []
        said.append(f"{solver} -> {to} at step {step}" + (f" ({', '.join(where)})" if where else ""))
    return ", ".join(said)


def _images(numbers: list[int]) -> str:
    """``image 3``, ``images 1-4, 7``: sorted image numbers with runs of three or more as ranges."""
    if len(numbers) == 1:
        return f"image {numbers[0]}"
    parts, start = [], 0
    for i in range(1, len(numbers) + 1):
        if i == len(numbers) or numbers[i] != numbers[i - 1] + 1:
            run = numbers[start:i]
            parts.append(f"{run[0]}-{run[-1]}" if len(run) > 2 else ", ".join(map(str, run)))
            start = i
    return "images " + ", ".join(parts)


def candidates(original: int, active: int) -> list[int]:
    """What a check compares for one slot: the solver it forecasts with now (first), the
    profile's own solver (when the guard has switched away from it) and that solver's lower
    orders."""
    return list(_candidates(original, active))


@lru_cache(maxsize=None)
def _candidates(original: int, active: int) -> tuple[int, ...]:  # (the pool is fixed: a few pairs in all)
    return (active, *(s for s in (original, *lower_orders(original)) if s != active))


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
    """``(rows, count)`` Gaussian sketch matrix, drawn on the CPU from ``seed``, on ``like``'s
    device; read-only (every check of a run asks for the same one: drawn once)."""
    return _drawn(count, rows, seed, like.device)


@lru_cache(maxsize=16)
def _drawn(count: int, rows: int, seed: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, count, generator=generator) / rows ** 0.5).to(device)


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
    for s in range(slots):
        own = table[s * items:(s + 1) * items]
        if len(own[0]) > 1:
            union[s] = list(dict.fromkeys(c for row in own for c in row))
    misses, per_item = _misses(histories, positions, target, actuals, union)
    sums, offsets, projection = [], [], None
    for s in range(slots):
        offsets.append(sum(len(k) for k in sums))
        if s not in misses:
            continue
        found = per_item[s]
        sums.append(found.sum(dim=1, keepdim=True) if found.shape[1] != items else found)  # one entry for a batch
        if rows:
            miss = misses[s]
            flat = miss[:-1].reshape(miss.shape[0] - 1, miss.shape[1], -1, miss.shape[-1])
            if projection is None or projection.shape[1] != flat.shape[2]:  # (union, batch, tokens, dim)
                shard = getattr(reduce, "projection", None)  # context parallelism: this rank's columns
                projection = (_projection(flat.shape[2], rows, seed, flat) if shard is None
                              else shard((1, *miss.shape[2:]), rows, seed, flat))
            sketches[s] = (projection @ flat).double().cpu()
    # each (slot, item) row's candidates and energy, picked out of every slot's sums at once;
    # rows of slots not judged (and padding) point at a final row of zeros
    stacked = torch.cat([*sums, sums[0].new_zeros(1, items)])
    index = _row_index(tuple(tuple(row) for row in table), tuple(tuple(u) for u in union), tuple(offsets),
                       width, items, stacked.shape[0] - 1)
    errors = stacked[index.to(stacked.device), _item_columns(len(table), width + 1, items).to(stacked.device)]
    errors = errors.cpu()  # on the CPU: ``reduce`` moves it if it must
    if reduce is not None:
        errors = reduce(errors)
        sketches = [None if k is None else reduce(k.reshape(k.shape[0], -1, k.shape[-1])).reshape(k.shape)
                    for k in sketches]
    return Check(step, table, errors[:, :-1], errors[:, -1], sketches, union, items)


#: Above this many bytes of float32 misses, :func:`_misses` goes slot by slot (the stacked
#: form holds every slot's candidates at once: too much at a large model's resolution).
STACKED_BYTES = 64 * 2 ** 20


def _misses(histories: Sequence[Sequence[torch.Tensor]], positions: Sequence[float], target: float,
            actuals: Sequence[torch.Tensor], union: list[list[int]],
            ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """For each slot ``s`` with candidates ``union[s]``: the misses ``(candidates + 1, batch,
    ...)`` of its candidates' forecasts and, last, of a forecast of zero (its miss is the
    truth, its squared sum the energy), and their squared sums per item ``(candidates + 1,
    batch)``, float64. Small tensors (a small model's) go through one stacked pass for every
    slot, large ones slot by slot: the same float operations per element in the same order
    either way (zero weights add exact zeros), so both give the same bits; stacking only
    saves per-operation overhead, which dominates at small sizes."""
    judged = [s for s in range(len(histories)) if union[s]]
    if not judged:
        return {}, {}
    like = actuals[judged[0]]
    width = max(len(union[s]) for s in judged) + 1
    terms = max(len(histories[s]) for s in judged)
    stackable = all(actuals[s].shape == like.shape for s in judged)
    if not stackable or 4 * like.numel() * len(judged) * (width + terms + 1) > STACKED_BYTES:
        misses = {s: predict_all(histories[s], positions, target, (*union[s], ZERO)).sub_(actuals[s].float())
                  for s in judged}
        return misses, {s: m.square().sum(dim=tuple(range(2, m.dim())), dtype=torch.float64) for s, m in misses.items()}
    columns = [_weight_columns((*union[s], ZERO), tuple(float(p) for p in positions[:len(histories[s])]),
                               float(target)) for s in judged]
    if len(judged) == 1 and columns[0].shape == (terms, width):  # one slot: its columns are the weights
        weights = columns[0]
    else:
        weights = torch.zeros(terms, len(judged), width)
        for i, found in enumerate(columns):
            weights[:found.shape[0], i, :found.shape[1]] = found
    weights = weights.to(like.device).reshape(terms, len(judged), width, *[1] * like.dim())
    # for a slot whose history is shorter: weighed 0
    zero = torch.zeros_like(histories[judged[0]][0]) if any(len(histories[s]) < terms for s in judged) else None
    out = torch.zeros((len(judged), width, *like.shape), device=like.device, dtype=torch.float32)
    for j in range(terms):  # (one slot: its value as it is, where stacking one tensor would copy it)
        value = (histories[judged[0]][j].unsqueeze(0) if len(judged) == 1 else
                 torch.stack([histories[s][j] if j < len(histories[s]) else zero for s in judged]))
        out.addcmul_(value.unsqueeze(1), weights[j])
    truth = actuals[judged[0]].float().unsqueeze(0) if len(judged) == 1 else \
        torch.stack([actuals[s].float() for s in judged])
    out.sub_(truth.unsqueeze(1))
    sums = out.square().sum(dim=tuple(range(3, out.dim())), dtype=torch.float64)  # (slots, width, batch)
    return ({s: out[i, :len(union[s]) + 1] for i, s in enumerate(judged)},
            {s: sums[i, :len(union[s]) + 1] for i, s in enumerate(judged)})


@lru_cache(maxsize=1024)
def _row_index(table: tuple[tuple[int, ...], ...], union: tuple[tuple[int, ...], ...], offsets: tuple[int, ...],
               width: int, items: int, zero: int) -> torch.Tensor:
    """``(rows, width + 1)`` rows of the stacked per-slot sums :func:`measure` reads for each
    (slot, item) row: its candidates (padded with ``zero``, a row of zeros), then its energy."""
    index = []
    for r, row in enumerate(table):
        s = r // items
        if len(row) == 1:
            index.append([zero] * (width + 1))
            continue
        found = [offsets[s] + union[s].index(c) for c in row]
        index.append(found + [zero] * (width - len(row)) + [offsets[s] + len(union[s])])
    return torch.tensor(index)


@lru_cache(maxsize=64)
def _item_columns(rows: int, width: int, items: int) -> torch.Tensor:
    """``(rows, width)``: the batch item of each row, repeated along it."""
    return (torch.arange(rows) % items).unsqueeze(1).expand(rows, width)


def predict_all(history: Sequence[torch.Tensor], positions: Sequence[float], target: float,
                solvers: Sequence[int]) -> torch.Tensor:
    """``(len(solvers), *history[0].shape)``: what each solver forecasts for ``target`` from
    ``history`` (newest first), falling back with a short history as the engine does at a
    skip step; float32. One pass over the history: each cached value is read once and
    added, weighted, to every candidate's forecast (a candidate using fewer values weighs the
    rest 0; :data:`ZERO` forecasts zero). Element for element the same float operations in
    the same order as the engine's kernel (:func:`~hyca.engine.forecast.forecast`: the sum
    starts from zeros and adds ``value * weight`` newest first), so the two agree bit for
    bit on finite values; the check's cost grows with the history, not the candidates."""
    columns = _weight_columns(tuple(solvers), tuple(float(p) for p in positions[:len(history)]), float(target))
    like = history[0]
    weights = columns.to(device=like.device, dtype=torch.float32)
    weights = weights.reshape(*weights.shape, *[1] * like.dim())  # (terms, candidates, 1, ...)
    out = torch.zeros((len(solvers), *like.shape), device=like.device, dtype=torch.float32)
    for value, w in zip(history, weights):
        out.addcmul_(value.unsqueeze(0), w)
    return out


@lru_cache(maxsize=4096)
def _weight_columns(solvers: tuple[int, ...], positions: tuple[float, ...], target: float) -> torch.Tensor:
    """``(terms, candidates)``: :func:`solver_weights` of each solver side by side, zero-padded
    to the longest; cached (every check of a run on one schedule asks for the same few)."""
    per_solver = [[0.0] if s == ZERO else solver_weights(s, positions[:pool()[s].history], target)[:, 0].tolist()
                  for s in solvers]
    terms = max(len(w) for w in per_solver)
    return torch.tensor([[w[j] if j < len(w) else 0.0 for w in per_solver] for j in range(terms)])


def _verdicts(table: list[list[int]], errors: torch.Tensor, energy: torch.Tensor) -> dict[int, int | None]:
    out: dict[int, int | None] = {}
    rows = [r for r, row in enumerate(table) if len(row) > 1]
    if not rows:
        return out
    found, energies = errors.tolist(), energy.tolist()  # one copy to Python floats, not one per element read
    for r in rows:
        row, error = table[r], found[r]
        best = min(range(1, len(row)), key=error.__getitem__)
        lost = error[best] < error[0] and error[0] > TOLERANCE * energies[r]
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
