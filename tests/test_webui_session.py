"""The pass session's pure parts: placing model calls on the sigma schedule, telling
branches apart, and the ARI the LoRA switch reports. No stand-ins needed."""

import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from hyca import Profile, Schedule
from hyca.adapters.webui.profiles import adjusted_rand_index
from hyca.adapters.webui.session import PassSession, step_of
from hyca.engine.cache import HybridCache

SCHEDULE = [1.0, 0.8, 0.5, 0.25, 0.1, 0.0]


def test_step_of_places_sigmas_between_schedule_points():
    assert step_of(1.0, SCHEDULE) == (0, 0.0)
    assert step_of(0.25, SCHEDULE) == (3, 0.0)
    k, fraction = step_of(0.65, SCHEDULE)  # a midpoint between 0.8 and 0.5
    assert k == 1 and fraction == pytest.approx(0.5)
    assert step_of(1.5, SCHEDULE) is None and step_of(0.0, SCHEDULE) is None


def session(schedule=SCHEDULE):
    engine = HybridCache(Profile.uniform("taylor-1", 1, 4), Schedule(interval=2, warmup=1))
    return PassSession(engine, schedule)


def run_calls(s, calls):
    """(sigma, hint) per call -> (step, computing, began, branch id) per call."""
    out, x = [], torch.zeros(1, 3, 4)
    for sigma, hint in calls:
        call = s.begin_call(x, sigma, hint)
        for block in range(1):
            s.active = call
            s.block(block, x, lambda: x + 1, lambda o: o, lambda st: st)
        s.end_call(call)
        s.active = None
        out.append((call.branch.step, call.computing, call.began, id(call.branch)))
    return out


def test_heun_calls_are_steps_by_sigma_not_by_count():
    s = session()
    # Heun: each step evaluates at s_k, then its correction at s_{k+1}; no correction to sigma 0
    sigmas = [1.0, 0.8, 0.8, 0.5, 0.5, 0.25, 0.25, 0.1, 0.1]
    got = run_calls(s, [(x, None) for x in sigmas])
    assert [g[0] for g in got] == [0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert [g[2] for g in got] == [True, True, False, True, False, True, False, True, False]
    # interval 2, warm-up 1, 5 steps, last computed: steps 0, 2, 4 compute; repeats follow their step
    assert [g[1] for g in got] == [True, False, False, True, True, False, False, True, True]
    assert len({g[3] for g in got}) == 1
    assert s.stats().steps.computed == 3 and s.stats().steps.forecast == 2


@pytest.mark.parametrize("hints", [[None], [(0,), (1,)]], ids=["one branch", "cond and uncond"])
def test_a_schedule_that_repeats_or_revisits_a_sigma_counts_every_step(hints):
    """Custom sigmas (ComfyUI's SIGMAS input) may repeat a value or go back up: each
    first-order step is its own step (they were taken for calls at a fraction of an earlier step)."""
    schedule = [1.0, 0.8, 0.5, 0.5, 0.25, 0.4, 0.1, 0.0]
    s = session(schedule)
    calls = [(sigma, hint) for sigma in schedule[:-1] for hint in hints]
    got = run_calls(s, calls)
    for hint_index in range(len(hints)):
        mine = got[hint_index::len(hints)]
        assert [g[0] for g in mine] == list(range(7)) and all(g[2] for g in mine)
        assert len({g[3] for g in mine}) == 1
    # interval 2, warm-up 1, 7 steps, last computed: steps 0, 2, 4, 6 compute
    assert [g[1] for g in got[::len(hints)]] == [True, False, True, False, True, False, True]


def test_split_branches_get_their_own_state_even_with_repeats():
    s = session()
    calls = [(1.0, (0,)), (1.0, (1,)), (0.8, (0,)), (0.8, (1,)), (0.8, (0,)), (0.8, (1,))]
    got = run_calls(s, calls)
    cond, uncond = {g[3] for g in got[0::2]}, {g[3] for g in got[1::2]}
    assert len(cond) == 1 and len(uncond) == 1 and cond != uncond


def test_unnamed_calls_at_one_sigma_are_numbered_into_branches():
    s = session()  # A1111 with cond and uncond in separate calls of equal shape
    got = run_calls(s, [(1.0, None), (1.0, None), (0.8, None), (0.8, None)])
    assert got[0][3] != got[1][3] and got[2][3] == got[0][3] and got[3][3] == got[1][3]


def test_without_a_schedule_each_lower_sigma_opens_a_step():
    s = session(schedule=None)
    got = run_calls(s, [(x, None) for x in (0.9, 0.7, 0.7, 0.3)])
    assert [g[0] for g in got] == [0, 1, 1, 2]


def test_ari_is_label_permutation_invariant_and_matches_sklearn():
    g = torch.Generator().manual_seed(0)
    a = Profile(torch.randint(0, 3, (4, 16), generator=g), torch.zeros(4, 3, dtype=torch.int64))
    relabelled = Profile((a.labels + 1) % 3, a.solvers)
    other = Profile(torch.randint(0, 3, (4, 16), generator=g), a.solvers)
    assert adjusted_rand_index(a, relabelled) == pytest.approx(1.0)
    expected = sum(adjusted_rand_score(x.tolist(), y.tolist()) for x, y in zip(a.labels, other.labels)) / 4
    assert adjusted_rand_index(a, other) == pytest.approx(expected)


def test_a_nested_call_is_left_to_the_outer_one():
    s = session()
    x = torch.zeros(1, 3, 4)
    inner = []

    def outer_call():
        return s.run_call(x, 1.0, None, lambda: inner.append(s.active) or x)

    s.run_call(x, 1.0, None, outer_call)
    assert len(inner) == 1 and inner[0] is not None  # ran inside the outer call's context
    assert s.calls_computed == 1 and len(s._branches) == 1
