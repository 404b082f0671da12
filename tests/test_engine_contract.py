"""The engine contract (issue 20 item 1): every engine a host can be given implements
hyca.engine.contract.Engine, methods and parameters checked with inspect.signature
against the Protocol, and a host's facts reach the engine through it."""

from __future__ import annotations

import logging

import pytest
import torch

from hyca.engine.cache import HybridCache
from hyca.engine.contract import Engine, missing_from
from hyca.engine.schedule import Schedule
from hyca.probing.recorder import SketchRecorder
from hyca.profiles.profile import Profile
from hyca.profiles.settings import RunSettings


def engines() -> dict[str, object]:
    return {
        "HybridCache": HybridCache(Profile.uniform("taylor-1", 2, 4), Schedule(3, 2)),
        "SketchRecorder": SketchRecorder(2, 6, Schedule(3, 2)),
    }


@pytest.mark.parametrize("name", ["HybridCache", "SketchRecorder"])
def test_each_engine_implements_the_contract(name):
    engine = engines()[name]
    assert isinstance(engine, Engine)
    assert missing_from(engine) == []


def test_the_check_finds_a_missing_method_and_a_changed_signature():
    class Partial:
        positions, target = "step", "residual"

        def begin_step(self, state, position, signature):  # no total_steps, no step
            return True

    problems = missing_from(Partial())
    assert any(p.startswith("begin_step: parameters") for p in problems)
    assert "fail: missing" in problems and "record: missing" in problems


def test_fail_is_said_once_and_every_later_step_computes(caplog):
    engine = HybridCache(Profile.uniform("taylor-1", 1, 4), Schedule(3, 1), guard=False)
    state = engine.new_state()
    computed = []
    with caplog.at_level(logging.WARNING, logger="hyca"):
        for step in range(6):
            computed.append(engine.begin_step(state, float(6 - step), (1, 2, 4), 6))
            if computed[-1]:
                engine.record(state, 0, torch.ones(1, 2, 4))
            if step == 1:
                engine.fail(state, "a block hook went missing")
                engine.fail(state, "a block hook went missing")
            engine.end_step(state)
    # N=3, warm-up 1 computes 0, 3, 5 and forecasts 1, 2, 4; failed during step 1: 2 and 4 compute
    assert computed == [True, False, True, True, True, True]
    assert engine.stats(state).notes == ["a block hook went missing; every later step of this run computed"]
    assert len([r for r in caplog.records if "block hook went missing" in r.message]) == 1


def test_the_host_counts_steps_and_moves_positions_through_the_contract():
    """A WebUI pass counts steps by sigma and calls at fractions of a step: ``step=`` and
    :meth:`call_position` carry that, and the forecast follows the position (taylor-1
    through values 0 at position 0 and 1 at position 1 gives the position itself)."""
    engine = HybridCache(Profile.uniform("taylor-1", 1, 1), Schedule(4, 2), guard=False)
    state = engine.new_state()
    for step in (0, 1):
        assert engine.begin_step(state, None, (1, 1, 1), 10, step=step)
        engine.record(state, 0, torch.full((1, 1, 1), float(step)))
        engine.end_step(state)
    assert not engine.begin_step(state, None, (1, 1, 1), 10, step=3)  # the pass skipped step 2
    assert float(engine.predicted_residual(state)) == pytest.approx(3.0)
    engine.call_position(state, 3.5)
    assert float(engine.predicted_residual(state)) == pytest.approx(3.5)
    engine.begin_run(RunSettings(steps=10, shift=3.0))
    assert engine.host_run.shift == 3.0
