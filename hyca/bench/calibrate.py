"""Putting threshold-driven peers at a FLOPs target, on calibration prompts only.

FirstBlockCache, MagCache and DBCache decide per step whether to skip, from a threshold;
their FLOPs ratio falls as the threshold rises. To compare them with HyCa at matched
FLOPs, the threshold is searched (bisection on a log scale) until the FLOPs ratio on the
calibration prompts is as close as the search gets to HyCa's at the same interval. A
target the method cannot reach at any threshold is reported as such, at its fastest
setting, rather than silently matched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from .methods import Method

LOW, HIGH = 1e-3, 8.0
ITERATIONS = 9
TOLERANCE = 0.03  # stop when within 3% of the target ratio


@dataclass
class Found:
    method: Method
    ratio: float  # FLOPs ratio (method / full) on the calibration prompts
    target: float
    evaluations: int

    fastest: float = 0.0  # FLOPs ratio at the highest threshold tried

    @property
    def reachable(self) -> bool:
        return self.fastest <= self.target * (1 + TOLERANCE)

    @property
    def matched(self) -> bool:
        return abs(self.ratio / self.target - 1) <= TOLERANCE


def search(make: Callable[[float], Method], ratio_of: Callable[[Method], float], target: float,
           low: float = LOW, high: float = HIGH, iterations: int = ITERATIONS) -> Found:
    """The threshold whose FLOPs ratio is closest to ``target``; ``ratio_of(method)``
    measures a method's FLOPs ratio against full compute."""
    tried: list[tuple[float, Method]] = []

    def evaluate(threshold: float) -> float:
        method = make(threshold)
        ratio = ratio_of(method)
        tried.append((ratio, method))
        return ratio

    fastest = evaluate(high)
    if fastest > target * (1 + TOLERANCE):  # even the fastest setting is too slow
        return Found(tried[-1][1], fastest, target, len(tried), fastest)
    lo, hi = math.log(low), math.log(high)
    for _ in range(iterations):
        mid = (lo + hi) / 2
        ratio = evaluate(math.exp(mid))
        if abs(ratio / target - 1) <= TOLERANCE:
            break
        lo, hi = (mid, hi) if ratio > target else (lo, mid)
    ratio, method = min(tried, key=lambda rm: (abs(math.log(rm[0] / target)), -rm[0]))
    return Found(method, ratio, target, len(tried), fastest)
