import pytest

from hyca.engine.schedule import Schedule


def computed(plan):
    return [i for i, c in enumerate(plan) if c]


def test_warmup_then_one_step_in_every_interval():
    # W=3, N=4: steps 0,1,2 warm up; step 2 opens the first cycle
    assert computed(Schedule(interval=4, warmup=3, compute_last=False).plan(14)) == [0, 1, 2, 6, 10]


def test_compute_last_adds_the_final_step():
    assert computed(Schedule(interval=4, warmup=3, compute_last=True).plan(14)) == [0, 1, 2, 6, 10, 13]
    # unknown length: nothing to add
    assert Schedule(interval=4, warmup=3).computes(13, None) is False


def test_interval_one_computes_everything():
    assert all(Schedule(interval=1, warmup=1).plan(9))


def test_fraction_is_the_flops_ratio():
    s = Schedule(interval=6, warmup=1, compute_last=False)
    assert s.computed_fraction(49) == pytest.approx(9 / 49)  # steps 0, 6, ..., 48


@pytest.mark.parametrize("kwargs, message", [
    (dict(interval=0), "interval must be an integer >= 1"),
    (dict(warmup=0), "warmup must be an integer >= 1"),
    (dict(interval=2.5), "interval must be an integer"),
])
def test_bad_settings_are_explained(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Schedule(**kwargs)


def test_a_short_first_interval_spaces_the_history_sooner():
    # W=3, N=6, first interval 2: the first step after warm-up computed two steps later, then every 6
    short = Schedule(interval=6, warmup=3, first_interval=2)
    assert computed(short.plan(28)) == [0, 1, 2, 4, 10, 16, 22, 27]
    assert Schedule(interval=6, warmup=3, first_interval=6).plan(28) == Schedule(6, 3).plan(28)
    assert Schedule(6, 3).with_first_interval(6).first_interval is None  # the paper's schedule, one spelling
    with pytest.raises(ValueError, match="first_interval must be an integer from 1 to interval=6"):
        Schedule(interval=6, warmup=3, first_interval=7)


@pytest.mark.parametrize("steps, interval", [(28, 6), (50, 4), (20, 3), (20, 8), (50, 8)])
def test_the_short_start_never_computes_more_steps(steps, interval):
    paper = Schedule(interval, 3)
    short = paper.short_start(steps)
    if short is None:
        # no first interval from 2 up keeps the budget: every one of them was tried
        assert all(sum(Schedule(interval, 3, first_interval=f).plan(steps)) > sum(paper.plan(steps))
                   for f in range(2, interval))
        return
    assert sum(short.plan(steps)) <= sum(paper.plan(steps))
    assert all(sum(Schedule(interval, 3, first_interval=f).plan(steps)) > sum(paper.plan(steps))
               for f in range(2, short.first_interval))  # the shortest that fits


def test_an_interval_beyond_a_short_run_gives_advice_that_still_caches():
    """With two steps or fewer after the warm-up, "use an N below 2" would mean N=1, which
    computes every step: the advice is then more steps or a shorter warm-up (and one step
    is one step)."""
    two_left = Schedule(interval=4, warmup=3).interval_beyond(5)  # steps 3 forecast, 4 (the last) computed
    assert "of the 2 steps after the warm-up it computes 1 and forecasts 1" in two_left
    assert two_left.endswith("use more steps or a shorter warm-up") and "N below" not in two_left
    one_left = Schedule(interval=4, warmup=3, compute_last=False).interval_beyond(4)
    assert "of the 1 step after the warm-up it computes 0 and forecasts 1" in one_left
    assert Schedule(interval=20, warmup=2).interval_beyond(12).endswith("use an N below 10")


def test_numpy_integers_are_integers():
    """A sweep over ``np.arange`` passes numpy integers (a helper saw ``interval=np.int64(4)``
    refused as if 4 were invalid); they plan as the Python int does, bools stay refused."""
    import numpy as np

    schedule = Schedule(np.int64(4), np.int32(3), first_interval=np.int64(2))
    assert type(schedule.interval) is int and schedule == Schedule(4, 3, first_interval=2)
    assert schedule.plan(20) == Schedule(4, 3, first_interval=2).plan(20)
    with pytest.raises(ValueError, match="interval must be an integer"):
        Schedule(np.bool_(True), 3)
