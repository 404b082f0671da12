"""The engine on a real (tiny) FluxTransformer2DModel, against independent references."""

import logging

import pytest
import torch

import hyca
from hyca import Profile
from hyca.math.solvers import pool_names

from references import (TaylorSeerFactors, capture_residuals, expected_plan, flux_output_with_residual,
                        per_block_forecast)
from tiny import Inputs, euler_sample, fresh_copy, sigmas, tiny_flux

STEPS = 14
NUM_BLOCKS, DIM = 5, 32


@pytest.fixture(scope="module")
def model():
    return tiny_flux()


@pytest.fixture(scope="module")
def inputs():
    return Inputs()


def reference_run(model, inputs, plan, forecast_total):
    """Euler sampling where skip steps rebuild the output from ``forecast_total``.

    ``forecast_total(step, residual_history)`` receives, newest first, the
    (position, per-block residuals) of every computed step so far."""
    history = []

    def velocity(m, x, sigma, step):
        if plan[step]:
            out, residuals = capture_residuals(m, lambda: inputs.call(m, x, sigma))
            history.insert(0, (float(step), residuals))
            return out
        return flux_output_with_residual(m, inputs, x, sigma, forecast_total(step, history))

    return euler_sample(model, inputs, len(plan), velocity)[0]


def hyca_run(model, inputs, steps=STEPS, **settings):
    settings.setdefault("guard", False)  # the references here are the paper's engine
    hyca.enable(model, scheduler=None, **settings)
    try:
        with torch.no_grad():
            return euler_sample(model, inputs, steps, lambda m, x, s, i: _call_known_length(m, inputs, x, s, i, steps))[0]
    finally:
        hyca.disable(model)


def _call_known_length(model, inputs, x, sigma, step, steps):
    # a hand-written loop tells the engine its length through a cache context
    with model.cache_context("cond", num_inference_steps=steps):
        return inputs.call(model, x, sigma)


def test_fora_profile_reproduces_fora(model, inputs):
    plan = expected_plan(STEPS, interval=3, warmup=2)
    reference = reference_run(model, inputs, plan, lambda step, h: sum(h[0][1]))
    result = hyca_run(model, inputs, profile="fora", interval=3, warmup=2)
    full = euler_sample(model, inputs, STEPS)[0]
    torch.testing.assert_close(result, reference, rtol=1e-5, atol=1e-5)
    assert (result - full).abs().max() > 1e-3  # forecasting changed something: the check has teeth


@pytest.mark.parametrize("order", [1, 2, 3])
def test_taylor_profile_reproduces_taylorseer(model, inputs, order):
    plan = expected_plan(STEPS, interval=4, warmup=3)
    factors = [TaylorSeerFactors(order) for _ in range(NUM_BLOCKS)]
    seen = set()

    def forecast(step, history):
        for position, residuals in reversed(history):  # feed each computed step once, oldest first
            if position not in seen:
                seen.add(position)
                for f, r in zip(factors, residuals):
                    f.update(r, position)
        return sum(f.predict(float(step)) for f in factors)

    reference = reference_run(model, inputs, plan, forecast)
    result = hyca_run(model, inputs, profile=f"taylor-{order}", interval=4, warmup=3)
    torch.testing.assert_close(result, reference, rtol=1e-4, atol=1e-4)


def hybrid_profile(seed=0):
    """Four clusters per block, five solvers, different in every block."""
    g = torch.Generator().manual_seed(seed)
    names = ["reuse", "taylor-2", "lagrange-3", "bdf3", "am2"]
    ids = torch.tensor([pool_names().index(n) for n in names])
    labels = torch.randint(0, 4, (NUM_BLOCKS, DIM), generator=g)
    solvers = ids[torch.randint(0, len(names), (NUM_BLOCKS, 4), generator=g)]
    return Profile(labels, solvers)


@pytest.mark.parametrize("positions", ["step", "sigma"])
def test_aggregated_history_equals_per_block_history(model, inputs, positions):
    profile = hybrid_profile()
    assert len(profile.solver_names()) >= 4
    plan = expected_plan(STEPS, interval=4, warmup=2)
    sig = sigmas(STEPS)
    position_of = (lambda step: float(step)) if positions == "step" else (lambda step: float(sig[step]))

    def forecast(step, history):
        depth = 4
        recent = history[:depth]
        per_block = [[residuals[l] for _, residuals in recent] for l in range(NUM_BLOCKS)]
        past = [position_of(int(p)) for p, _ in recent]
        return per_block_forecast(profile.dim_solvers(), per_block, past, position_of(step))

    reference = reference_run(model, inputs, plan, forecast)
    result = hyca_run(model, inputs, profile=profile, interval=4, warmup=2, positions=positions)
    torch.testing.assert_close(result, reference, rtol=1e-4, atol=1e-4)


def test_history_holds_one_entry_per_solver_and_cached_value(model, inputs):
    profile = hybrid_profile()
    (engine,) = hyca.enable(model, profile=profile, interval=4, warmup=2)
    try:
        with torch.no_grad():
            euler_sample(model, inputs, STEPS)
        state = next(iter(hyca.adapters.diffusers.hooks.root_hook(model).states.all_states().values()))
        expected_tensors = sum(s.history for s in engine.solvers)
        residual_bytes = inputs.batch * inputs.tokens * DIM * 4
        assert engine.history_bytes(state) == expected_tensors * residual_bytes
    finally:
        hyca.disable(model)


def test_disable_restores_bit_identical_outputs(inputs):
    untouched = tiny_flux()
    patched = fresh_copy(untouched)
    hyca.enable(patched, profile=hybrid_profile(), interval=3, warmup=1)
    with torch.no_grad():
        euler_sample(patched, inputs, STEPS)
    hyca.disable(patched)
    assert not hyca.is_enabled(patched)
    assert torch.equal(euler_sample(patched, inputs, STEPS)[0], euler_sample(untouched, inputs, STEPS)[0])


def test_branches_keep_separate_state(model):
    """cond and uncond interleaved on one patched model equal each branch run alone."""
    cond, uncond = Inputs(seed=1), Inputs(seed=2)
    settings = dict(profile="taylor-2", interval=3, warmup=2, guard=True)  # guard state is per branch too
    alone = [hyca_run(fresh_copy(model), data, **settings) for data in (cond, uncond)]

    hyca.enable(model, **settings)
    sig = sigmas(STEPS)
    x = {"cond": cond.noise.clone(), "uncond": uncond.noise.clone()}
    with torch.no_grad():
        for i in range(STEPS):
            for name, data in (("cond", cond), ("uncond", uncond)):
                with model.cache_context(name, num_inference_steps=STEPS):
                    v = data.call(model, x[name], sig[i])
                x[name] = x[name] + (sig[i + 1] - sig[i]) * v
    hyca.disable(model)
    torch.testing.assert_close(x["cond"], alone[0], rtol=0, atol=0)
    torch.testing.assert_close(x["uncond"], alone[1], rtol=0, atol=0)


def test_loop_without_context_or_reset_starts_each_generation_clean(model, inputs):
    """A hand-written loop that never opens a cache context nor resets: the second
    generation is recognised by the sampler returning to its first position."""
    hyca.enable(model, profile="taylor-1", interval=3, warmup=2)
    try:
        with torch.no_grad():
            first = euler_sample(model, inputs, STEPS)[0]
            second = euler_sample(model, inputs, STEPS)[0]
        assert hyca.stats(model)[0].computed == 6  # steps 0, 1, 4, 7, 10, 13 (unknown length: no last step)
    finally:
        hyca.disable(model)
    assert torch.equal(first, second)


def test_new_resolution_starts_clean(model):
    small, large = Inputs(side=4), Inputs(side=6)
    settings = dict(profile="taylor-2", interval=3, warmup=2, guard=True)
    expected = hyca_run(fresh_copy(model), large, **settings)
    hyca.enable(model, **settings)
    try:
        with torch.no_grad():
            euler_sample(model, small, 5)  # abandoned half-way through, then a new size
            result = euler_sample(model, large, STEPS, lambda m, x, s, i: _call_known_length(m, large, x, s, i, STEPS))[0]
    finally:
        hyca.disable(model)
    assert torch.equal(result, expected)


def test_failure_inside_hyca_falls_back_to_full_compute(model, inputs, caplog, monkeypatch):
    (engine,) = hyca.enable(model, profile="taylor-2", interval=3, warmup=2)

    def broken(state):
        raise RuntimeError("simulated fault")

    monkeypatch.setattr(engine, "predicted_residual", broken)
    try:
        with caplog.at_level(logging.WARNING, logger="hyca"), torch.no_grad():
            result = euler_sample(model, inputs, STEPS)[0]
    finally:
        hyca.disable(model)
    assert torch.equal(result, euler_sample(model, inputs, STEPS)[0])
    assert sum("forecast failed (simulated fault)" in r.message for r in caplog.records) == 1


def test_clear_errors_for_bad_setup(model):
    with pytest.raises(TypeError, match="does not support Linear yet"):
        hyca.enable(torch.nn.Linear(2, 2), profile="fora")
    with pytest.raises(ValueError, match="profile is for 3 blocks x 32 dims, but FluxTransformer2DModel has 5 blocks x 32"):
        hyca.enable(model, profile=Profile.uniform("fora", 3, 32))
    with pytest.raises(ValueError, match="profile='magic' is not 'auto', an existing profile file or a solver name: "
                                         "unknown solver 'magic'"):
        hyca.enable(model, profile="magic")
    with pytest.raises(ValueError, match="positions must be one of"):
        hyca.enable(model, profile="fora", positions="time")
    assert not hyca.is_enabled(model)


def test_refuses_to_stack_on_a_diffusers_cache(model):
    from diffusers import FirstBlockCacheConfig

    other = fresh_copy(model)
    other.enable_cache(FirstBlockCacheConfig(threshold=0.1))
    with pytest.raises(RuntimeError, match="already has a diffusers cache enabled"):
        hyca.enable(other, profile="fora")
