"""Never a silent NaN or Inf (issue 18 item 3): repeated sigmas give finite forecasts by
the solvers' definition (tests/test_solvers.py fuzzes them), and a forecast that still
comes out non-finite is caught where it is made: that step is computed and the stats say so."""

from __future__ import annotations

import logging

import torch
from diffusers import FlowMatchHeunDiscreteScheduler

import hyca
from hyca.engine.cache import NON_FINITE, HybridCache
from hyca.engine.schedule import Schedule
from hyca.profiles.profile import Profile

from tiny import tiny_flux, tiny_pipeline


class HeunForFlux(FlowMatchHeunDiscreteScheduler):
    """diffusers' flow-matching Heun scheduler, which evaluates every sigma but the first
    twice, taking FluxPipeline's custom ``sigmas`` argument as just their count (the
    pipeline insists on passing them; Heun's ``set_timesteps`` accepts only the count)."""

    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None, **kwargs):
        return super().set_timesteps(len(sigmas) if sigmas is not None else num_inference_steps, device=device)


def generate(pipe):
    g = torch.Generator().manual_seed(0)
    return pipe(prompt_embeds=torch.randn(1, 5, 32, generator=g), pooled_prompt_embeds=torch.randn(1, 24, generator=g),
                height=64, width=64, num_inference_steps=8, output_type="latent",
                generator=torch.Generator().manual_seed(1)).images


def test_heun_with_sigma_positions_gives_a_finite_image_with_its_forecasts(caplog):
    """Warm-up 3 computes Heun's steps 0, 1, 2 at sigmas 1, s1, s1: taylor-2's history holds
    one sigma twice. Before the solvers handled that, the whole image was NaN, silently."""
    pipe = tiny_pipeline(tiny_flux())
    pipe.scheduler = HeunForFlux()
    full = generate(pipe)
    hyca.enable(pipe, profile="taylor-2", interval=2, warmup=3, positions="sigma")
    with caplog.at_level(logging.WARNING, logger="hyca"):
        out = generate(pipe)
    (stats,) = hyca.stats(pipe)
    assert torch.isfinite(out).all() and stats.total == 15
    assert stats.forecast == 6 and stats.non_finite == 0  # forecast, not computed for safety
    assert not [r for r in caplog.records if "failed" in r.message or "not finite" in r.message]
    assert (out - full).abs().max() < (full.abs().max())  # a forecast image, not a wild one


def test_a_non_finite_forecast_is_computed_instead_and_said_once(caplog):
    """A block whose residual overflowed at one computed step (Inf in the history): every
    skip step that would forecast from it is computed instead, one note says so."""
    engine = HybridCache(Profile.uniform("taylor-1", 1, 4), Schedule(2, 2), guard=False)
    state = engine.new_state()
    computed = []
    with caplog.at_level(logging.WARNING, logger="hyca"):
        for step in range(8):
            computing = engine.begin_step(state, float(8 - step), (1, 3, 4), 8)
            computed.append(computing)
            if computing:
                residual = torch.full((1, 3, 4), float(step))
                if step == 1:
                    residual[0, 0, 0] = float("inf")
                engine.record(state, 0, residual)
            else:
                assert torch.isfinite(engine.predicted_residual(state)).all()
            engine.end_step(state)
    # N=2, warm-up 2: the schedule computes 0, 1, 3, 5, 7. Step 2 would forecast from step
    # 1's Inf: computed; step 4 forecasts from steps 3 and 2 (taylor-1's two), both finite
    assert computed == [True, True, True, True, False, True, False, True]
    assert state.stats.non_finite == 1 and state.stats.notes == [NON_FINITE]
    assert [r.message for r in caplog.records].count(f"HyCa: {NON_FINITE}") == 1


def four_steps(solver: str, shape: tuple[int, ...], value) -> tuple[list[bool], HybridCache]:
    """Four steps of an engine at N=2, warm-up 2 (steps 0, 1 and 3 computed on schedule),
    recording ``value(step)`` at each computed step; which steps computed, and the state."""
    engine = HybridCache(Profile.uniform(solver, 1, 4), Schedule(2, 2), guard=False)
    state = engine.new_state()
    computed = []
    for step in range(4):
        computed.append(engine.begin_step(state, float(4 - step), shape, 4))
        if computed[-1]:
            engine.record(state, 0, torch.full(shape, value(step)))
        engine.end_step(state)
    return computed, state


def test_a_forecast_that_overflows_from_finite_values_is_computed_instead():
    """Finite cached values can still sum past float32's range: their bound says so, the
    forecast is looked at, and the step is computed."""
    # step 2 would be 3e38 + (3e38 - (-3e38)): past float32's largest value
    computed, state = four_steps("taylor-1", (1, 3, 4), lambda step: 3e38 if step == 1 else -3e38)
    assert computed == [True, True, True, True] and state.stats.non_finite == 1


def test_a_forecast_whose_sum_overflows_is_computed_instead_as_before():
    """Every element finite but their sum past float32's range: the check has always counted
    that as not finite (the step computes and says so), and the bound keeps it so."""
    # 64 elements of 9e36 (each far from float32's 3.4e38): their sum, 5.8e38, is not
    computed, state = four_steps("reuse", (1, 16, 4), lambda step: 9e36)
    assert computed == [True, True, True, True] and state.stats.non_finite == 1


def test_the_bound_only_vouches_for_finite_forecasts():
    """:func:`bounded` against the forecast itself: whenever it says finite, the forecast is
    finite; NaN and Inf magnitudes never pass."""
    from hyca.engine.forecast import bounded, finite, forecast, magnitudes

    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        terms = int(torch.randint(1, 5, (1,), generator=g))
        scale = 10.0 ** float(torch.randint(0, 39, (1,), generator=g))
        values = [torch.randn(2, 3, 4, generator=g) * scale for _ in range(terms)]
        if trial % 7 == 0:
            values[0][0, 0, 0] = float("nan") if trial % 2 else float("inf")
        weights = torch.randn(terms, 1, generator=g) * 3
        known = bounded(magnitudes(values), weights.abs().amax(dim=1).tolist(), values[0].numel())
        if known:
            assert finite(forecast(values, weights)), trial
        if trial % 7 == 0:
            assert not known
    assert bounded([1.0, 2.0], [2.86, 4.0], 10) and not bounded([float("nan")], [1.0], 10)
    assert not bounded([float("inf")], [1.0], 10) and not bounded([1e38], [1.0], 1)
    assert not bounded([1e35], [1.0], 1000)  # each element finite, their sum past float32's range
