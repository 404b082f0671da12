"""The solver pool: each entry is a linear extrapolator with the properties it claims."""

import itertools

import numpy as np
import pytest

from hyca.math.solvers import get_solver, pool

from references import TaylorSeerFactors

RNG = np.random.default_rng(1234)


def random_configuration(history: int):
    """Decreasing positions with uneven gaps and a target past the newest one."""
    gaps = RNG.uniform(0.3, 2.0, size=history - 1)
    t0 = RNG.uniform(-3, 3)
    positions = t0 - np.concatenate([[0.0], np.cumsum(gaps)])
    target = t0 + RNG.uniform(0.2, 2.5)
    return positions, target


def runtime_configurations(history: int, interval: int = 5):
    """History spaced ``interval`` steps apart, targets 1 .. interval-1 steps ahead."""
    positions = 20.0 - interval * np.arange(history)
    return [(positions, positions[0] + k) for k in range(1, interval)]


@pytest.mark.parametrize("solver", pool(), ids=lambda s: s.name)
def test_weights_sum_to_one(solver):
    for _ in range(20):
        t, x = random_configuration(solver.history)
        assert solver.weights(t, x).sum() == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("solver", pool(), ids=lambda s: s.name)
def test_exact_on_polynomials_of_its_degree_and_not_beyond(solver):
    for _ in range(10):
        t, x = random_configuration(solver.history)
        w = solver.weights(t, x)
        for degree in range(solver.exact_degree + 1):
            coefficients = RNG.normal(size=degree + 1)
            assert w @ np.polyval(coefficients, t) == pytest.approx(np.polyval(coefficients, x), abs=1e-8)
        # the declared degree is tight: the next monomial is not reproduced
        d = solver.exact_degree + 1
        assert abs(w @ t**d - x**d) > 1e-6


def test_rk2_from_the_paper_derivation():
    """The paper's eq. 30-32 give F_n + 3/2 (F_n - F_{n-1}) - 1/2 (F_{n-1} - F_{n-2}); with a
    uniform step that is 5/2 F_n - 2 F_{n-1} + 1/2 F_{n-2}, which is also AB2."""
    h = 0.7
    t = np.array([3.0, 3.0 - h, 3.0 - 2 * h])
    rk2 = get_solver("rk2").weights(t, 3.0 + h)
    np.testing.assert_allclose(rk2, [2.5, -2.0, 0.5], atol=1e-12)
    np.testing.assert_allclose(get_solver("ab2").weights(t, 3.0 + h), rk2, atol=1e-12)
    # eq. 33 as printed (3/2 F_n - 1/2 F_{n-2}) does not follow from eq. 32
    assert not np.allclose(rk2, [1.5, 0.0, -0.5])


def test_rk2_heun_form_on_uneven_positions():
    """RK2 written as Heun with finite-difference slopes, k2 extrapolated linearly from
    the last two slopes, equals the pool entry for any spacing."""
    for _ in range(10):
        t, x = random_configuration(3)
        F = RNG.normal(size=3)
        s0 = (F[0] - F[1]) / (t[0] - t[1])
        s1 = (F[1] - F[2]) / (t[1] - t[2])
        k1 = s0
        k2 = s0 + (x - t[0]) * (s0 - s1) / (t[0] - t[1])
        heun = F[0] + (x - t[0]) / 2 * (k1 + k2)
        assert get_solver("rk2").weights(t, x) @ F == pytest.approx(heun, abs=1e-10)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_taylor_matches_taylorseer_recursion(order):
    solver = get_solver(f"taylor-{order}")
    for _ in range(10):
        t, x = random_configuration(order + 1)
        F = RNG.normal(size=order + 1)
        reference = TaylorSeerFactors(order)
        for position, value in zip(t[::-1], F[::-1]):  # oldest first, as sampling runs
            reference.update(value, position)
        assert solver.weights(t, x) @ F == pytest.approx(reference.predict(x), abs=1e-9)


def test_short_history_falls_back_like_taylorseer():
    """Right after warm-up TaylorSeer uses the orders it has; every solver does the same."""
    t, x = np.array([4.0, 3.0]), 6.0
    for solver in pool():
        if solver.history > 2:
            np.testing.assert_allclose(solver.weights(t, x), get_solver("taylor-1").weights(t, x))
    np.testing.assert_allclose(get_solver("lagrange-4").weights(t[:1], x), [1.0])


def test_no_two_entries_share_a_coefficient_set():
    """Compared where the engine uses them (runtime spacing) and at random uneven spacing."""
    for a, b in itertools.combinations(pool(), 2):
        if a.history != b.history:
            continue  # different numbers of cached values: different coefficient sets
        configurations = runtime_configurations(a.history) + [random_configuration(a.history) for _ in range(3)]
        assert any(not np.allclose(a.weights(t, x), b.weights(t, x)) for t, x in configurations), (a.name, b.name)


@pytest.mark.parametrize("solver", pool(), ids=lambda s: s.name)
def test_weights_do_not_depend_on_the_units_of_position(solver):
    """Step index, sigma and timestep=1000*sigma are affine maps of each other."""
    t, x = random_configuration(solver.history)
    np.testing.assert_allclose(solver.weights(1000 * t + 7, 1000 * x + 7), solver.weights(t, x), atol=1e-8)


def test_names_and_aliases():
    assert get_solver("FORA").name == "reuse"
    assert get_solver("rk2") is get_solver("taylor-2")
    assert len({s.name for s in pool()}) == len(pool())
    with pytest.raises(ValueError, match="unknown solver 'rk4'.*known solvers"):
        get_solver("rk4")


# --- repeated, unordered and nearly equal positions (issue 18: never a silent NaN) --------

from hypothesis import given, settings, strategies as st  # noqa: E402

from hyca.math.solvers import NODE_TOLERANCE  # noqa: E402

_position = st.floats(-50, 50, allow_nan=False, allow_infinity=False)


@settings(max_examples=300, deadline=None)
@given(solver=st.sampled_from(pool()), positions=st.lists(_position, min_size=1, max_size=5),
       repeats=st.lists(st.integers(0, 4), max_size=3), nudge=st.sampled_from([0.0, 1e-12, 1e-7, 1e-4]),
       target=_position)
def test_fuzzed_positions_always_give_finite_weights_that_sum_to_one(solver, positions, repeats, nudge, target):
    """Any positions a host may hand over: repeats (Heun's second evaluation of a sigma),
    nearly equal ones, any order, a target on a position or between them."""
    t = list(positions)
    for r in repeats:
        t.insert(min(r, len(t)), t[min(r, len(t) - 1)] + nudge)
    w = solver.weights(t, target)
    assert w.shape == (min(len(t), solver.history),)
    assert np.all(np.isfinite(w))
    assert w.sum() == pytest.approx(1.0, abs=1e-6 * max(1.0, np.abs(w).sum()))


def test_a_repeated_position_is_one_node_holding_its_newest_value():
    """Heun at positions [2, 2, 1] (newest first) -> 3: the nodes are 2 and 1, so taylor-2
    has one slope and extrapolates linearly, 2 * F(2) - F(1); the older value at 2 is unused."""
    np.testing.assert_allclose(get_solver("taylor-2").weights([2.0, 2.0, 1.0], 3.0), [2.0, 0.0, -1.0])
    # three distinct of four: the TaylorSeer order-2 fallback, 5/2, -2, 1/2 on a unit grid
    np.testing.assert_allclose(get_solver("lagrange-4").weights([3.0, 3.0, 2.0, 1.0], 4.0), [2.5, 0.0, -2.0, 0.5])
    # a target on a cached position is that value
    np.testing.assert_allclose(get_solver("am3").weights([2.0, 1.0, 0.0, -1.0], 2.0), [1.0, 0.0, 0.0, 0.0])
    # all the same position: reuse of the newest
    np.testing.assert_allclose(get_solver("bdf3").weights([1.0] * 4, 0.5), [1.0, 0.0, 0.0, 0.0])


@pytest.mark.parametrize("solver", pool(), ids=lambda s: s.name)
def test_unordered_distinct_positions_stay_exact(solver):
    """The nodes need no order: shuffled, well separated positions with the target outside
    them still reproduce every polynomial of the solver's degree."""
    for _ in range(10):
        t, x = random_configuration(solver.history)
        t = np.concatenate([t[:1], RNG.permutation(t[1:])])
        w = solver.weights(t, x)
        for degree in range(solver.exact_degree + 1):
            coefficients = RNG.normal(size=degree + 1)
            assert w @ np.polyval(coefficients, t) == pytest.approx(np.polyval(coefficients, x), abs=1e-8)


def test_nearly_equal_positions_merge_below_the_tolerance_only():
    solver = get_solver("taylor-1")
    merged = solver.weights([1.0, 1.0 - 0.5 * NODE_TOLERANCE], 2.0)
    np.testing.assert_allclose(merged, [1.0, 0.0])  # one node: reuse
    separate = solver.weights([1.0, 1.0 - 10 * NODE_TOLERANCE], 2.0)
    np.testing.assert_allclose(separate, [1.0 + 1 / (10 * NODE_TOLERANCE), -1 / (10 * NODE_TOLERANCE)])
