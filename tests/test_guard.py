"""The runtime guard (hyca/engine/guard.py) on synthetic residual trajectories, driven through
the engine's own interface (begin_step / record / end_step) as the hooks drive it.

Expected values are worked out here from the schedule: which computed steps are steady
checks, when two lost checks in a row demote, and which lower order wins on data built to
make it win."""

from __future__ import annotations

import math

import pytest
import torch

from hyca.engine.cache import HybridCache
from hyca.engine.guard import LADDER, SKETCH_ROWS, STRIKES, lower_orders, steady
from hyca.engine.schedule import Schedule
from hyca.math.solvers import pool_names
from hyca.profiles.profile import Profile

STEPS, INTERVAL, WARMUP, DIM, TOKENS = 30, 4, 3, 8, 16


def drive(engine: HybridCache, trajectories: dict[str, callable], steps: int = STEPS) -> dict[str, list[bool]]:
    """Run ``steps`` steps; each branch's single block reports ``trajectory(step)`` when the
    step is computed. Returns, per branch, which steps were computed."""
    states = {name: engine.new_state() for name in trajectories}
    computed = {name: [] for name in trajectories}
    for step in range(steps):
        for name, trajectory in trajectories.items():
            state = states[name]
            computing = engine.begin_step(state, position=float(steps - step), signature=(1, TOKENS, DIM),
                                          total_steps=steps)
            computed[name].append(computing)
            if computing:
                engine.record(state, 0, trajectory(step))
            else:
                engine.predicted_residual(state)
            engine.end_step(state)
    drive.states = states  # for the assertions below
    return computed


def uniform(solver: str) -> Profile:
    return Profile.uniform(solver, 1, DIM)


#: Computed steps whose forecast replay has the target and two newest history points N apart,
#: written out by hand: 30 steps, N=4, warm-up 3 compute 0 1 2 | 6 10 14 18 22 26 | 29; 6 has
#: history 2, 1 (not N apart), 29 is 3 after 26.
STEADY_CHECKS = [10, 14, 18, 22, 26]


def linear(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(TOKENS, DIM, generator=g), torch.randn(TOKENS, DIM, generator=g)
    return (a + 0.1 * step * b).unsqueeze(0)


def noise(seed: int):
    def trajectory(step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed * 1000 + step)
        return torch.randn(1, TOKENS, DIM, generator=g)

    return trajectory


def test_ladder_and_steady_checks():
    names = pool_names()
    assert [names[i] for i in lower_orders(names.index("lagrange-4"))] == list(LADDER)
    assert [names[i] for i in lower_orders(names.index("taylor-1"))] == ["reuse"]
    assert lower_orders(names.index("reuse")) == []
    # warm-up 0, 1, 2 then every 4th: 6 (history 2, 1: not steady), 10 (6, 2), 14 (10, 6), ...
    done = [k for k, c in enumerate(Schedule(INTERVAL, WARMUP).plan(STEPS)) if c]
    assert [k for i, k in enumerate(done) if steady([k, *reversed(done[:i])], INTERVAL)] == STEADY_CHECKS
    assert not steady([29, 26, 22], INTERVAL)  # the computed last step is closer than N


@pytest.mark.parametrize("solver", ["taylor-1", "taylor-2", "lagrange-3"])
def test_an_accurate_solver_is_never_demoted(solver):
    engine = HybridCache(uniform(solver), Schedule(INTERVAL, WARMUP), guard=True)
    drive(engine, {"cond": linear})  # exact for every solver of degree >= 1
    assert drive.states["cond"].stats.switches == []
    assert drive.states["cond"].active == [pool_names().index(solver)]


@pytest.mark.parametrize("solver", ["taylor-1", "taylor-2", "lagrange-3"])
def test_a_diverging_solver_is_demoted_after_two_lost_steady_checks(solver):
    """Independent noise every step: any extrapolation misses by more than reuse (for
    i.i.d. values, reuse's expected squared error is 2, taylor-1's 6), so the solver
    loses every steady check and is demoted at the STRIKES-th one."""
    engine = HybridCache(uniform(solver), Schedule(INTERVAL, WARMUP), guard=True)
    drive(engine, {"cond": noise(1)})
    (demotion,) = drive.states["cond"].stats.switches
    assert demotion.step == STEADY_CHECKS[STRIKES - 1]
    assert demotion.solver == solver and demotion.to in LADDER


def test_demoted_forecasts_use_the_lower_order_from_then_on():
    guarded = HybridCache(uniform("taylor-2"), Schedule(INTERVAL, WARMUP), guard=True)
    drive(guarded, {"cond": noise(2)})
    (demotion,) = drive.states["cond"].stats.switches
    # the same trajectory forecast by a profile that uses the demoted-to solver from the
    # start gives the same forecasts after the demotion step
    after = [s for s in range(demotion.step + 1, STEPS) if not Schedule(INTERVAL, WARMUP).computes(s, STEPS)]
    expected, got = [], []
    for engine, sink in ((HybridCache(uniform(demotion.to), Schedule(INTERVAL, WARMUP), guard=False), expected),
                         (HybridCache(uniform("taylor-2"), Schedule(INTERVAL, WARMUP), guard=True), got)):
        state, trajectory = engine.new_state(), noise(2)
        for step in range(STEPS):
            if engine.begin_step(state, float(STEPS - step), (1, TOKENS, DIM), STEPS):
                engine.record(state, 0, trajectory(step))
            elif step in after:
                sink.append(engine.predicted_residual(state))
            engine.end_step(state)
    assert len(got) == len(after) > 0
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


def test_the_guard_off_is_the_papers_engine():
    engine = HybridCache(uniform("taylor-2"), Schedule(INTERVAL, WARMUP), guard=False)
    drive(engine, {"cond": noise(1)})
    assert drive.states["cond"].stats.switches == []


def guided_pair(seed: int):
    """cond and uncond share a strong linear trend (extrapolation beats reuse on each by far)
    while their difference is pure noise (extrapolating it loses to reuse): only the
    difference of the branches shows the solver does harm under guidance."""
    trend = lambda step: 50.0 * linear(step)  # noqa: E731
    n = noise(seed)
    return {"cond": lambda step: trend(step) + n(step), "uncond": lambda step: trend(step) - n(step)}


def test_branches_that_disagree_are_demoted_together():
    engine = HybridCache(uniform("taylor-1"), Schedule(INTERVAL, WARMUP), guard=True)
    drive(engine, {"cond": guided_pair(3)["cond"]})  # one branch alone: its own checks pass
    assert drive.states["cond"].stats.switches == []

    engine = HybridCache(uniform("taylor-1"), Schedule(INTERVAL, WARMUP), guard=True)
    drive(engine, guided_pair(3))
    cond, uncond = drive.states["cond"], drive.states["uncond"]
    assert cond.active == uncond.active == [pool_names().index("reuse")]
    # each branch reports its own demotion, at the check that decided it
    assert [d.step for d in cond.stats.switches + uncond.stats.switches] == [STEADY_CHECKS[STRIKES - 1]] * 2


def test_fixed_inputs_give_identical_decisions_and_forecasts():
    runs = []
    for _ in range(2):
        engine = HybridCache(uniform("lagrange-3"), Schedule(INTERVAL, WARMUP), guard=True)
        forecasts = []
        states = {"cond": engine.new_state(), "uncond": engine.new_state()}
        pair = guided_pair(5)
        for step in range(STEPS):
            for name, state in states.items():
                if engine.begin_step(state, float(STEPS - step), (1, TOKENS, DIM), STEPS):
                    engine.record(state, 0, pair[name](step))
                else:
                    forecasts.append(engine.predicted_residual(state))
                engine.end_step(state)
        runs.append(([d for s in states.values() for d in s.stats.switches], forecasts))
    assert runs[0][0] == runs[1][0] and runs[0][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


def test_reduce_sees_every_error_before_the_decision():
    """Context parallelism: the errors are summed over ranks before deciding; a reduce that
    reports another rank's much larger reuse error keeps the solver (ranks decide alike)."""
    seen = []

    def reduce(t: torch.Tensor) -> torch.Tensor:
        seen.append(t.clone())
        if t.dim() == 2:  # the per-slot error table: pretend another rank saw reuse miss badly
            t = t.clone()
            t[:, 1:] += 1e9
        return t

    engine = HybridCache(uniform("taylor-1"), Schedule(INTERVAL, WARMUP), guard=True, reduce=reduce)
    drive(engine, {"cond": noise(1)})
    assert drive.states["cond"].stats.switches == []
    assert len([t for t in seen if t.dim() == 2]) == len(STEADY_CHECKS)
    assert not any(t.dim() == 3 for t in seen)  # one branch: no sketches to compare, none made
    assert math.isfinite(float(seen[0].sum()))
    seen.clear()
    drive(HybridCache(uniform("taylor-1"), Schedule(INTERVAL, WARMUP), guard=True, reduce=reduce), guided_pair(3))
    sketches = [t for t in seen if t.dim() == 3]
    assert len(sketches) == 2 * len(STEADY_CHECKS) and all(t.shape[1] == SKETCH_ROWS for t in sketches)


def test_a_switched_group_wins_its_solver_back_when_it_forecasts_best_again():
    """Noise until step 12, then a straight line: taylor-1 loses the steady checks at 10 and
    14 (their history is noise) and is switched to reuse; from step 22 on its history lies
    on the line, it is exact again and wins 22 and 26: it gets its group back at the second."""
    def trajectory(step):
        return 10 * noise(4)(step) if step < 12 else linear(step)

    engine = HybridCache(uniform("taylor-1"), Schedule(INTERVAL, WARMUP), guard=True)
    drive(engine, {"cond": trajectory})
    assert [(s.step, s.solver, s.to) for s in drive.states["cond"].stats.switches] == [
        (14, "taylor-1", "reuse"), (26, "reuse", "taylor-1")]


@pytest.mark.parametrize("steps, interval, expected", [
    (20, 4, 14),    # computed 0 1 2 | 6 10 14 18 | 19: judged at 10, 14, 18 (19 is 1 after 18)
    (20, 8, None),  # computed 0 1 2 | 10 18 | 19: judged at 18 only, one strike
    (28, 6, 20),    # computed 0 1 2 | 8 14 20 26 | 27: judged at 14, 20, 26
])
def test_first_switch_is_the_second_judged_check(steps, interval, expected):
    """Written out by hand from the schedule (warm-up 3, last step computed): the guard
    needs STRIKES = 2 judged checks, each with the target and two newest history values N
    apart, before it can switch anything; the mismatch note tells the user which step that is."""
    from hyca.engine.guard import first_switch
    from hyca.engine.schedule import Schedule

    assert first_switch(Schedule(interval, 3).plan(steps), interval) == expected


def test_a_profile_chosen_without_the_guard_runs_without_it_at_its_own_settings():
    """Metadata ``guard: false`` (the closed loop kept a guard-off candidate): at the profile's
    own settings the engine's guard stays out (no switch, where the same profile without the
    flag is demoted); a run off those settings takes the off-settings path with the guard on,
    exactly as the profile without the flag does."""
    def profile(unguarded: bool, steps: int) -> Profile:
        chosen = uniform("taylor-2")
        chosen.metadata.update(chosen_for={"steps": steps}, **({"guard": False} if unguarded else {}))
        return chosen

    outcomes = {}
    for unguarded in (False, True):
        for steps in (STEPS, 50):
            drive(HybridCache(profile(unguarded, steps), Schedule(INTERVAL, WARMUP)), {"cond": noise(1)})
            stats = drive.states["cond"].stats
            outcomes[unguarded, steps] = (stats.switches, stats.off_settings is not None, drive.states["cond"].active)
    assert outcomes[False, STEPS][0] and not outcomes[False, STEPS][1]  # guarded: demoted, at its settings
    assert outcomes[True, STEPS][0] == [] and outcomes[True, STEPS][2] == [pool_names().index("taylor-2")]
    assert outcomes[True, 50][1] and outcomes[True, 50] == outcomes[False, 50]  # off its settings: guarded again
    # guard=True asks for the guard whatever the profile says: the flagged profile is then
    # demoted at its own settings exactly as the one without the flag
    drive(HybridCache(profile(True, STEPS), Schedule(INTERVAL, WARMUP), guard=True), {"cond": noise(1)})
    stats = drive.states["cond"].stats
    assert (stats.switches, stats.off_settings is not None, drive.states["cond"].active) == outcomes[False, STEPS]


def test_a_run_without_the_guard_by_its_profiles_choice_says_so():
    from hyca.engine.cache import UNGUARDED

    chosen = uniform("taylor-2")
    chosen.metadata.update(chosen_for={"steps": STEPS}, guard=False)
    # guard=False / True by the caller: the caller's choice, nothing to add
    for guard, expected in ((None, [UNGUARDED]), (False, []), (True, [])):
        drive(HybridCache(chosen, Schedule(INTERVAL, WARMUP), guard=guard), {"cond": noise(1)})
        assert drive.states["cond"].stats.notes == expected
    chosen.metadata["chosen_for"] = {"steps": 50}  # off its settings: the guard is on, no such note
    drive(HybridCache(chosen, Schedule(INTERVAL, WARMUP)), {"cond": noise(1)})
    assert UNGUARDED not in drive.states["cond"].stats.notes


def test_switches_are_said_once_with_the_images_they_happened_in():
    """The same switch in several images is one entry listing them (runs of three or more
    as ranges); the branch is named when asked, the off-settings start's "by" always."""
    from hyca.engine.guard import Switch, describe_switches

    switches = [(None, Switch(14, "taylor-2", "reuse", i)) for i in (0, 1, 2, 3, 5)]
    switches += [(None, Switch(22, "reuse", "taylor-1", 1)), (None, Switch(1, "taylor-2", "reuse", by="robust start"))]
    assert describe_switches(switches) == ("taylor-2 -> reuse at step 14 (images 1-4, 6), reuse -> taylor-1 at step 22 "
                                           "(image 2), taylor-2 -> reuse at step 1 (robust start)")
    guided = [("cond", Switch(6, "am2", "taylor-1", 0)), ("uncond", Switch(6, "am2", "taylor-1", 0)),
              ("uncond", Switch(6, "am2", "taylor-1", 1))]
    assert describe_switches(guided, branches=True) == ("am2 -> taylor-1 at step 6 (image 1, cond), "
                                                        "am2 -> taylor-1 at step 6 (images 1, 2, uncond)")
