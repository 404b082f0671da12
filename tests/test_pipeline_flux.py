"""HyCa inside diffusers' own FluxPipeline.__call__ (tiny transformer, precomputed prompt
embeddings, latent output: the text encoders and VAE play no part in caching)."""

import logging

import pytest
import torch

import hyca

from tiny import Inputs, fresh_copy, tiny_flux, tiny_pipeline

STEPS = 12


def generate(pipe, **extra):
    g = torch.Generator().manual_seed(0)
    text = torch.randn(1, 5, 32, generator=g)
    pooled = torch.randn(1, 24, generator=g)
    return pipe(prompt_embeds=text, pooled_prompt_embeds=pooled, height=64, width=64,
                num_inference_steps=STEPS, output_type="latent",
                generator=torch.Generator().manual_seed(1), **extra).images


@pytest.fixture()
def pipe():
    return tiny_pipeline(tiny_flux())


def test_pipeline_schedule_and_reset(pipe, caplog):
    full = generate(pipe)
    hyca.enable(pipe, profile="taylor-2", interval=3, warmup=2)
    with caplog.at_level(logging.INFO, logger="hyca"):
        first = generate(pipe)
        second = generate(pipe)
    # steps 0, 1 (warm-up), 4, 7, 10 and the last one, read from the pipeline's scheduler
    assert hyca.stats(pipe)[0].computed == 6 and hyca.stats(pipe)[0].forecast == 6
    assert sum("HyCa [cond]: 6 of 12 steps computed" in r.message for r in caplog.records) == 2
    assert torch.equal(first, second)  # the pipeline reset the state after the first call
    assert not torch.equal(first, full)


def test_true_cfg_gets_one_state_per_branch(pipe, caplog):
    g = torch.Generator().manual_seed(5)
    negative = dict(negative_prompt_embeds=torch.randn(1, 5, 32, generator=g),
                    negative_pooled_prompt_embeds=torch.randn(1, 24, generator=g), true_cfg_scale=3.0)
    hyca.enable(pipe, profile="taylor-2", interval=3, warmup=2)
    with caplog.at_level(logging.INFO, logger="hyca"):
        generate(pipe, **negative)
    messages = [r.message for r in caplog.records]
    assert any("HyCa [cond]: 6 of 12 steps computed" in m for m in messages)
    assert any("HyCa [uncond]: 6 of 12 steps computed" in m for m in messages)
    # hyca.stats gives the branch that ran last (FluxPipeline: cond, then uncond), named
    latest = hyca.stats(pipe)[0]
    assert latest.branch == "uncond" and latest.describe().startswith("[uncond] 6 of 12 steps computed")


def test_disable_is_bit_identical_to_a_never_patched_pipeline():
    base = tiny_flux()
    never = tiny_pipeline(base)
    patched = tiny_pipeline(fresh_copy(base))
    hyca.enable(patched, profile="lagrange-3", interval=4, warmup=2)
    generate(patched)
    hyca.disable(patched)
    assert torch.equal(generate(patched), generate(never))


def test_enable_twice_replaces_the_settings(pipe):
    hyca.enable(pipe, profile="fora", interval=2, warmup=1)
    hyca.enable(pipe, profile="taylor-1", interval=4, warmup=2)
    generate(pipe)
    assert hyca.stats(pipe)[0].computed == 5  # 0, 1, 5, 9, 11
    hyca.disable(pipe)
    assert not hyca.is_enabled(pipe)


def probe_settings():
    g = torch.Generator().manual_seed(0)
    return dict(prompt_embeds=torch.randn(1, 5, 32, generator=g), pooled_prompt_embeds=torch.randn(1, 24, generator=g),
                height=32, width=32, steps=8, clusters=2, progress=False)


def test_auto_profile_probes_once_then_comes_from_the_cache(pipe, tmp_path, monkeypatch):
    monkeypatch.setenv("HYCA_CACHE", str(tmp_path))
    monkeypatch.setenv("HYCA_HUB_REPO", "none")
    monkeypatch.setenv("HYCA_PROFILES", str(tmp_path / "nothing-here"))
    (first,) = hyca.enable(pipe, interval=3, warmup=2, probe_kwargs=probe_settings())
    saved = list(tmp_path.glob("*.safetensors"))
    assert len(saved) == 1 and first.profile.metadata.get("probe", {}).get("steps") == 8
    out_first = generate(pipe)  # a call at STEPS: a profile for its own settings is probed once
    assert len(list(tmp_path.glob("*.safetensors"))) == 2

    def no_probe(*args, **kwargs):
        raise AssertionError("the cached profile should have been used")

    monkeypatch.setattr("hyca.adapters.diffusers.probe.probe", no_probe)
    (second,) = hyca.enable(pipe, interval=3, warmup=2)
    assert torch.equal(generate(pipe), out_first)
    (third,) = hyca.enable(pipe, interval=3, warmup=2, num_inference_steps=8)
    assert torch.equal(third.profile.labels, first.profile.labels)
    assert torch.equal(third.profile.solvers, first.profile.solvers)

    (from_file,) = hyca.enable(pipe, profile=str(saved[0]), interval=3, warmup=2)
    assert torch.equal(from_file.profile.labels, first.profile.labels)


def test_auto_profile_for_a_bare_transformer_needs_a_file(tmp_path, monkeypatch):
    from hyca.profiles.io import ProfileError

    monkeypatch.setenv("HYCA_CACHE", str(tmp_path))
    monkeypatch.setenv("HYCA_HUB_REPO", "none")
    monkeypatch.setenv("HYCA_PROFILES", str(tmp_path / "nothing-here"))
    with pytest.raises(ProfileError, match="python -m hyca probe"):
        hyca.enable(tiny_flux(), interval=3, warmup=2)


@pytest.mark.parametrize("kwargs, message", [
    (dict(interval=True), "interval must be an integer"),
    (dict(compute_last="no"), "compute_last must be None, True or False"),
    (dict(guard="yes"), "guard must be True or False"),
    (dict(cache_dtype=torch.int8), "cache_dtype must be None"),
    (dict(guidance_scale=float("nan")), "guidance_scale must be a number"),
    (dict(guidance_scale=-1.0), "guidance_scale must be a number"),
    (dict(num_inference_steps=0), "num_inference_steps must be a positive integer"),
    (dict(profile={"transformer": "fora", "transformer_3": "fora"}), "transformer_3"),
    (dict(scheduler="x"), "scheduler must be the diffusers scheduler"),
    (dict(probe_kwargs="x"), "probe_kwargs must be a dict"),
])
def test_settings_that_would_be_misread_are_refused(pipe, kwargs, message):
    settings = {**dict(profile="fora", interval=3, warmup=2), **kwargs}
    with pytest.raises((ValueError, KeyError), match=message):
        hyca.enable(pipe, **settings)
    assert not hyca.is_enabled(pipe)


def test_numpy_scalars_are_numbers(pipe, tmp_path, monkeypatch):
    """Settings read from arrays or configs arrive as numpy scalars: they mean what the
    Python numbers mean (the run settings stay plain, JSON-writable numbers)."""
    import numpy as np

    monkeypatch.setenv("HYCA_CACHE", str(tmp_path))
    monkeypatch.setenv("HYCA_HUB_REPO", "none")
    settings = hyca.recommended_settings(pipe, np.int64(28), speedup=np.float32(3.0))
    assert settings["num_inference_steps"] == 28 and type(settings["num_inference_steps"]) is int
    hyca.enable(pipe, profile="taylor-1", interval=4, warmup=3, num_inference_steps=np.int64(28),
                guidance_scale=np.float32(2.5))
    assert hyca.is_enabled(pipe)
    hyca.disable(pipe)
    with pytest.raises(ValueError, match="num_inference_steps must be a positive integer"):
        hyca.recommended_settings(pipe, True)
    with pytest.raises(ValueError, match="speedup must be a number"):
        hyca.recommended_settings(pipe, 28, speedup=True)


def test_a_cache_dtype_by_name_is_the_dtype(pipe):
    (engine,) = hyca.enable(pipe, profile="fora", interval=3, warmup=2, cache_dtype="bfloat16")
    assert engine.cache_dtype is torch.bfloat16
    hyca.disable(pipe)


def test_a_loop_driven_by_another_scheduler_still_caches_and_says_the_count_is_unknown(caplog):
    """enable(scheduler=s) then a loop with a new scheduler: s has finished its run, so it
    is not what drives the calls; the step count is unknown (said once), caching goes on."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    model, inputs = tiny_flux(), Inputs()
    enabled_with = FlowMatchEulerDiscreteScheduler()

    def loop(scheduler, steps):
        scheduler.set_timesteps(steps)
        x = inputs.noise.clone()
        with torch.no_grad():
            for t in scheduler.timesteps:
                x = scheduler.step(inputs.call(model, x, (t / 1000).reshape(1)), t, x, return_dict=False)[0]

    hyca.enable(model, profile="taylor-1", interval=3, warmup=2, scheduler=enabled_with)
    try:
        loop(enabled_with, 12)
        assert hyca.stats(model)[0].computed == 6  # 0, 1, 4, 7, 10, 11 (the last step known and computed)
        with caplog.at_level(logging.WARNING, logger="hyca"):
            loop(FlowMatchEulerDiscreteScheduler(), 10)
        stats = hyca.stats(model)[0]
    finally:
        hyca.disable(model)
    assert (stats.computed, stats.forecast) == (4, 6)  # 0, 1, 4, 7: cached, the last step not known to be last
    assert any("step count unknown" in n for n in stats.notes)
    assert sum("step count unknown" in r.message for r in caplog.records) == 1


class Cancel(Exception):
    """A UI's cancel: raised from callback_on_step_end or a forward pre-hook."""


@pytest.mark.parametrize("where", ["callback at step 0", "callback at step 1", "transformer call 2",
                                   "transformer call 4"])
def test_a_cancelled_guided_run_leaves_nothing_for_the_next_unguided_one(where, caplog):
    """The uncond branch of a guided run cancelled early must not count as a guidance branch
    of the next run: an unguided run after it equals the same run on a fresh pipeline (a
    profile chosen without guidance would otherwise start it from plain reuse)."""
    from hyca.adapters.diffusers.fingerprint import fingerprint
    from hyca.profiles.settings import RunSettings

    from profile_helpers import random_profile

    base = tiny_flux()
    profile = random_profile(fingerprint(base), seed=4, interval=3, warmup=2,
                             chosen_for=RunSettings(steps=STEPS, guidance_scale=1.0, interval=3, warmup=2).to_json())
    fresh_pipe, pipe = tiny_pipeline(fresh_copy(base)), tiny_pipeline(base)
    hyca.enable(fresh_pipe, profile=profile, interval=3, warmup=2)
    expected = generate(fresh_pipe)
    hyca.enable(pipe, profile=profile, interval=3, warmup=2)
    g = torch.Generator().manual_seed(5)
    guided = dict(negative_prompt_embeds=torch.randn(1, 5, 32, generator=g),
                  negative_pooled_prompt_embeds=torch.randn(1, 24, generator=g), true_cfg_scale=3.0)
    kind, at = where.rsplit(" ", 1)
    calls = []

    def cancel_call(module, args, kwargs):
        calls.append(1)
        if len(calls) == int(at):
            raise Cancel(where)

    def cancel_step(p, i, t, tensors):
        if i == int(at):
            raise Cancel(where)
        return tensors

    handle = pipe.transformer.register_forward_pre_hook(cancel_call, with_kwargs=True) \
        if kind == "transformer call" else None
    caplog.set_level(logging.INFO, logger="hyca")  # the cancelled run is said when its pipeline call ends
    with pytest.raises(Cancel):
        generate(pipe, **guided, **({"callback_on_step_end": cancel_step} if kind == "callback at step" else {}))
    if handle is not None:
        handle.remove()
    with caplog.at_level(logging.INFO, logger="hyca"):
        after = generate(pipe)
    torch.testing.assert_close(after, expected, rtol=0, atol=0)
    lines = [r.message for r in caplog.records if r.message.startswith("HyCa [")]
    if kind == "callback at step":  # both branches had begun: the cancelled run's uncond is said first
        assert lines[0].startswith("HyCa [cond]") and "stopped after" in lines[0]
        assert lines[1].startswith("HyCa [uncond]") and "stopped after" in lines[1]
        assert lines[-1].startswith("HyCa [cond]") and "stopped" not in lines[-1]
    assert hyca.stats(pipe)[0].notes == hyca.stats(fresh_pipe)[0].notes
    assert hyca.stats(pipe)[0].switches == hyca.stats(fresh_pipe)[0].switches
    assert not any(s.step < 3 for s in hyca.stats(pipe)[0].switches)  # nothing started from reuse


def test_a_run_the_pipeline_interrupts_says_where_it_stopped(pipe, caplog):
    """diffusers' own interrupt (``pipe._interrupt = True`` from ``callback_on_step_end``: the
    pipeline skips the remaining steps and still returns the latents it has): the run's record
    says it stopped after the steps it ran of those planned, not that it was a shorter run,
    and the next run is as on a fresh pipeline."""
    hyca.enable(pipe, profile="taylor-2", interval=3, warmup=2)
    expected = generate(pipe)
    finished = hyca.stats(pipe)[0]

    def interrupt_after_step_4(p, step, timestep, tensors):
        if step == 4:
            p._interrupt = True
        return tensors

    with caplog.at_level(logging.INFO, logger="hyca"):
        generate(pipe, callback_on_step_end=interrupt_after_step_4)
    stats = hyca.stats(pipe)[0]
    assert stats.total == 5 and f"stopped after 5 of {STEPS} steps" in stats.notes
    assert any(f"stopped after 5 of {STEPS} steps" in r.message for r in caplog.records)
    assert torch.equal(generate(pipe), expected)
    assert hyca.stats(pipe)[0].notes == finished.notes
