"""Inference only, engine side (issue 18 item 4): a run's cached tensors never hold an
autograd graph, and a forecast is no part of one, even when the host records residuals
computed with gradients enabled."""

from __future__ import annotations

import torch

from hyca.engine.cache import HybridCache
from hyca.engine.schedule import Schedule
from hyca.profiles.profile import Profile


def test_recorded_residuals_and_forecasts_carry_no_graph():
    weight = torch.randn(4, 4, requires_grad=True)
    engine = HybridCache(Profile.uniform("taylor-2", 2, 4), Schedule(3, 2), guard=True)
    state = engine.new_state()
    forecasts = []
    for step in range(9):
        if engine.begin_step(state, float(9 - step), (1, 5, 4), 9):
            for block in range(2):
                residual = (torch.full((1, 5, 4), float(step + block)) @ weight)  # part of a graph
                assert residual.grad_fn is not None
                engine.record(state, block, residual)
        else:
            forecasts.append(engine.predicted_residual(state))
        engine.end_step(state)
        cached = [t for h in state.histories for t in h]
        assert cached and not any(t.requires_grad or t.grad_fn is not None for t in cached)
    assert len(forecasts) == 4  # computed 0, 1, 4, 7, 8
    assert not any(f.requires_grad or f.grad_fn is not None for f in forecasts)
