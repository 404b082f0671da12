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
