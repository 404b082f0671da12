"""The hot path's two forms (issue 20 item 8): small tensors take stacked passes (the guard's
check over every slot at once, the per-slot sums as rows of one tensor), large ones go slot
by slot. Both must give the same bits, and the guard's errors must be what the formula says:
``err(solver) = || sum_j w_j A(t_j) - A(now) ||^2`` per batch item (hyca/engine/guard.py)."""

from __future__ import annotations

import pytest
import torch

from hyca.engine import cache as cache_module
from hyca.engine import guard
from hyca.engine.cache import HybridCache
from hyca.engine.schedule import Schedule
from hyca.math.solvers import pool, pool_names
from hyca.profiles.profile import Profile

NAMES = pool_names()


def _histories(seed: int, slots: int, terms: int, batch: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(seed)
    histories = [[torch.randn(batch, 12, 16, generator=g).to(dtype) for _ in range(max(1, terms - s % 2))]
                 for s in range(slots)]
    actuals = [torch.randn(batch, 12, 16, generator=g).to(dtype) for _ in range(slots)]
    return histories, actuals


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 3])
def test_stacked_and_per_slot_checks_agree_bit_for_bit_and_match_the_formula(monkeypatch, dtype, batch):
    histories, actuals = _histories(batch, slots=4, terms=4, batch=batch, dtype=dtype)
    positions, target = [36.0, 32.0, 28.0, 24.0], 40.0
    active = [NAMES.index(n) for n in ("taylor-3", "am2", "bdf2", "taylor-2") for _ in range(batch)]
    judged = [True, True, False, True]
    stacked = guard.measure(histories, positions, target, actuals, active, judged, 9, rows=8, items=batch)
    monkeypatch.setattr(guard, "STACKED_BYTES", 0)
    per_slot = guard.measure(histories, positions, target, actuals, active, judged, 9, rows=8, items=batch)
    assert torch.equal(stacked.errors, per_slot.errors) and torch.equal(stacked.energy, per_slot.energy)
    for a, b in zip(stacked.sketches, per_slot.sketches):
        assert (a is None and b is None) or torch.equal(a, b)
    # the formula, in float64 from the solvers' own weights
    for r, row in enumerate(stacked.table):
        s, item = r // batch, r % batch
        truth = actuals[s][item].double()
        if len(row) == 1:
            assert stacked.errors[r].abs().sum() == 0
            continue
        assert stacked.energy[r].item() == pytest.approx(truth.square().sum().item(), rel=1e-6)
        for c, solver in enumerate(row):
            n = min(len(histories[s]), pool()[solver].history)
            w = pool()[solver].weights(positions[:n], target)
            forecast = sum(float(wj) * histories[s][j][item].double() for j, wj in enumerate(w))
            assert stacked.errors[r, c].item() == pytest.approx((forecast - truth).square().sum().item(), rel=1e-5)


def _profile(one_solver_blocks: bool = False) -> Profile:
    """Three blocks of 16 dims, each dimension's solver drawn from four; with
    ``one_solver_blocks`` the first two blocks each use one solver for every dimension (the
    stacked path's one-slot update) and the third stays mixed."""
    g = torch.Generator().manual_seed(3)
    choices = torch.tensor([NAMES.index(n) for n in ("taylor-1", "taylor-2", "am2", "reuse")])
    dim_solvers = choices[torch.randint(0, 4, (3, 16), generator=g)]
    if one_solver_blocks:
        dim_solvers[0], dim_solvers[1] = choices[0], choices[2]
    return Profile(labels=torch.arange(16).repeat(3, 1), solvers=dim_solvers, metadata={})


def _run(engine: HybridCache) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 3, 2, 12, 16, generator=g)
    state, forecasts = engine.new_state(), []
    for step in range(20):
        if engine.begin_step(state, 1.0 - step / 20, (2, 12, 16), 20):
            for block in range(3):
                engine.record(state, block, base[0, block] + 0.1 * step * base[1, block] + 0.01 * step ** 2 * base[2, block])
        else:
            forecasts.append(engine.predicted_residual(state).clone())
        engine.end_step(state)
    return forecasts


@pytest.mark.parametrize("one_solver_blocks", [False, True])
@pytest.mark.parametrize("use_guard", [True, False])
def test_stacked_and_per_slot_recording_give_the_same_forecasts(monkeypatch, use_guard, one_solver_blocks):
    profile = _profile(one_solver_blocks)
    stacked = _run(HybridCache(profile, Schedule(3, 2), guard=use_guard, compare_settings=False))
    monkeypatch.setattr(cache_module, "STACKED_BYTES", 0)
    monkeypatch.setattr(guard, "STACKED_BYTES", 0)
    per_slot = _run(HybridCache(profile, Schedule(3, 2), guard=use_guard, compare_settings=False))
    assert len(stacked) == len(per_slot) > 5
    assert all(torch.equal(a, b) for a, b in zip(stacked, per_slot))


def test_every_candidate_in_one_pass_equals_the_engine_kernel_bit_for_bit():
    """The guard replays each candidate as a skip step would forecast it: with the engine's
    kernel (hyca.engine.forecast.forecast) on that solver's weights, short histories included."""
    from hyca.engine.forecast import forecast, solver_weights

    g = torch.Generator().manual_seed(4)
    for terms in range(1, 5):
        history = [torch.randn(2, 8, 16, generator=g) for _ in range(terms)]
        positions = [10.0 - 2 * j for j in range(terms)]
        together = guard.predict_all(history, positions, 12.0, list(range(len(pool()))))
        for solver in range(len(pool())):
            n = min(terms, pool()[solver].history)
            weights = solver_weights(solver, tuple(positions[:n]), 12.0)
            assert torch.equal(together[solver], forecast(history[:len(weights)], weights))
