"""How the closed loop turns cached runs into one choice without over-fitting its
calibration captions, and how it spends fewer runs on the losers.

* **Per-sample fidelity.** Each cached run is scored per calibration sample (caption and
  seed), so two candidates compare *paired*: the same captions, the same noise.
* **Simplest within noise** (:func:`pick`; opt-in, the probe's ``tolerance``). The candidate with the best mean fidelity is
  not taken blindly: among the candidates whose paired per-sample difference to the best
  has a mean within the calibration noise (one standard error of that mean, or a fixed dB
  margin), the simplest is kept. Simple means a single solver on the first track (the
  blocks' residuals on the plain schedule) before eq. 5's mixed assignment, before any
  other track, before greedy refinements. A composite that wins by less than its captions
  scatter is a winner on those captions only (issue 21 item 6, bench/results/probe_cost.md).
* **Successive halving** (:class:`Screen`; opt-in, the probe's ``halving``). Every candidate is first run on a few
  samples; only the best few (and the best single solver of the first track, the simple
  fallback) are run on the rest. A host runs a subset with ``generate(profile, samples)``.

Nothing here knows a model: scores in, a name out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

#: ``tolerance`` values of :func:`pick`: the best mean, or the simplest within one standard error.
BEST, STANDARD_ERROR = "best", "se"


def fidelities_db(output: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per sample (batch first; a tensor of one dimension is one sample):
    ``10 log10(||reference||^2 / ||output - reference||^2)`` in dB, float64 ``(batch,)``;
    ``inf`` where they are equal, ``-inf`` where the error is not finite. Raises
    ``ValueError`` on a shape mismatch."""
    output, reference = torch.as_tensor(output).double(), torch.as_tensor(reference).double()
    if output.shape != reference.shape:
        raise ValueError(f"output shape {tuple(output.shape)} differs from the reference's {tuple(reference.shape)}")
    if reference.dim() < 2:
        output, reference = output.unsqueeze(0), reference.unsqueeze(0)
    errors = (output - reference).square().flatten(1).sum(1)
    signals = reference.square().flatten(1).sum(1).clamp_min(1e-30)
    db = 10 * torch.log10(signals / errors.clamp_min(signals * 1e-30))
    db = torch.where(errors == 0, torch.full_like(db, math.inf), db)
    return torch.where(torch.isfinite(errors), db, torch.full_like(db, -math.inf))


def mean_db(per_sample: torch.Tensor) -> float:
    """The batch mean of :func:`fidelities_db` (``inf`` only when every sample is exact,
    ``-inf`` when any is not finite)."""
    if bool(torch.isneginf(per_sample).any()):
        return -math.inf
    if bool(torch.isposinf(per_sample).all()):
        return math.inf
    # an exact sample among inexact ones counts at float64's floor of 1e-30 relative error
    capped = torch.where(torch.isposinf(per_sample), torch.full_like(per_sample, 300.0), per_sample)
    return float(capped.mean())


def complexity(track: int, name: str) -> tuple[int, int, int]:
    """How far a candidate is from the simplest: (another track than the first, mixed rather
    than one solver, refinements made). Compared as a tuple, smaller is simpler."""
    uniform = "uniform:" in name
    return (int(track > 0), int(not uniform), name.count("->"))


def within_noise(per_sample: torch.Tensor, best: torch.Tensor, tolerance: str | float) -> bool:
    """Whether a candidate's per-sample fidelities ``(n,)`` are level with the best's on the
    same samples: the paired difference's mean is at least ``-margin``, where the margin is
    one standard error of that mean (``"se"``; 0 with one sample) or ``tolerance`` dB."""
    if tolerance == BEST:
        return bool(torch.equal(per_sample, best))
    both = torch.isfinite(per_sample) & torch.isfinite(best)
    if not bool(both.all()):
        return bool(torch.equal(per_sample, best))
    difference = per_sample - best
    if tolerance == STANDARD_ERROR:
        n = difference.numel()
        margin = float(difference.std(unbiased=True) / math.sqrt(n)) if n > 1 else 0.0
    else:
        margin = float(tolerance)
    return float(difference.mean()) >= -margin - 1e-12


@dataclass(frozen=True)
class Scored:
    """A candidate's name, its track's index, and its per-sample fidelities (dB) on ``samples``."""

    name: str
    track: int
    per_sample: torch.Tensor
    samples: tuple[int, ...]

    @property
    def mean(self) -> float:
        return mean_db(self.per_sample)


def pick(scored: Sequence[Scored], tolerance: str | float = STANDARD_ERROR) -> Scored:
    """The simplest candidate (:func:`complexity`) level with the best mean
    (:func:`within_noise`); among equally simple ones the higher mean, then the earlier.
    ``tolerance``: ``"best"`` (the best mean, the earlier of equals), ``"se"`` or a margin
    in dB. Candidates must share their samples. Raises ``ValueError`` on an empty list."""
    if not scored:
        raise ValueError("no candidate to pick from")
    best = max(scored, key=lambda s: s.mean)  # max keeps the first of equals
    if tolerance == BEST:
        return best
    level = [s for s in scored if s is best or within_noise(s.per_sample, best.per_sample, tolerance)]
    order = sorted(range(len(level)), key=lambda i: (complexity(level[i].track, level[i].name), -level[i].mean, i))
    return level[order[0]]


@dataclass(frozen=True)
class Screen:
    """Successive halving over calibration samples: every candidate runs on ``first`` (sample
    indices), the ``finalists`` best of those (by mean) plus the best single solver of the
    first track run on the other samples of ``range(samples)``."""

    first: tuple[int, ...]
    samples: int
    finalists: int = 3

    def __post_init__(self) -> None:
        if not self.first or len(set(self.first)) != len(self.first) or \
                not all(0 <= i < self.samples for i in self.first):
            raise ValueError(f"screen samples {self.first} must be distinct indices below {self.samples}")
        if self.finalists < 1:
            raise ValueError(f"finalists must be at least 1, got {self.finalists}")

    @property
    def rest(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.samples) if i not in self.first)

    def finalists_of(self, scored: Sequence[Scored]) -> list[Scored]:
        """The best ``finalists`` by screened mean (earlier first among equals), and the best
        single solver of the first track when it is not among them, in trial order."""
        ranked = sorted(range(len(scored)), key=lambda i: (-scored[i].mean, i))[:self.finalists]
        singles = [i for i in range(len(scored)) if scored[i].track == 0 and "uniform:" in scored[i].name]
        if singles:
            ranked.append(max(singles, key=lambda i: (scored[i].mean, -i)))
        return [scored[i] for i in sorted(set(ranked))]


def screen_for(samples: int, finalists: int = 3) -> Screen | None:
    """The default halving for ``samples`` calibration samples: a quarter of them (at least
    one) screen every candidate; None for a single sample (nothing to halve)."""
    if samples < 2:
        return None
    return Screen(tuple(range(max(1, samples // 4))), samples, finalists)
