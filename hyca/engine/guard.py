"""All-time checking: every computed step is a free test of the forecasts.

At a computed step the engine has, before the step's residuals join the history, both the
history a skip step would have forecast from and the true summed residuals ``A_s`` of each
solver group ``s``. So, with no extra model call, it can measure what each group's solver
*would* have forecast for this step, and what a lower order would have:

    err(solver) = || sum_j w_j(solver) * A_s(t_j) - A_s(now) ||^2

A group whose solver did worse than a lower order (``taylor-1``, then ``reuse``) is
demoted to the best of those for the rest of the generation.

A check only judges a solver when the forecast it replays looks like the forecasts still
to come (:func:`steady`): history points and target ``N`` steps apart. Right after
warm-up the history is one step apart and the target ``N`` ahead, where extrapolation
misses by far more than reuse (20-70x on the reference model) though it beats reuse by
5-50x once the history is ``N`` apart; judging there demoted good solvers for good
(measured: -5 dB at 50 steps, N=4). Open-loop choosing (eq. 5)
scores forecasts on a fully computed trajectory; on the cached trajectory, with guidance
and at settings the profile was not chosen for, a high order can extrapolate noise
(issue 11). The check measures on the trajectory the run is actually on.

Deterministic: the errors are sums over the same tensors in a fixed order, and, under
context parallelism, summed over every rank (``reduce``) before anything is decided, so all
ranks demote alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..math.solvers import get_solver, pool
from .forecast import forecast

#: The ladder of lower orders a solver can be demoted along, lowest last.
LADDER = ("taylor-1", "reuse")


@dataclass(frozen=True)
class Demotion:
    """At computed step ``step``, one solver group switched from ``solver`` to ``to``."""

    step: int
    solver: str
    to: str

    def describe(self) -> str:
        return f"{self.solver} -> {self.to} at step {self.step}"


def lower_orders(solver: int) -> list[int]:
    """Pool indices of the lower-order solvers ``solver`` may be demoted to, best first."""
    names = [s.name for s in pool()]
    ladder = [names.index(get_solver(n).name) for n in LADDER]
    return ladder[ladder.index(solver) + 1:] if solver in ladder else ladder


def squared_error(history: Sequence[torch.Tensor], positions: Sequence[float], target: float,
                  actual: torch.Tensor, solver: int) -> torch.Tensor:
    """``|| forecast of solver ``solver`` at ``target`` - actual ||^2`` as a float64 scalar
    (history newest first, as the engine keeps it; solvers with too short a history fall
    back exactly as they do at a skip step)."""
    count = min(len(history), pool()[solver].history)
    weights = torch.as_tensor(pool()[solver].weights(list(positions[:count]), target)).unsqueeze(1)
    predicted = forecast(list(history)[:len(weights)], weights)
    return (predicted - actual.float()).square().sum(dtype=torch.float64)


def steady(steps: Sequence[int], history: int, interval: int) -> bool:
    """Whether a check at step ``steps[0]`` with history at steps ``steps[1:]`` (newest
    first) replays a steady-state forecast for a solver combining ``history`` values: the
    target and those values all ``interval`` steps apart."""
    window = list(steps[:history + 1])
    return len(window) == history + 1 and all(a - b == interval for a, b in zip(window, window[1:]))


def check_solvers(histories: Sequence[Sequence[torch.Tensor]], positions: Sequence[float], target: float,
                  actuals: Sequence[torch.Tensor], active: Sequence[int],
                  reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
                  judged: Sequence[bool] | None = None) -> dict[int, int]:
    """Which history slots should forecast with a lower order from now on.

    ``histories[s]``: slot ``s``'s cached values (newest first), ``positions`` theirs;
    ``actuals[s]``: the slot's true value at ``target``, just computed; ``active[s]``: the
    pool index it forecasts with now; ``judged[s]``: whether this check may judge slot ``s``
    (default: all). Returns ``{slot: new pool index}`` for every judged slot whose solver's
    error exceeds a lower order's; all errors are summed by ``reduce`` first (context
    parallelism), so the answer is the same on every rank."""
    judged = [True] * len(active) if judged is None else list(judged)
    table: list[list[int]] = [[active[s], *lower_orders(active[s])] if judged[s] else [active[s]]
                              for s in range(len(active))]
    if all(len(row) == 1 for row in table):
        return {}  # nothing to judge: no errors, no reduce (the same on every rank: it depends on steps only)
    width = max(len(row) for row in table)
    measured = [squared_error(histories[s], positions, target, actuals[s], solver) if len(row) > 1
                else torch.zeros((), dtype=torch.float64, device=actuals[s].device)
                for s, row in enumerate(table) for solver in row]
    flat = torch.stack(measured).cpu() if measured else torch.zeros(0, dtype=torch.float64)
    errors = torch.zeros(len(table), width, dtype=torch.float64)  # on the CPU: ``reduce`` moves it if it must
    at = 0
    for s, row in enumerate(table):
        errors[s, :len(row)] = flat[at:at + len(row)]
        at += len(row)
    if reduce is not None:
        errors = reduce(errors)
    lowered: dict[int, int] = {}
    for s, row in enumerate(table):
        if len(row) == 1:
            continue
        best = min(range(1, len(row)), key=lambda c: float(errors[s, c]))
        if float(errors[s, best]) < float(errors[s, 0]):
            lowered[s] = row[best]
    return lowered
