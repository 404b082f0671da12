"""The solver pool: every solver is a linear extrapolator (docs/design.md, section 1).

At a skip step nothing is evaluated, so a "solver" can only combine cached values:

    F_hat(x) = sum_j w_j(x; t_0 .. t_{K-1}) * F(t_j)

Each solver here is a pure function from history positions and a target position to
those weights. Positions are ordered newest first (``t[0]`` is the last computed step)
and need not be evenly spaced (docs/design.md, section 3): warm-up steps are one step apart, cached
steps N apart, and sigma schedules are shifted. They need not be distinct either (a
second-order sampler evaluates one sigma twice): :meth:`Solver.weights` defines the
weights on the distinct positions, so they are finite and sum to 1 for any input.

Every weight vector is built by composing linear functionals on the history
(unit vectors, divided differences, Lagrange bases), so the derivation of each solver
reads like its textbook formula with "F_j" replaced by "the j-th unit vector".

Conventions shared by the ODE-style solvers (paper A.6):
* the slope at ``t_i`` is the backward difference ending there,
  ``s_i = (F_i - F_{i+1}) / (t_i - t_{i+1})``;
* implicit methods (BDF, Adams-Moulton) need the slope at the target, which is
  unknown at a skip step. Predictor: Adams-Bashforth of the same step count gives
  ``F_pred(x)``, and the target slope is the backward difference ending at the
  target, ``(F_pred(x) - F_0) / (x - t_0)`` -- the same convention as every other
  slope. (Predicting the target slope by extrapolating ``s_0, s_1`` instead would turn
  trapezoidal AM2 into AB2, a duplicate.)

Identities the pool respects (tested):
* the paper's RK2, eq. 30-32, is exactly the two-step Adams-Bashforth rule and also
  TaylorSeer's order-2 rule, for any spacing. Eq. 33 (``3/2 F_n - 1/2 F_{n-2}``) does
  not follow from eq. 32 (docs/design.md, section 2); we implement the derivation. The pool keeps the
  rule once, as ``taylor-2``, with ``ab2`` and ``rk2`` as aliases.
* ``taylor-1`` is linear extrapolation, so Lagrange extrapolation starts at 3 points.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
from numpy.polynomial import polynomial as P

#: Bump when any solver's weights change: profiles record the pool version they chose from.
POOL_VERSION = 1

WeightFn = Callable[[np.ndarray, float], np.ndarray]


# --- linear functionals on the history -------------------------------------------------

def _unit(i: int, size: int) -> np.ndarray:
    e = np.zeros(size)
    e[i] = 1.0
    return e


def _backward_slopes(t: np.ndarray, count: int, size: int) -> list[np.ndarray]:
    """Weight vectors of the backward differences s_0 .. s_{count-1}."""
    return [(_unit(i, size) - _unit(i + 1, size)) / (t[i] - t[i + 1]) for i in range(count)]


def _basis_polys(nodes: np.ndarray, origin: float) -> list[np.ndarray]:
    """Lagrange basis polynomials over ``nodes``, in the shifted variable u = t - origin."""
    u = np.asarray(nodes, dtype=float) - origin
    polys = []
    for j, uj in enumerate(u):
        others = np.delete(u, j)
        polys.append(P.polyfromroots(others) / np.prod(uj - others))
    return polys


def lagrange_values(nodes: np.ndarray, x: float) -> np.ndarray:
    """L_j(x) for each node: the weights of polynomial interpolation evaluated at x."""
    return np.array([P.polyval(x - nodes[0], b) for b in _basis_polys(nodes, nodes[0])])


def lagrange_derivatives(nodes: np.ndarray, x: float) -> np.ndarray:
    """L_j'(x) for each node."""
    return np.array([P.polyval(x - nodes[0], P.polyder(b)) for b in _basis_polys(nodes, nodes[0])])


def lagrange_integrals(nodes: np.ndarray, a: float, b: float) -> np.ndarray:
    """The integral of L_j from a to b, for each node."""
    basis = _basis_polys(nodes, a)
    return np.array([P.polyval(b - a, P.polyint(poly)) for poly in basis])


def _integrate_slopes(t0: float, x: float, nodes, slopes: list[np.ndarray], size: int) -> np.ndarray:
    """F_0 + integral from t0 to x of the polynomial interpolating ``slopes`` at ``nodes``."""
    integrals = lagrange_integrals(np.asarray(nodes, dtype=float), t0, x)
    return _unit(0, size) + sum(w * s for w, s in zip(integrals, slopes))


# --- the solvers --------------------------------------------------------------------

def reuse(t: np.ndarray, x: float) -> np.ndarray:
    """FORA: the last computed value, unchanged."""
    return np.ones(1)


def taylor(order: int) -> WeightFn:
    """TaylorSeer: derivatives from recursive backward differences, Taylor series at t_0.

    ``D^m_i = (D^{m-1}_i - D^{m-1}_{i+1}) / (t_i - t_{i+1})`` and
    ``F(x) = sum_m D^m_0 (x - t_0)^m / m!``, exactly as TaylorSeer updates its factors
    at each full step (dividing by the distance between the last two full steps).
    """

    def weights(t: np.ndarray, x: float) -> np.ndarray:
        size = order + 1
        diffs = [_unit(i, size) for i in range(size)]  # D^0_i
        result = diffs[0].copy()
        for m in range(1, order + 1):
            diffs = [(diffs[i] - diffs[i + 1]) / (t[i] - t[i + 1]) for i in range(size - m)]
            result += diffs[0] * (x - t[0]) ** m / math.factorial(m)
        return result

    return weights


def adams_bashforth(steps: int) -> WeightFn:
    """AB-k: integrate the polynomial through the slopes at t_0 .. t_{k-1} from t_0 to x."""

    def weights(t: np.ndarray, x: float) -> np.ndarray:
        size = steps + 1
        slopes = _backward_slopes(t, steps, size)
        return _integrate_slopes(t[0], x, t[:steps], slopes, size)

    return weights


def _predicted_target_slope(t: np.ndarray, x: float, steps: int, size: int) -> np.ndarray:
    """Slope at the target: backward difference from F_0 to the AB-k prediction."""
    predicted = np.zeros(size)
    predicted[: steps + 1] = adams_bashforth(steps)(t, x)
    return (predicted - _unit(0, size)) / (x - t[0])


def adams_moulton(steps: int) -> WeightFn:
    """AM-k (k slope nodes: the target and t_0 .. t_{k-2}), AB-k predictor.

    ``am2`` is the trapezoidal rule ``F_0 + (x - t_0) / 2 * (f(x) + s_0)``.
    """

    def weights(t: np.ndarray, x: float) -> np.ndarray:
        size = steps + 1
        target_slope = _predicted_target_slope(t, x, steps, size)
        slopes = [target_slope, *_backward_slopes(t, steps - 1, size)]
        nodes = [x, *t[: steps - 1]]
        return _integrate_slopes(t[0], x, nodes, slopes, size)

    return weights


def backward_differentiation(steps: int) -> WeightFn:
    """BDF-k: the polynomial through (x, F(x)), (t_0, F_0) .. (t_{k-1}, F_{k-1}) has slope
    f(x) at x; solved for F(x) with the AB-k predicted target slope. Singular where
    ``L_0'(x) = sum_j 1 / (x - t_j)`` vanishes, which needs the target between the nodes
    (never when extrapolating): :meth:`Solver.weights` then takes the next lower order."""

    def weights(t: np.ndarray, x: float) -> np.ndarray:
        size = steps + 1
        target_slope = _predicted_target_slope(t, x, steps, size)
        nodes = np.array([x, *t[:steps]], dtype=float)
        d = lagrange_derivatives(nodes, x)
        known = sum(d[j + 1] * _unit(j, size) for j in range(steps))
        return (target_slope - known) / d[0]

    return weights


def lagrange(points: int) -> WeightFn:
    """Polynomial extrapolation through the last ``points`` computed values."""

    def weights(t: np.ndarray, x: float) -> np.ndarray:
        return lagrange_values(np.asarray(t[:points], dtype=float), x)

    return weights


# --- the pool ----------------------------------------------------------------------

@dataclass(frozen=True)
class Solver:
    """One entry of the pool.

    ``history``: cached values it combines. ``exact_degree``: highest polynomial degree
    it reproduces exactly for any spacing (tested both ways: exact up to it, not beyond).
    """

    name: str
    history: int
    exact_degree: int
    rule: WeightFn = field(repr=False)
    summary: str = ""
    aliases: tuple[str, ...] = ()

    def weights(self, positions: Sequence[float], target: float) -> np.ndarray:
        """Weights for ``positions`` (newest first, any order after that), one per position
        of the first ``history`` ones, always finite and summing to 1.

        Defined on the *distinct* positions (:func:`distinct_nodes`): a position that repeats
        a newer one (a second-order sampler such as Heun evaluates one sigma twice), or
        lies within ``NODE_TOLERANCE`` of the span of it, gets weight 0, and the newest
        value at each position is the one used. A target at one of the positions gets
        that value (weight 1), as every rule here gives in the limit. With fewer distinct
        positions than the solver needs (right after a short warm-up, or after repeats) it
        falls back to TaylorSeer of the order they allow, as TaylorSeer itself does. Where
        a rule is singular on its nodes (BDF with the target between them), or comes out
        non-finite, the next lower order is used, down to reuse."""
        t = np.asarray(positions, dtype=float)[: self.history]
        if len(t) == 0:
            raise ValueError(f"solver {self.name!r} needs at least one cached value")
        x = float(target)
        out = np.zeros(len(t))
        keep, at_target = distinct_nodes(t, x)
        if at_target is not None:
            out[at_target] = 1.0
            return out
        nodes = t[keep]
        solver = self if len(nodes) >= self.history else _fallback(len(nodes))
        while True:
            with np.errstate(all="ignore"):
                w = solver.rule(nodes[: solver.history], x)
            if np.all(np.isfinite(w)) and abs(w.sum() - 1.0) <= SUM_TOLERANCE * max(1.0, np.abs(w).sum()):
                break
            solver = _fallback(solver.history - 1) if solver.history > 1 else _BY_NAME["reuse"]
        out[keep[: len(w)]] = w
        return out


#: Positions closer than this fraction of the span of a solver's positions and target are
#: one node (:func:`distinct_nodes`): divided differences over closer ones would give
#: weights so large that float rounding decides the forecast.
NODE_TOLERANCE = 1e-3
#: How far from 1 a rule's weights may sum, relative to the sum of their magnitudes,
#: before the rule is taken as singular on its nodes.
SUM_TOLERANCE = 1e-6


def distinct_nodes(t: np.ndarray, x: float) -> tuple[np.ndarray, int | None]:
    """Indices of the distinct positions of ``t`` (newest first: a position within
    ``NODE_TOLERANCE`` of the span of a newer kept one is dropped), and the index of the
    position the target ``x`` coincides with, if any (None otherwise). Unordered positions
    are fine: every rule here is defined for any distinct nodes."""
    span = float(np.ptp(np.append(t, x)))
    tolerance = NODE_TOLERANCE * span
    keep: list[int] = []
    for i, ti in enumerate(t):
        if all(abs(ti - t[k]) > tolerance for k in keep):
            keep.append(i)
    hit = next((k for k in keep if abs(t[k] - x) <= tolerance), None)
    return np.array(keep, dtype=int), hit


_POOL: tuple[Solver, ...] = (
    Solver("reuse", 1, 0, reuse, "FORA: repeat the last computed value", ("fora",)),
    Solver("taylor-1", 2, 1, taylor(1), "TaylorSeer order 1 (linear extrapolation)", ("ab1",)),
    Solver("taylor-2", 3, 1, taylor(2), "TaylorSeer order 2 (= AB2 = the paper's RK2)", ("ab2", "rk2")),
    Solver("taylor-3", 4, 1, taylor(3), "TaylorSeer order 3"),
    Solver("ab3", 4, 1, adams_bashforth(3), "Adams-Bashforth, 3 steps"),
    Solver("am2", 3, 1, adams_moulton(2), "Adams-Moulton trapezoid, AB2 predictor"),
    Solver("am3", 4, 1, adams_moulton(3), "Adams-Moulton, 3 slope nodes, AB3 predictor"),
    Solver("bdf2", 3, 1, backward_differentiation(2), "BDF2, AB2 predictor"),
    Solver("bdf3", 4, 1, backward_differentiation(3), "BDF3, AB3 predictor"),
    Solver("lagrange-3", 3, 2, lagrange(3), "quadratic extrapolation through 3 values"),
    Solver("lagrange-4", 4, 3, lagrange(4), "cubic extrapolation through 4 values"),
)

_BY_NAME: dict[str, Solver] = {s.name: s for s in _POOL}
_BY_NAME.update({alias: s for s in _POOL for alias in s.aliases})


def _fallback(available: int) -> Solver:
    return _BY_NAME["reuse"] if available == 1 else _BY_NAME[f"taylor-{min(available - 1, 3)}"]


def pool() -> tuple[Solver, ...]:
    """All solvers, each coefficient set once, in a fixed order (profiles store indices)."""
    return _POOL


def pool_names() -> tuple[str, ...]:
    return tuple(s.name for s in _POOL)


def get_solver(name: str) -> Solver:
    """Look a solver up by its name or an alias (``fora``, ``ab2``, ``rk2``, ...)."""
    try:
        return _BY_NAME[name.strip().lower()]
    except KeyError:
        known = ", ".join(sorted(_BY_NAME))
        raise ValueError(f"unknown solver {name!r}; known solvers: {known}") from None
