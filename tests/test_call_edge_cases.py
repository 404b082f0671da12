"""What a new user met on the plain ``hyca.enable(pipe)`` path that reads each call's
settings: custom sigmas beside the default schedule, few-step calls, a first call at new
settings while another request samples, training-mode and gradient calls.

Probes are replaced by a stand-in making a random profile seeded by the settings it is
asked for, sigmas included (a profile chosen for other settings gives another image). The
expectations are the same call on a fresh profile cache, the same request alone, and the
pipeline without HyCa."""

from __future__ import annotations

import copy
import logging
import threading
import time

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline

import hyca
from hyca.adapters.diffusers import hooks
from hyca.adapters.diffusers.fingerprint import fingerprint
from hyca.adapters.diffusers.probe import _hooked
from hyca.engine.cache import HybridCache
from hyca.engine.schedule import Schedule
from hyca.profiles import Profile
from hyca.profiles.settings import RunSettings

from profile_helpers import no_profiles_but_a_cache, random_profile, stand_in_probes
from tiny import conditioning, tiny_flux, tiny_pipeline
from tiny_families import CASES

STEPS, INTERVAL, WARMUP = 6, 2, 1
#: a schedule of the call's own, unlike the tiny FLUX scheduler's default for STEPS steps
OWN_SIGMAS = [1.0, 0.9, 0.75, 0.5, 0.3, 0.1]


def stand_in_profile(pipe, options: dict):
    """A random profile seeded by the settings asked for (steps, guidance, sigmas)."""
    sigmas = options.get("sigmas")
    chosen = RunSettings(steps=options.get("steps", 28), guidance_scale=1.0, sigmas=sigmas,
                         interval=options["interval"], warmup=options["warmup"])
    seed = chosen.steps * 10 + (round(sum(sigmas) * 100) if sigmas is not None else 0)
    return random_profile(fingerprint(pipe.transformer), seed=seed, interval=options["interval"],
                          warmup=options["warmup"], chosen_for=chosen.to_json())


@pytest.fixture()
def asked(tmp_path, monkeypatch):
    """An empty profile cache and the stand-in probe; yields the options of each probe."""
    no_profiles_but_a_cache(tmp_path, monkeypatch)
    return stand_in_probes(monkeypatch, stand_in_profile)


def plain(**settings):
    pipe = CASES["flux"].build()
    hyca.enable(pipe, **{"interval": INTERVAL, "warmup": WARMUP, **settings})
    return pipe


def flux(pipe, steps: int = STEPS, **extra) -> torch.Tensor:
    return CASES["flux"].run(pipe, steps, **extra)


# --- 1. custom sigmas and the default schedule at one step count ---------------------------

def test_own_sigmas_and_the_default_schedule_each_get_their_own_profile_in_either_order(tmp_path, monkeypatch,
                                                                                         asked):
    alone = {}
    for name, extra in (("sigmas", {"sigmas": OWN_SIGMAS}), ("default", {})):
        monkeypatch.setenv("HYCA_CACHE", str(tmp_path / f"fresh-{name}"))
        alone[name] = flux(plain(), **extra)
    assert not torch.equal(alone["sigmas"], alone["default"])  # the comparison can tell them apart
    for order in (("sigmas", "default"), ("default", "sigmas")):
        monkeypatch.setenv("HYCA_CACHE", str(tmp_path / "-then-".join(order)))
        pipe = plain()
        for name in order:
            got = flux(pipe, **({"sigmas": OWN_SIGMAS} if name == "sigmas" else {}))
            torch.testing.assert_close(got, alone[name], rtol=0, atol=0)
        for name in order:  # a new process on that cache: each settings' file serves its own settings
            again = flux(plain(), **({"sigmas": OWN_SIGMAS} if name == "sigmas" else {}))
            torch.testing.assert_close(again, alone[name], rtol=0, atol=0)
    six_steps = [p.name for p in (tmp_path / "sigmas-then-default").iterdir() if "-s6-" in p.name]
    assert len(six_steps) == 2  # one file per schedule (the enable-time profile is the third)


# --- 2. calls whose schedule forecasts no step ---------------------------------------------

@pytest.mark.parametrize("settings, steps", [({}, 1), ({}, 2), ({}, 4), ({"interval": 1}, STEPS),
                                             ({"warmup": 100}, STEPS)])
def test_a_call_that_forecasts_no_step_computes_every_step_and_says_so_once(settings, steps, asked, caplog):
    enabled = plain(**({"interval": 5, "warmup": 3} if not settings else settings))
    never = CASES["flux"].build()
    with caplog.at_level(logging.WARNING, logger="hyca"):
        for _ in range(2):
            got = flux(enabled, steps)
            torch.testing.assert_close(got, flux(never, steps), rtol=0, atol=0)
            (stats,) = hyca.stats(enabled)
            assert (stats.computed, stats.forecast) == (steps, 0)
            assert any("forecasts none" in note for note in stats.notes), stats.notes
    assert sum("forecasts none" in r.getMessage() for r in caplog.records) == 1
    assert all("steps" not in a for a in asked)  # the enable-time probe at most: none for these steps


# --- 3. a probe while another request samples on the transformer ---------------------------

def test_a_probe_waits_for_a_request_sampling_and_both_equal_their_runs_alone(tmp_path, monkeypatch):
    no_profiles_but_a_cache(tmp_path, monkeypatch)
    swapped = threading.Event()

    def swapping_probe(pipe, **options):
        """Swaps the transformer's hooks for a run, as the real probe does (its own ``_hooked``)."""
        profile = stand_in_profile(pipe, options)
        engine = HybridCache(profile, Schedule(interval=INTERVAL, warmup=WARMUP))
        steps = options.get("steps", 28)
        with _hooked(pipe.transformer, engine, steps):
            swapped.set()
            flux(pipe, steps)
        return profile

    monkeypatch.setattr("hyca.adapters.diffusers.probe.probe", swapping_probe)
    pipe = plain()
    alone_a = flux(pipe, STEPS)  # probes STEPS first
    monkeypatch.setenv("HYCA_CACHE", str(tmp_path / "fresh"))
    alone_b = flux(plain(), 8)
    swapped.clear()
    monkeypatch.setenv("HYCA_CACHE", str(tmp_path / "cache"))

    start = threading.Barrier(2)
    a_sampling = threading.Event()
    out: dict[str, object] = {}

    def hold(pipe, step, timestep, kwargs):
        if step == 1:
            a_sampling.set()
            swapped.wait(timeout=3)  # the probe would swap the hooks now, mid-run, if nothing stopped it
        return kwargs

    def request_a():
        start.wait()
        try:
            out["a"] = flux(pipe, STEPS, callback_on_step_end=hold)
        except Exception as error:  # pragma: no cover - reported by the assertion below
            out["a"] = error

    def request_b():
        start.wait()
        a_sampling.wait(timeout=30)
        try:
            out["b"] = flux(pipe, 8)  # new settings: probes
        except Exception as error:  # pragma: no cover
            out["b"] = error

    threads = [threading.Thread(target=request_a), threading.Thread(target=request_b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert isinstance(out["a"], torch.Tensor) and isinstance(out["b"], torch.Tensor), out
    torch.testing.assert_close(out["a"], alone_a, rtol=0, atol=0)
    torch.testing.assert_close(out["b"], alone_b, rtol=0, atol=0)


def test_two_enabled_pipelines_probing_at_once_on_one_transformer_both_finish(tmp_path, monkeypatch):
    """docs/requests.md's server pattern: several pipelines passed to hyca.enable around one
    transformer, each call at settings of its own. A's call probes while B's call has begun
    and waits for A's probe. The probe samples with A's pipeline: sampling with the pipeline
    enabled last (B's, busy in B's call) deadlocked both (a README-only helper's finding)."""
    no_profiles_but_a_cache(tmp_path, monkeypatch)
    b_called = threading.Event()

    def probe_sampling_with(pipe, **options):
        """Samples with the pipeline it is given through its __call__, HyCa's hooks swapped for
        the run's (the real probe's own ``_hooked``)."""
        if threading.current_thread().name == "request-a":
            assert b_called.wait(timeout=30)
            time.sleep(0.3)  # B is inside its call, waiting for this probe
        profile = stand_in_profile(pipe, options)
        steps = options.get("steps", 28)
        with _hooked(pipe.transformer, HybridCache(profile, Schedule(interval=INTERVAL, warmup=WARMUP)), steps):
            flux(pipe, steps)
        return profile

    monkeypatch.setattr("hyca.adapters.diffusers.probe.probe", probe_sampling_with)
    base = CASES["flux"].build()
    alone = {}
    for name, steps in (("a", STEPS), ("b", 8)):
        monkeypatch.setenv("HYCA_CACHE", str(tmp_path / f"alone-{name}"))
        alone[name] = flux(plain_around(base.transformer, base), steps)
    monkeypatch.setenv("HYCA_CACHE", str(tmp_path / "shared"))
    pipe_a, pipe_b = plain_around(base.transformer, base), plain_around(base.transformer, base)
    out: dict[str, object] = {}

    def request(name, pipe, steps):
        if name == "b":
            b_called.set()
        try:
            out[name] = flux(pipe, steps)
        except Exception as error:  # pragma: no cover - reported by the assertion below
            out[name] = error

    threads = [threading.Thread(target=request, args=("a", pipe_a, STEPS), name="request-a", daemon=True),
               threading.Thread(target=request, args=("b", pipe_b, 8), name="request-b", daemon=True)]
    threads[0].start()
    time.sleep(0.2)  # A holds the choice (and probes) first
    threads[1].start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads), "deadlocked"
    for name in ("a", "b"):
        torch.testing.assert_close(out[name], alone[name], rtol=0, atol=0)


def test_a_call_probes_with_its_own_pipeline_when_several_are_enabled(tmp_path, monkeypatch):
    """Two enabled pipelines around one transformer: a call at new settings probes with the
    pipeline making it (its scheduler, its components), not with the pipeline enabled last,
    whose scheduler's shift the profile would otherwise be made for (found on the reference
    pipeline with shifts 1 and 3; the tiny FLUX scheduler shifts by image size, so here the
    identity of the pipeline sampled is the check)."""
    no_profiles_but_a_cache(tmp_path, monkeypatch)
    probed_with = []

    def recording_probe(pipe, **options):
        probed_with.append(pipe)
        return stand_in_profile(pipe, options)

    monkeypatch.setattr("hyca.adapters.diffusers.probe.probe", recording_probe)
    base = CASES["flux"].build()
    pipe_a, pipe_b = plain_around(base.transformer, base), plain_around(base.transformer, base)
    before = len(probed_with)  # (hyca.enable's own probe, with the pipeline given to it)
    flux(pipe_a, STEPS)
    assert len(probed_with) == before + 1 and probed_with[-1] is pipe_a
    flux(pipe_b, 8)
    assert len(probed_with) == before + 2 and probed_with[-1] is pipe_b


def test_a_pipeline_not_enabled_that_samples_during_a_probe_is_refused_by_name(tmp_path, monkeypatch):
    """docs/requests.md: calls of a pipeline not passed to hyca.enable do not wait for a
    probe. One that samples while another thread probes got internal errors on both sides
    ("the probe's recording failed: 'cond'", "step 0 recorded no 'cond' branch"); it is now
    refused with what to do, and the probe's run is untouched (the enabled call's image equals
    its run alone)."""
    from hyca.adapters.diffusers.root import ProbeBusy

    no_profiles_but_a_cache(tmp_path, monkeypatch)
    probing, tried = threading.Event(), threading.Event()

    def probe_sampling_with(pipe, **options):
        profile = stand_in_profile(pipe, options)
        steps = options.get("steps", 28)
        with _hooked(pipe.transformer, HybridCache(profile, Schedule(interval=INTERVAL, warmup=WARMUP)), steps):
            if threading.current_thread().name == "request-a":
                probing.set()
                assert tried.wait(timeout=30)  # the other pipeline tries to sample now
            flux(pipe, steps)
        return profile

    monkeypatch.setattr("hyca.adapters.diffusers.probe.probe", probe_sampling_with)
    base = CASES["flux"].build()
    monkeypatch.setenv("HYCA_CACHE", str(tmp_path / "alone"))
    alone = flux(plain_around(base.transformer, base), STEPS)
    monkeypatch.setenv("HYCA_CACHE", str(tmp_path / "shared"))
    enabled = plain_around(base.transformer, base)
    other = FluxPipeline(**{**base.components, "scheduler": copy.deepcopy(base.scheduler)})  # not enabled
    out: dict[str, object] = {}

    def request_a():
        out["a"] = flux(enabled, STEPS)

    def request_other():
        assert probing.wait(timeout=30)
        try:
            out["other"] = flux(other, 8)
        except Exception as error:
            out["other"] = error
        tried.set()

    threads = [threading.Thread(target=request_a, name="request-a", daemon=True),
               threading.Thread(target=request_other, daemon=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert isinstance(out["other"], ProbeBusy) and "pass this one too (hyca.enable(pipe))" in str(out["other"])
    torch.testing.assert_close(out["a"], alone, rtol=0, atol=0)


def plain_around(transformer, like, **settings):
    """A pipeline of its own around ``transformer`` (its own scheduler), passed to hyca.enable."""
    pipe = FluxPipeline(**{**like.components, "transformer": transformer,
                           "scheduler": copy.deepcopy(like.scheduler)})
    hyca.enable(pipe, **{"interval": INTERVAL, "warmup": WARMUP, **settings})
    return pipe


# --- 4. pipelines built around the enabled pipeline's transformer --------------------------

def test_a_pipeline_sharing_the_transformer_uses_the_profile_made_for_its_call(asked, caplog):
    pipe = plain()
    expected = flux(pipe, STEPS)  # the enabled pipeline probes these settings
    probes = len(asked)
    other = FluxPipeline(**pipe.components)  # not passed to hyca.enable
    assert other.transformer is pipe.transformer
    torch.testing.assert_close(flux(other, STEPS), expected, rtol=0, atol=0)
    assert not any("not passed to hyca.enable" in note for note in hyca.stats(other)[0].notes)
    # at settings nobody probed: the enable-time profile, said once in the log and in every run's stats
    enable_time = RunSettings.of_profile(hooks.root_hook(pipe.transformer).engine.profile.metadata)
    with caplog.at_level(logging.WARNING, logger="hyca"):
        for _ in range(2):
            flux(other, 8)
            assert any("not passed to hyca.enable" in note for note in hyca.stats(other)[0].notes)
    assert sum("not passed to hyca.enable" in r.getMessage() for r in caplog.records) == 1
    assert len(asked) == probes  # a run under way never probes
    assert enable_time.steps != 8


# --- 5. training mode and gradients --------------------------------------------------------

def test_stats_after_a_gradient_forward_show_that_call_not_the_previous_run(asked):
    pipe = plain()
    flux(pipe)
    assert hyca.stats(pipe)[0].forecast > 0
    inputs = _one_transformer_call_inputs(CASES["flux"].build())
    with torch.enable_grad():
        pipe.transformer(**inputs)
    (stats,) = hyca.stats(pipe)
    assert (stats.computed, stats.forecast) == (1, 0)
    assert any("gradients are enabled" in note for note in stats.notes)
    flux(pipe)  # a cached run again: its own counts
    assert hyca.stats(pipe)[0].forecast > 0


def _one_transformer_call_inputs(pipe) -> dict:
    """The keyword inputs of the transformer's first call in a one-step run of ``pipe``."""
    captured: dict = {}

    def keep(module, args, kwargs):
        captured.setdefault("kwargs", {k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()})

    handle = pipe.transformer.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        flux(pipe, 1)
    finally:
        handle.remove()
    return captured["kwargs"]


def test_probing_a_model_in_training_mode_names_the_cause(tmp_path, monkeypatch):
    monkeypatch.setenv("HYCA_CACHE", str(tmp_path / "cache"))
    pipe = tiny_pipeline(tiny_flux())
    pipe.transformer.train()
    with pytest.raises(RuntimeError, match=r"training mode.*\.eval\(\)"):
        hyca.probe(pipe, height=64, width=64, steps=8, interval=2, warmup=1, clusters=2, progress=False,
                   selection="eq5", **conditioning())
    assert hooks.root_hook(pipe.transformer) is None  # nothing of the probe's left behind


@pytest.mark.parametrize("sigmas", [
    [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.6, 0.4, 0.3, 0.2, 0.1, 0.05],  # moves back up once (a restart-style bump)
    [1.0, 0.9, 0.8, 0.7, 0.7, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1],  # repeats one
    [0.5, 1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05],  # comes back to its first sigma
    [1.0, 1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05],  # repeats its first
    [0.7] * 10,
])
def test_a_call_whose_own_sigmas_move_back_or_repeat_is_one_run(sigmas):
    """One pipeline call is one run, whatever its sigmas do: a schedule that revisits a noise
    level was split in two mid-call (a helper's stats read "7 of 16 steps" for a 28-step
    call, a fresh warm-up spent in the middle). The counts are the schedule's plan for the
    call's step count, and the image equals the same engine driven by hand over the call's steps."""
    pipe = tiny_pipeline(tiny_flux())
    schedule = Schedule(interval=3, warmup=2)
    hyca.enable(pipe, profile="taylor-1", interval=3, warmup=2)

    def call(p):
        return p(**conditioning(), sigmas=sigmas, num_inference_steps=len(sigmas), height=32, width=32,
                 generator=torch.Generator().manual_seed(0), output_type="latent").images

    cached = call(pipe)
    (stats,) = hyca.stats(pipe)
    plan = schedule.plan(len(sigmas))
    assert (stats.computed, stats.forecast) == (sum(plan), len(plan) - sum(plan)), stats.describe()
    hyca.disable(pipe)
    by_hand = HybridCache(Profile.uniform("taylor-1", 5, 32), schedule)
    with _hooked(pipe.transformer, by_hand, len(sigmas)):  # the probe's hooks: step by step, no run splitting
        expected = call(pipe)
    torch.testing.assert_close(cached, expected, rtol=0, atol=0)
