"""The probe on a real (tiny) FluxPipeline and on hand-written sampling loops.

The tiny model has random weights on a sinusoidal timestep embedding, so its residuals are
rough over a full 1 -> 0 sigma schedule (reuse is best there); over a narrow sigma window
they move smoothly, as a trained model's do over neighbouring steps, and extrapolating
solvers can win. Both are used below."""

import json

import numpy as np
import pytest
import torch
from diffusers.hooks import HookRegistry

import hyca
from hyca.adapters.diffusers import hooks
from hyca.engine.schedule import Schedule
from hyca.math.solvers import pool, pool_names
from hyca.adapters.diffusers.probe import probe, probe_transformer
from hyca.adapters.diffusers.fingerprint import fingerprint
from hyca.probing import CALIBRATION_SAMPLES

from references import block_step_mean_error, capture_residuals, flux_blocks
from tiny import Inputs, conditioning, euler_sample, fresh_copy, sigmas, tiny_flux, tiny_pipeline

STEPS, INTERVAL, WARMUP = 16, 3, 2
SMOOTH = list(np.linspace(0.5, 0.495, STEPS))  # a narrow sigma window: smooth residuals


def generate(pipe, **extra):
    return pipe(**conditioning(), height=64, width=64, num_inference_steps=STEPS, output_type="latent",
                generator=torch.Generator().manual_seed(1), **extra).images


def run_probe(pipe, **extra):
    """The probe with eq. 5's choice alone (fast); closed-loop choosing has tests of its own."""
    settings = dict(height=64, width=64, steps=STEPS, interval=INTERVAL, warmup=WARMUP, clusters=3, progress=False,
                    selection="eq5")
    return probe(pipe, **{**settings, **conditioning(), **extra})


@pytest.fixture()
def pipe():
    return tiny_pipeline(tiny_flux())


def no_hooks_left(model):
    registries = [getattr(m, "_diffusers_hook", None) for m in [model, *flux_blocks(model)]]
    return all(r is None or not r.hooks for r in registries)


def test_probe_returns_a_valid_profile_with_json_metadata(pipe):
    profile = run_probe(pipe, sigmas=SMOOTH)
    assert profile.labels.shape == (5, 32) and profile.solvers.shape == (5, 3)
    assert int(profile.labels.min()) >= 0 and int(profile.labels.max()) < 3
    assert int(profile.solvers.max()) < len(pool())
    meta = profile.metadata
    assert meta["fingerprint"] == fingerprint(pipe.transformer)
    assert (meta["interval"], meta["warmup"], meta["positions"]) == (INTERVAL, WARMUP, "step")
    assert meta["probe"]["steps"] == STEPS and meta["probe"]["height"] == 64
    blocks = meta["selection"]["blocks"]
    assert len(blocks) == 5 and all(len(row) == 3 for row in blocks)
    assert sum(c["dims"] for c in blocks[0]) == 32
    assert meta["selection"]["targets"] == Schedule(INTERVAL, WARMUP).plan(STEPS).count(False)
    json.dumps(meta, allow_nan=False)  # what the profile file stores
    hyca.enable(pipe, profile, interval=INTERVAL, warmup=WARMUP)  # the engine takes it
    assert generate(pipe).isfinite().all()
    # 16 steps, W=2, N=3, last computed, by hand: steps 0, 1, 4, 7, 10, 13, 15 compute
    (run,) = hyca.stats(pipe)
    assert (run.computed, run.forecast) == (7, 9)


def exact_replay_error(residuals, dim_solvers, plan):
    """Replay on the exact residuals (every token, no sketch): summed squared error of
    each dimension's solver over all forecast steps, relative to the summed energy."""
    error = energy = 0.0
    for target in range(len(plan)):
        if plan[target]:
            continue
        computed = [k for k in range(target) if plan[k]][::-1]
        truth = residuals[target]  # (blocks, tokens, dim)
        forecast = torch.zeros_like(truth)
        for solver_id in dim_solvers.unique().tolist():
            solver = pool()[solver_id]
            used = computed[: solver.history]
            w = solver.weights([float(k) for k in used], float(target))
            mask = (dim_solvers == solver_id).unsqueeze(1)  # (blocks, 1, dim)
            forecast += mask * sum(wj * residuals[k] for wj, k in zip(w, used))
        error += float(((forecast - truth) ** 2).sum())
        energy += float((truth**2).sum())
    return error / energy


def test_chosen_solvers_beat_reuse_on_an_exact_replay(pipe):
    profile = run_probe(pipe, sigmas=SMOOTH)
    _, captured = capture_residuals(pipe.transformer, lambda: generate(pipe, sigmas=SMOOTH))
    residuals = torch.stack([torch.stack(captured[i:i + 5]) for i in range(0, len(captured), 5)])
    residuals = residuals.squeeze(2)  # (steps, blocks, tokens, dim)
    plan = Schedule(INTERVAL, WARMUP).plan(STEPS)
    chosen = exact_replay_error(residuals, profile.dim_solvers(), plan)
    reuse = exact_replay_error(residuals, torch.zeros_like(profile.labels), plan)
    assert chosen < 0.5 * reuse
    assert set(profile.solver_names()) != {"reuse"}


@pytest.mark.parametrize("positions", ["step", "sigma"])
def test_sketch_errors_estimate_the_exact_errors(positions):
    model, inputs = tiny_flux(), Inputs()
    window = 0.5 - 0.005 * torch.linspace(0, 1, STEPS) ** 2  # uneven: step and sigma axes differ
    loop = lambda: euler_sample(model, inputs, STEPS, velocity=window_velocity(inputs, window))  # noqa: E731
    profile = probe_transformer(model, loop, STEPS, interval=INTERVAL, warmup=WARMUP, positions=positions,
                                rows=512, progress=False, selection="eq5")
    _, captured = capture_residuals(model, loop)
    residuals = torch.stack([torch.stack(captured[i:i + 5]) for i in range(0, len(captured), 5)]).squeeze(2)
    plan = Schedule(INTERVAL, WARMUP).plan(STEPS)
    axis = window.tolist() if positions == "sigma" else [float(k) for k in range(STEPS)]
    other = [float(k) for k in range(STEPS)] if positions == "sigma" else window.tolist()
    for name in ("reuse", "taylor-1", "lagrange-3"):
        estimate = profile.metadata["selection"]["replay_error"]["uniform"][name]
        # the probe weighs every block alike and each step by target / steps; with one solver
        # everywhere, that is the weighted mean of the relative error, computed here exactly
        exact = block_step_mean_error(residuals, pool_names().index(name), plan, axis)
        assert estimate == pytest.approx(exact, rel=0.15), name
        if name == "lagrange-3":  # here the axes give 0.039 (sigma) vs 0.008 (step): the probe used the right one
            assert estimate != pytest.approx(block_step_mean_error(residuals, pool_names().index(name), plan, other),
                                             rel=0.3), name


def window_velocity(inputs, window):
    """The model evaluated along ``window`` (sigmas), in a named cond branch."""

    def velocity(model, x, sigma, step):
        with model.cache_context("cond"):
            return inputs.call(model, x, window[step])

    return velocity


def test_the_probe_leaves_the_model_bit_identical(pipe):
    never = tiny_pipeline(fresh_copy(pipe.transformer))
    before = generate(pipe)
    run_probe(pipe)
    assert torch.equal(generate(pipe), before)
    assert torch.equal(generate(pipe), generate(never))
    assert no_hooks_left(pipe.transformer)


def test_hooks_are_removed_when_the_run_raises():
    model, inputs = tiny_flux(), Inputs()
    before = euler_sample(model, inputs, 6)[0]

    def failing(m, x, sigma, step):
        if step == 3:
            raise KeyboardInterrupt  # the user stops the probe
        return inputs.call(m, x, sigma)

    with pytest.raises(KeyboardInterrupt):
        probe_transformer(model, lambda: euler_sample(model, inputs, 6, failing), 6, progress=False, selection="eq5")
    assert no_hooks_left(model)
    assert torch.equal(euler_sample(model, inputs, 6)[0], before)


def test_an_enabled_hyca_is_set_aside_and_restored(pipe):
    hyca.enable(pipe, "taylor-2", interval=INTERVAL, warmup=WARMUP)
    engine = hooks.root_hook(pipe.transformer).engine
    cached = generate(pipe)
    profile = run_probe(pipe)
    assert hooks.root_hook(pipe.transformer).engine is engine
    assert torch.equal(generate(pipe), cached)
    assert hyca.stats(pipe)[0].forecast > 0
    # the probe itself saw every step computed: its profile equals one from a plain pipeline
    hyca.disable(pipe)
    assert torch.equal(run_probe(pipe).labels, profile.labels)


def branch_loop(model, inputs, other_inputs, names):
    """Euler sampling driven by ``inputs``; each step also calls the model with
    ``other_inputs`` in a second branch (named ``names[1]``, or unnamed when None)."""
    sig = sigmas(STEPS)

    def velocity(m, x, sigma, step):
        def call(name, inp):
            if name is None:
                return inp.call(m, x, sigma)
            with m.cache_context(name):
                return inp.call(m, x, sigma)

        out = call(names[0], inputs)
        if other_inputs is not None:
            call(names[1], other_inputs)
        return out

    return lambda: euler_sample(model, inputs, STEPS, velocity)


@pytest.mark.parametrize("names", [("cond", "uncond"), (None, None)])
def test_only_the_conditional_branch_is_recorded(names):
    model, inputs, other = tiny_flux(), Inputs(seed=1), Inputs(seed=7)
    alone = probe_transformer(model, branch_loop(model, inputs, None, names), STEPS, progress=False, selection="eq5")
    both = probe_transformer(model, branch_loop(model, inputs, other, names), STEPS, progress=False, selection="eq5")
    assert torch.equal(alone.labels, both.labels) and torch.equal(alone.solvers, both.solvers)
    assert alone.metadata["selection"]["blocks"] == both.metadata["selection"]["blocks"]
    swapped = probe_transformer(model, branch_loop(model, other, None, names), STEPS, progress=False, selection="eq5")
    assert swapped.metadata["selection"]["blocks"] != both.metadata["selection"]["blocks"]


def test_a_batch_of_images_is_probed_as_one(pipe):
    profile = run_probe(pipe, num_images_per_prompt=2)
    assert profile.labels.shape == (5, 32)


def test_a_wrong_step_count_is_named():
    model, inputs = tiny_flux(), Inputs()
    with pytest.raises(RuntimeError, match="recorded 6 transformer calls .* but steps=8"):
        probe_transformer(model, lambda: euler_sample(model, inputs, 6), 8, progress=False, selection="eq5")
    with pytest.raises(RuntimeError, match="more than steps=4"):
        probe_transformer(model, lambda: euler_sample(model, inputs, 6), 4, progress=False, selection="eq5")
    assert no_hooks_left(model)


def test_a_diffusers_cache_must_be_disabled_first(pipe):
    from diffusers import FirstBlockCacheConfig

    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.2))
    with pytest.raises(RuntimeError, match="disable_cache"):
        run_probe(pipe)
    assert isinstance(HookRegistry.check_if_exists_or_initialize(pipe.transformer), HookRegistry)


@pytest.mark.parametrize("steps", [4, 8])
def test_few_step_probe_uses_only_the_history_the_schedule_provides(pipe, steps):
    """Distilled models (schnell at 4 steps, Lightning at 8) run with N=2, warm-up 1: the
    probe must work there, and may only pick solvers whose history the engine will have."""
    settings = hyca.recommended_settings(pipe, steps)
    assert (settings["interval"], settings["warmup"]) == (2, 1)
    profile = run_probe(pipe, steps=steps, interval=2, warmup=1)
    plan = Schedule(interval=2, warmup=1).plan(steps)
    computed_before_last_forecast = sum(plan[: max(i for i, c in enumerate(plan) if not c)])
    assert all(pool()[i].history <= max(1, computed_before_last_forecast) or pool()[i].name == "reuse"
               for i in profile.solvers.unique().tolist())
    hyca.enable(pipe, profile=profile, interval=2, warmup=1)
    generate_steps = pipe(**conditioning(), height=64, width=64, num_inference_steps=steps, output_type="latent")
    assert generate_steps.images.isfinite().all()
    assert hyca.stats(pipe)[0].forecast == plan.count(False)


def test_a_pipeline_names_its_own_probe_defaults():
    """The reference model's pipeline has no latent space and knows only its own captions;
    its ``hyca_probe_defaults`` are what the probe uses unless told otherwise."""
    from hyca.reference import tiny_components

    pipe = tiny_components(seed=0)
    profile = probe(pipe, steps=6, interval=2, warmup=1, clusters=2, progress=False, selection="eq5")
    defaults = type(pipe).hyca_probe_defaults
    assert profile.metadata["probe"]["prompt"] == defaults["prompt"]
    assert (profile.metadata["probe"]["height"], profile.metadata["probe"]["width"]) == (32, 32)
    batches = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: batches.append(kwargs["hidden_states"].shape[0]), with_kwargs=True)
    try:
        mine = probe(pipe, prompt="a small red circle at the center on a white background", steps=6, interval=2,
                     warmup=1, clusters=2, progress=False, selection="eq5")
    finally:
        hook.remove()
    assert mine.metadata["probe"]["prompt"] == "a small red circle at the center on a white background"
    # one caption is sampled under CALIBRATION_SAMPLES noises: one noise alone would decide the choice
    assert set(batches) == {CALIBRATION_SAMPLES}


@pytest.mark.parametrize("size", [dict(height=0), dict(width=-8), dict(height=2.5), dict(width=True)])
def test_a_probe_of_no_pixels_is_refused(size):
    """A 0-pixel probe would record empty residuals and save a profile of nothing, which
    reads as plain reuse everywhere."""
    from hyca.reference import tiny_components

    with pytest.raises(ValueError, match="must be a positive number of pixels"):
        probe(tiny_components(seed=0), steps=6, interval=2, warmup=1, **size)


@pytest.mark.parametrize("names, guided", [(("cond", "uncond"), False), ((None, None), False),
                                           (("cond", "uncond"), True), ((None, None), True)])
def test_a_schedule_that_repeats_a_sigma_is_recorded_step_by_step(names, guided):
    """A custom schedule may repeat a sigma (a helper's ``sigmas=`` with four equal values made
    the first-use probe fail: consecutive calls at one timestep were taken for one step). The
    recording of such a run equals the recording of the same run with the repeats moved by
    1e-7 (distinct timesteps, which were always recorded step by step)."""
    model, inputs, other = tiny_flux(), Inputs(seed=1), Inputs(seed=7)
    repeated = sigmas(STEPS)[:STEPS].clone()
    repeated[5:8] = repeated[4]
    nudged = repeated.clone()
    nudged[5:8] -= 1e-7 * torch.arange(1, 4)

    def loop(window):
        def velocity(m, x, sigma, step):
            def call(name, inp):
                if name is None:
                    return inp.call(m, x, window[step])
                with m.cache_context(name):
                    return inp.call(m, x, window[step])

            out = call(names[0], inputs)
            if guided:
                uncond = call(names[1], other)
                out = uncond + 2.0 * (out - uncond)
            return out

        return lambda: euler_sample(model, inputs, STEPS, velocity)

    guidance = 2.0 if guided else None
    profiles = [probe_transformer(model, loop(w), STEPS, interval=INTERVAL, warmup=WARMUP, progress=False,
                                  selection="eq5", guidance_scale=guidance) for w in (repeated, nudged)]
    errors = [p.metadata["selection"]["replay_error"]["uniform"] for p in profiles]
    for name in ("reuse", "taylor-1", "bdf2"):
        assert errors[0][name] == pytest.approx(errors[1][name], rel=1e-3), name
    assert profiles[0].metadata["selection"]["branches"] == (["cond", "uncond"] if guided else ["cond"])
