"""The hot path's shortcuts give the answers the plain code gave (found by a helper trying to
break them): the calling pipeline through a method a module shares, a caller's weights changed
in place, NaN and empty timesteps."""

from __future__ import annotations

import math

import pytest
import torch

from hyca.adapters.diffusers.calls import _scalar
from hyca.adapters.diffusers.runs import calling_pipeline
from hyca.engine.forecast import forecast


class Denoise:
    """A method a module class and a pipeline class both inherit."""

    def find(self, transformer: torch.nn.Module):
        return calling_pipeline(transformer)


class Wrapper(torch.nn.Module, Denoise):
    pass


class Pipe(Denoise):
    def __init__(self, transformer: torch.nn.Module) -> None:
        self.transformer, self.scheduler = transformer, object()


def test_a_method_shared_by_a_module_and_a_pipeline_still_finds_the_pipeline():
    transformer = torch.nn.Linear(1, 1)
    pipe = Pipe(transformer)
    assert Wrapper().find(transformer) is None  # the module's own call first: not a pipeline
    assert pipe.find(transformer) is pipe


def test_forecast_reads_a_callers_weights_as_they_are_now():
    history = [torch.ones(1, 2, 3)]
    weights = torch.ones(1, 1, dtype=torch.float64)  # not float32: forecast converts it
    assert torch.equal(forecast(history, weights), torch.ones(1, 2, 3))
    weights.mul_(2)
    assert torch.equal(forecast(history, weights), torch.full((1, 2, 3), 2.0))


def test_timesteps_reduce_as_torch_max_does():
    assert math.isnan(_scalar(torch.tensor([1.0, math.nan])))  # NaN wins wherever it is
    assert math.isnan(_scalar(torch.tensor([math.nan, 1.0])))
    assert _scalar(torch.tensor([3.0, 500.0, 2.0])) == 500.0 and _scalar(torch.tensor(7.0)) == 7.0
    assert _scalar(torch.arange(100.0)) == 99.0  # many values (per-token timesteps): torch's max
    with pytest.raises(RuntimeError):  # as torch's max of nothing
        _scalar(torch.tensor([]))
