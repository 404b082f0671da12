"""ResidualMeter: the residual of a block is out - in with the input as it was before the call,
for blocks that leave their input alone and for blocks that update it in place."""

from __future__ import annotations

import pytest
import torch

from hyca.engine.residual import ResidualError, ResidualMeter


def out_of_place(x: torch.Tensor) -> torch.Tensor:
    return x * 2 + 1


def in_place(x: torch.Tensor) -> torch.Tensor:
    x.mul_(2).add_(1)  # like Forge Neo's `img += ...`: the same tensor comes back, changed
    return x


@pytest.mark.parametrize("block", [out_of_place, in_place])
@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_residual_is_the_change_the_block_made(block, mode):
    meter = ResidualMeter()
    with mode():
        for _ in range(3):  # first call learns, later calls use what was learned
            x = torch.randn(2, 5, 4)
            expected = out_of_place(x.clone()) - x.clone()
            snapshot = meter.before("b", x)
            assert torch.allclose(meter.residual(snapshot, block(x)), expected)
    assert meter.writes_in_place("b") is (block is in_place)


def test_a_view_of_a_concatenated_stream():
    """Single blocks see cat(txt, img); the output-reaching part is a view of the tail."""
    meter = ResidualMeter()
    for _ in range(2):
        x = torch.randn(1, 7, 3)
        tail = x[:, -4:]
        before = tail.clone()
        snapshot = meter.before(0, tail)
        in_place(x)
        assert torch.allclose(meter.residual(snapshot, x[:, -4:]), out_of_place(before) - before)


def test_a_block_that_starts_writing_in_place_is_an_error_not_a_zero_residual():
    meter = ResidualMeter()
    x = torch.randn(3, 4)
    meter.residual(meter.before(0, x), out_of_place(x))  # learned: out of place, no copies from now on
    x = torch.randn(3, 4)
    snapshot = meter.before(0, x)
    assert snapshot.copy is None
    with pytest.raises(ResidualError, match="in place"):
        meter.residual(snapshot, in_place(x))
    assert meter.writes_in_place(0) is True  # the next call keeps a copy
    x = torch.randn(3, 4)
    before = x.clone()
    assert torch.allclose(meter.residual(meter.before(0, x), in_place(x)), out_of_place(before) - before)
