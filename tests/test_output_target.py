"""Profiles that forecast the output head's input (``target="output"``) instead of the blocks'
residuals: checked against a reference written with plain torch hooks on an unpatched model."""

from __future__ import annotations

import pytest
import torch

import hyca
from hyca.adapters.diffusers.families import family_of, head_of
from hyca.adapters.diffusers.fingerprint import fingerprint
from hyca.adapters.diffusers.probe import probe_transformer
from hyca.engine.schedule import Schedule
from hyca.math.solvers import get_solver
from hyca.profiles import Profile, load_profile, save_profile

from tiny import Inputs, euler_sample, fresh_copy, tiny_flux
from tiny_families import CASES

STEPS, INTERVAL, WARMUP = 10, 3, 2


def output_profile(solver: str, dim: int) -> Profile:
    profile = Profile.uniform(solver, 1, dim)
    profile.metadata["target"] = "output"
    return profile


def reference_run(model, inputs, solver: str, plan: list[bool]) -> torch.Tensor:
    """Euler sampling where, on steps the plan skips, every block passes its inputs through and
    proj_out's input is the solver's extrapolation of its inputs on the computed steps."""
    history: list[tuple[int, torch.Tensor]] = []
    step = {"now": 0}

    def head(module, args):
        k = step["now"]
        if plan[k]:
            history.insert(0, (k, args[0].clone()))
            return None
        rule = get_solver(solver)
        used = history[: rule.history]
        weights = rule.weights([float(s) for s, _ in used], float(k))
        return (sum(float(w) * v for w, (_, v) in zip(weights, used)),)

    def block(module, args, kwargs, output):  # a skipped block hands back what it got
        if plan[step["now"]]:
            return output
        return (kwargs["encoder_hidden_states"], kwargs["hidden_states"])

    handles = [model.proj_out.register_forward_pre_hook(head)]
    handles += [b.register_forward_hook(block, with_kwargs=True)
                for b in list(model.transformer_blocks) + list(model.single_transformer_blocks)]

    def velocity(m, x, sigma, k):
        step["now"] = k
        return inputs.call(m, x, sigma)

    try:
        return euler_sample(model, inputs, STEPS, velocity)[0]
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("solver", ["reuse", "taylor-1", "taylor-2"])
def test_output_profiles_forecast_the_heads_input(solver):
    model, inputs = tiny_flux(), Inputs()
    plan = Schedule(INTERVAL, WARMUP).plan(STEPS)
    expected = reference_run(fresh_copy(model), inputs, solver, plan)
    hyca.enable(model, profile=output_profile(solver, 32), interval=INTERVAL, warmup=WARMUP, guard=False,
                scheduler=None)
    try:
        with torch.no_grad():
            result = euler_sample(model, inputs, STEPS, lambda m, x, s, i: _known_length(m, inputs, x, s))[0]
        stats = hyca.stats(model)[0]
    finally:
        hyca.disable(model)
    torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-5)
    assert (stats.computed, stats.forecast) == (sum(plan), STEPS - sum(plan))
    assert torch.equal(euler_sample(model, inputs, STEPS)[0], euler_sample(fresh_copy(model), inputs, STEPS)[0])


def _known_length(model, inputs, x, sigma):
    with model.cache_context("cond", num_inference_steps=STEPS):
        return inputs.call(model, x, sigma)


def test_output_profiles_fit_the_head_and_round_trip(tmp_path):
    model = tiny_flux()
    fp = fingerprint(model)
    profile = output_profile("taylor-1", 32)
    path = save_profile(profile, tmp_path / "out.safetensors", fp)
    loaded = load_profile(path, fp)
    assert (loaded.num_blocks, loaded.dim) == (1, 32) and loaded.metadata["target"] == "output"
    (engine,) = hyca.enable(model, profile=loaded, interval=INTERVAL, warmup=WARMUP)
    assert engine.target == "output"
    hyca.disable(model)
    with pytest.raises(ValueError, match="profile is for 1 blocks x 16 dims"):
        hyca.enable(model, profile=output_profile("reuse", 16))


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_family_with_a_head_runs_an_output_profile(name):
    """Each family's head is a Linear whose input is its hidden size; a cached run with an
    output profile computes the planned steps and stays finite."""
    case = CASES[name]
    pipe = case.build()
    head = head_of(pipe.transformer, family_of(pipe.transformer))
    if head is None:
        assert family_of(pipe.transformer).head is None  # left out on purpose (Z-Image: one head per patch size)
        return
    profiles = {e: output_profile("taylor-1", head_of(getattr(pipe, e), family_of(getattr(pipe, e))).in_features)
                for e in case.experts}
    hyca.enable(pipe, profile=profiles if len(case.experts) > 1 else profiles["transformer"], interval=INTERVAL,
                warmup=WARMUP)
    try:
        out = case.run(pipe, 8)
        stats = hyca.stats(pipe)
    finally:
        hyca.disable(pipe)
    assert torch.isfinite(out).all() and sum(s.forecast for s in stats) > 0


@pytest.mark.parametrize("target", ["residual", "output"])
def test_the_probe_keeps_to_a_target_when_asked(target):
    model, inputs = tiny_flux(), Inputs()
    loop = lambda: euler_sample(model, inputs, STEPS)  # noqa: E731
    profile = probe_transformer(model, loop, STEPS, interval=INTERVAL, warmup=WARMUP, progress=False, target=target,
                                candidates=("reuse", "taylor-1"))
    assert profile.metadata.get("target", "residual") == target
    names = [t["name"] for t in profile.metadata["selection"]["closed_loop"]["trials"]]
    assert all(n.startswith("output") == (target == "output") for n in names)


@pytest.mark.parametrize("solver", ["reuse", "taylor-1", "taylor-2", "bdf2"])
def test_forecasting_the_heads_input_gives_the_image_of_forecasting_the_model_output(solver):
    """Why the probe leaves the output head's tracks out where it tries the model output: the
    head is a Linear (a linear map away from the model output), and a solver's weights sum to
    one, so ``proj_out(sum w x) = sum w proj_out(x)``: with the guard off (it judges in each
    target's own space) both targets sample the same image, up to float rounding."""
    model, inputs = tiny_flux(), Inputs()
    head = head_of(model, family_of(model))
    channels = head.out_features
    images = {}
    for target, dim in (("output", head.in_features), ("model_output", channels)):
        profile = Profile.uniform(solver, 1, dim)
        profile.metadata["target"] = target
        hyca.enable(model, profile=profile, interval=INTERVAL, warmup=WARMUP, guard=False)
        try:
            images[target] = euler_sample(model, inputs, STEPS)[0]
            assert hyca.stats(model)[0].forecast > 0
        finally:
            hyca.disable(model)
    full = euler_sample(model, inputs, STEPS)[0]
    assert (images["output"] - full).abs().max() > 1e-3  # forecasts made a difference
    torch.testing.assert_close(images["output"], images["model_output"], rtol=1e-4, atol=1e-5)


def test_the_output_head_is_tried_only_where_the_model_output_is_not():
    """By default the closed loop tries the model output's tracks and not the head's; a host
    that offers the head alone (no model output) still gets the head's tracks."""
    from hyca.adapters.diffusers.probe import TransformerHost
    from hyca.probing import probe_host
    from hyca.profiles.settings import RunSettings

    model, inputs = tiny_flux(), Inputs()
    host = TransformerHost(model, lambda: euler_sample(model, inputs, STEPS), STEPS)
    schedule = Schedule(interval=INTERVAL, warmup=WARMUP)

    def names() -> set[str]:
        profile = probe_host(host, RunSettings(steps=STEPS), schedule, progress=False, candidates=("reuse", "taylor-1"))
        return {t["name"] for t in profile.metadata["selection"]["closed_loop"]["trials"]}

    both = names()
    assert "model:eq5" in both and "eq5" in both and not any(n.startswith("output") for n in both), both
    host.model_output = False
    head_only = names()
    assert "output:eq5" in head_only and not any(n.startswith("model") for n in head_only), head_only
