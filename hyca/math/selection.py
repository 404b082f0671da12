"""Solver selection (paper eq. 5) by replaying the runtime schedule on a recorded run.

The engine computes the steps a :class:`~hyca.engine.schedule.Schedule` plans and, at
every other step, forecasts from the computed ones: history points ``N`` steps apart (one
apart in warm-up), targets 1 .. N-1 steps ahead, weights from the real positions (step
index or sigma). :class:`ReplayErrors` plays exactly that on a fully computed run, one step
at a time, and accumulates for every candidate solver, block and dimension the squared
error of its forecast against the true recorded value. It keeps only the last few computed
steps, so a probe never holds the trajectory.

Every solver is a weighted sum over history, so the error can be measured on *sketches*
``(blocks, r, dim)`` of the residuals (tokens projected to ``r`` rows by a fixed random
matrix ``P``): ``P (sum_j w_j R_j - R_t) = sum_j w_j P R_j - P R_t``, and ``||P x||^2``
estimates ``||x||^2`` without bias.

Weighting: each (block, target step) pair counts the same: errors are divided by that
block's residual energy (summed over dimensions) at that step, so late steps with small
residuals are not drowned out by early ones, and a dimension's share of the error is its
share of the block's. Within one cluster and block, eq. 5's mean over the cluster's
dimensions picks the same solver as this sum.

Then each target step counts in proportion to how far the run has come, ``t / steps``
(``progress_power`` = 1; 0 weighs all steps alike; the step index, not sigma, so the
weight is the same on either positions axis): measured closed loop, an error made while
the sample is still mostly noise shows far less in the final image than one made late.
Why it matters: after warm-up the first forecasts extrapolate from a history one step
apart to targets up to N-1 steps ahead, so ``taylor-1`` misses there by far more than
``reuse``; with every step weighted alike that one early interval outweighed the smaller
``taylor-1`` error of every later interval, and the probe chose reuse as N grew, though
closed loop ``taylor-1`` was better. The measurements, before and after the weight:
bench/results/selection_study.md; what the weight
gained on prompts not used to pick the exponent: docs/engine.md.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Sequence

import torch

from .solvers import Solver, pool

# Keeps the division finite where torch.where discards it anyway.
_TINY = 1e-30
# Blocks scored together: keeps the (solvers, blocks, rows, dim) forecast errors in cache.
_CHUNK_BLOCKS = 2
#: Exponent of the run-progress weight ``(t / steps) ** p`` of a target step t (see above);
#: 1 was best among 0, 1, 2 on held-out prompts of the reference model.
PROGRESS_POWER = 1.0


@dataclass
class Replay:
    """What a replay accumulated: ``errors`` ``(solvers, blocks, dim)`` and ``energy``
    ``(blocks, dim)``, both weighted per (block, target); ``targets``: forecast steps seen."""

    errors: torch.Tensor
    energy: torch.Tensor
    targets: int
    solvers: tuple[Solver, ...]


class ReplayErrors:
    """Online replay of the runtime schedule ``plan`` (``True`` = computed step).

    Call :meth:`update` with every step's sketch ``(blocks, r, dim)`` and position, in
    order; the sketches of computed steps enter the history (newest first, as deep as the
    deepest solver needs), the others are targets.
    """

    def __init__(self, plan: Sequence[bool], solvers: Sequence[Solver] | None = None,
                 progress_power: float = PROGRESS_POWER) -> None:
        self.plan = [bool(p) for p in plan]
        if not progress_power >= 0:
            raise ValueError(f"progress_power must be >= 0 (0 weighs every step alike), got {progress_power!r}")
        self.progress_power = float(progress_power)
        if not self.plan or not self.plan[0]:
            raise ValueError("the schedule must compute its first step: nothing can be forecast from nothing")
        self.solvers = tuple(solvers) if solvers is not None else pool()
        if not self.solvers:
            raise ValueError("at least one candidate solver is needed")
        depth = max(s.history for s in self.solvers)
        self._history: deque[torch.Tensor] = deque(maxlen=depth)
        self._positions: deque[float] = deque(maxlen=depth)
        self._errors: torch.Tensor | None = None
        self._energy: torch.Tensor | None = None
        self.step = 0
        self.targets = 0

    def update(self, sketch: torch.Tensor, position: float) -> None:
        if self.step >= len(self.plan):
            raise ValueError(f"more steps than the {len(self.plan)} the schedule was planned for")
        f = torch.as_tensor(sketch).detach().float()
        if f.ndim != 3:
            raise ValueError(f"sketch must be (blocks, r, dim), got shape {tuple(f.shape)}")
        if self.plan[self.step]:
            self._history.appendleft(f)
            self._positions.appendleft(float(position))
        else:
            self._score(f, float(position))
        self.step += 1

    def _score(self, target: torch.Tensor, position: float) -> None:
        blocks, rows, dim = target.shape
        if self._errors is None:
            self._errors = torch.zeros(len(self.solvers), blocks, dim, dtype=torch.float64, device=target.device)
            self._energy = torch.zeros(blocks, dim, dtype=torch.float64, device=target.device)
        dim_energy = target.square().sum(1)  # (blocks, dim)
        block_energy = dim_energy.sum(1, keepdim=True).double()
        # one weight per block; a block with no residual at this step has nothing to compare
        progress = (self.step / len(self.plan)) ** self.progress_power
        weight = torch.where(block_energy > 0, progress / block_energy.clamp_min(_TINY), 0.0)
        self._energy += dim_energy * weight
        # Row s of `coefficients` turns (history..., target) into solver s's forecast error:
        # one small matmul per chunk of blocks instead of a pass over the data per solver.
        values = torch.stack([*self._history, target]).view(len(self._history) + 1, blocks, -1)
        coefficients = torch.zeros(len(self.solvers), len(self._history) + 1, device=target.device)
        positions = list(self._positions)
        for s, solver in enumerate(self.solvers):
            w = solver.weights(positions[: solver.history], position)  # falls back like the engine
            coefficients[s, : len(w)] = torch.as_tensor(w, dtype=torch.float32, device=target.device)
        coefficients[:, -1] = -1.0
        for start in range(0, blocks, _CHUNK_BLOCKS):
            chunk = values[:, start:start + _CHUNK_BLOCKS]
            error = (coefficients @ chunk.reshape(chunk.shape[0], -1)).view(len(self.solvers), -1, rows, dim)
            self._errors[:, start:start + _CHUNK_BLOCKS] += error.square().sum(2) * weight[start:start + _CHUNK_BLOCKS]
        self.targets += 1

    def result(self) -> Replay:
        if self.step != len(self.plan):
            raise ValueError(f"the replay saw {self.step} of the {len(self.plan)} planned steps")
        if self._errors is None:
            raise ValueError(
                "the schedule forecasts no step (warm-up, every N-th step after it and the last one are "
                "computed), so no solver can be compared: use more steps or fewer warm-up steps"
            )
        return Replay(self._errors.cpu(), self._energy.cpu(), self.targets, self.solvers)


@dataclass
class Selection:
    """``chosen`` ``(blocks, clusters)`` index into the candidates; ``relative_errors``
    ``(blocks, clusters, candidates)``: each candidate's replay error in each cluster,
    relative to the cluster's energy (NaN for an empty cluster); ``sizes``
    ``(blocks, clusters)``: dimensions per cluster."""

    chosen: torch.Tensor
    relative_errors: torch.Tensor
    sizes: torch.Tensor


def per_cluster(values: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Sum ``values`` ``(..., blocks, dim)`` over the dimensions of each cluster ->
    ``(..., blocks, k)``."""
    index = labels.expand(*values.shape[:-2], *labels.shape)
    out = torch.zeros(*values.shape[:-1], k, dtype=values.dtype)
    return out.scatter_add_(-1, index, values)


def select(replay: Replay, labels: torch.Tensor, k: int, shared: bool = False) -> Selection:
    """Per (block, cluster), the candidate with the least replay error.

    ``shared=True`` (one labelling for all blocks): one solver per cluster, chosen on the
    errors summed over every block. A cluster with no dimension in some block (possible
    only with a shared labelling) gets that block's best solver overall, so the profile
    stays valid; it is never used.
    """
    labels = torch.as_tensor(labels, dtype=torch.int64)
    if labels.shape != replay.energy.shape:
        raise ValueError(f"labels {tuple(labels.shape)} do not match the replay's (blocks, dim) "
                         f"{tuple(replay.energy.shape)}")
    errors = per_cluster(replay.errors, labels, k)  # (S, blocks, k)
    energy = per_cluster(replay.energy, labels, k)  # (blocks, k)
    sizes = per_cluster(torch.ones_like(labels), labels, k)
    if shared:
        chosen = errors.sum(1).argmin(0).expand(labels.shape[0], k).clone()
    else:
        chosen = errors.argmin(0)
    whole_block = replay.errors.sum(2).argmin(0)  # (blocks,)
    chosen = torch.where(sizes > 0, chosen, whole_block.unsqueeze(1))
    relative = (errors / energy).permute(1, 2, 0)
    relative[sizes == 0] = float("nan")
    return Selection(chosen, relative, sizes)


def overall_error(replay: Replay, dim_choice: torch.Tensor) -> float:
    """Replay error of a whole assignment ``(blocks, dim)`` of candidate indices,
    relative to the total energy: the number to compare profiles and uniform methods by."""
    picked = torch.gather(replay.errors, 0, dim_choice.unsqueeze(0)).squeeze(0)
    return float(picked.sum() / replay.energy.sum())
