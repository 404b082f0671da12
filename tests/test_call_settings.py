"""Settings read from the pipeline call (issue 21 item 1): a plain ``hyca.enable(pipe)``
followed by ``pipe(..., num_inference_steps=...)`` chooses for the call's own settings.

Probes are replaced by a stand-in that makes a random profile seeded by the settings it is
asked for (so a profile chosen for other settings gives another image), recording what it
was asked; the expectations are what the test passed to the call and the same call on a
fresh profile cache."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
import torch
from diffusers import FluxImg2ImgPipeline, FluxPipeline

import hyca
from hyca.adapters.diffusers import hooks
from hyca.adapters.diffusers.fingerprint import fingerprint
from hyca.adapters.diffusers.settings import guidance_of
from hyca.profiles.settings import RunSettings

from profile_helpers import no_profiles_but_a_cache, random_profile, stand_in_probes
from tiny_families import CASES

STEPS, INTERVAL, WARMUP = 6, 2, 1
EXPERT_STEPS = {"wan2.2": 12}
GUIDANCE = 3.0  # every tiny family's guided call (tests/tiny_families.py)


@pytest.fixture()
def asked(tmp_path, monkeypatch):
    """An empty profile cache and a probe stand-in; yields the settings each probe was asked for."""
    no_profiles_but_a_cache(tmp_path, monkeypatch)

    def stand_in(pipe, options):
        scale = options.get("true_cfg_scale", options.get("guidance_scale", 1.0))
        if "true_cfg_scale" in options and options.get("negative_prompt") is None \
                and options.get("negative_prompt_embeds") is None:
            scale = 1.0
        if getattr(pipe, "guider", None) is not None:  # as the real probe reads it: the guider's scale
            scale = guidance_of(pipe, options)
        chosen = RunSettings(steps=options.get("steps", 28), guidance_scale=max(float(scale), 1.0),
                             sigmas=options.get("sigmas"), interval=options["interval"], warmup=options["warmup"])
        seed = int(chosen.steps * 10 + chosen.guidance_scale)
        return random_profile(fingerprint(pipe.transformer), seed=seed, interval=options["interval"],
                              warmup=options["warmup"], chosen_for=chosen.to_json())

    return stand_in_probes(monkeypatch, stand_in)


def enable_plain(pipe, experts):
    profile = {"transformer": "auto", "transformer_2": "taylor-1"} if len(experts) > 1 else "auto"
    hyca.enable(pipe, profile=profile, interval=INTERVAL, warmup=WARMUP)


def engine_of_last_call(transformer):
    return hooks.root_hook(transformer).latest().engine


def sigmas_for(steps: int) -> list[float]:
    return [float(s) for s in np.linspace(1.0, 1.0 / steps, steps)]


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_plain_enable_reads_steps_guidance_sigmas_and_shift_from_the_call(name, asked):
    case = CASES[name]
    pipe = case.build()
    enable_plain(pipe, case.experts)
    steps = EXPERT_STEPS.get(name, STEPS)
    own_call = type(pipe).__call__
    extra = {"sigmas": sigmas_for(steps)} if "sigmas" in inspect.signature(own_call).parameters else {}
    guided = case.extra.get("cfg", False) or "cfg" in inspect.signature(case.call).parameters
    for cfg in ([False, True] if guided and "cfg" not in case.extra else [guided]):
        asked.clear()
        case.run(pipe, steps, **({"cfg": True} if cfg and "cfg" not in case.extra else {}), **extra)
        engine = engine_of_last_call(pipe.transformer)
        config = pipe.scheduler.config
        shift = None if config.get("use_dynamic_shifting") else float(config["shift"])
        told = engine.host_run
        assert told.steps == steps
        assert told.guidance_scale == (GUIDANCE if cfg else 1.0)
        assert told.shift == shift
        assert told.sigmas == (RunSettings(sigmas=extra["sigmas"]).sigmas if extra else None)
        if len(case.experts) == 1:  # the profile was probed for exactly these settings
            (probe,) = asked
            assert probe["steps"] == steps
            assert probe.get("sigmas") == (list(RunSettings(sigmas=extra["sigmas"]).sigmas) if extra else None)
            chosen = RunSettings.of_profile(engine.profile.metadata)
            assert (chosen.steps, chosen.guidance_scale) == (steps, GUIDANCE if cfg else 1.0)
        assert hyca.stats(pipe)[0].total > 0


def flux_at(pipe, steps: int, cfg: bool = False):
    return CASES["flux"].run(pipe, steps, cfg=cfg)


def test_after_runs_at_other_settings_a_plain_call_gives_the_fresh_cache_image(tmp_path, monkeypatch, asked):
    case = CASES["flux"]
    fresh = case.build()
    enable_plain(fresh, case.experts)
    expected = flux_at(fresh, STEPS)

    monkeypatch.setenv("HYCA_CACHE", str(tmp_path / "used-cache"))
    used = case.build()
    enable_plain(used, case.experts)
    flux_at(used, 10, cfg=True)
    flux_at(used, 8)
    got = flux_at(used, STEPS)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    for pipe in (fresh, used):  # both ran on the profile chosen for their own settings, not enable's
        assert RunSettings.of_profile(engine_of_last_call(pipe.transformer).profile.metadata).steps == STEPS
    # and not what the closest profile (8 steps) gives: the comparison can tell them apart
    monkeypatch.setattr("hyca.adapters.diffusers.probe.probe", lambda *a, **k: pytest.fail("no probe expected"))
    eight = case.build()
    hyca.enable(eight, profile=engine_of_last_call_profile(used, 8), interval=INTERVAL, warmup=WARMUP)
    assert not torch.equal(flux_at(eight, STEPS), expected)
    # settings seen before come from memory: no probe, the same image
    torch.testing.assert_close(flux_at(used, STEPS), expected, rtol=0, atol=0)


def test_a_pipeline_enabled_before_another_on_its_transformer_still_chooses_for_its_own_calls(asked):
    """``hyca.enable(pipe)``, then ``hyca.enable(other)`` on a pipeline sharing pipe's
    transformer (a pipeline per request, docs/requests.md): the second enable's settings
    replace the first's, and a call of ``pipe`` is still a request at its own settings: it
    probes once for them and gives the image that ``other`` gives at those settings (before,
    it took the profile made for other settings and never probed)."""
    import copy

    case = CASES["flux"]
    pipe = case.build()
    other = type(pipe)(**{**pipe.components, "scheduler": copy.deepcopy(pipe.scheduler)})
    enable_plain(pipe, case.experts)
    enable_plain(other, case.experts)
    asked.clear()
    got = flux_at(pipe, STEPS)
    assert [a["steps"] for a in asked] == [STEPS]
    assert RunSettings.of_profile(engine_of_last_call(pipe.transformer).profile.metadata).steps == STEPS
    torch.testing.assert_close(flux_at(other, STEPS), got, rtol=0, atol=0)
    assert [a["steps"] for a in asked] == [STEPS]  # the second pipeline finds the profile the first probed


def engine_of_last_call_profile(pipe, steps: int):
    """The profile ``pipe``'s requests chose for ``steps`` unguided steps."""
    controller = pipe.__dict__["_hyca_requests"]
    (chooser,) = controller.choosers
    return next(p for run, p in chooser.chosen.items() if run.steps == steps and run.guidance_scale == 1.0)


def test_told_settings_still_prepare_the_profile_ahead(asked):
    pipe = CASES["flux"].build()
    hyca.enable(pipe, interval=INTERVAL, warmup=WARMUP, num_inference_steps=STEPS)
    assert [a["steps"] for a in asked] == [STEPS]
    flux_at(pipe, STEPS)
    assert len(asked) == 1  # the call's settings are the told ones: no second probe


def test_an_explicit_profile_is_used_as_given_and_the_mismatch_is_said(asked):
    pipe = CASES["flux"].build()
    profile = random_profile(fingerprint(pipe.transformer), seed=3, interval=INTERVAL, warmup=WARMUP,
                             chosen_for=RunSettings(steps=20, guidance_scale=1.0, interval=INTERVAL,
                                                    warmup=WARMUP).to_json())
    hyca.enable(pipe, profile=profile, interval=INTERVAL, warmup=WARMUP)
    flux_at(pipe, STEPS)
    assert not asked
    assert engine_of_last_call(pipe.transformer).profile is profile
    assert any("steps 20 vs 6" in note for note in hyca.stats(pipe)[0].notes)


def test_the_request_class_is_invisible_and_disable_restores_the_original(tmp_path):
    case = CASES["flux"]
    pipe = case.build()
    never = case.build()
    original_signature = inspect.signature(FluxPipeline.__call__)
    hyca.enable(pipe, profile="taylor-2", interval=INTERVAL, warmup=WARMUP)
    assert type(pipe) is not FluxPipeline and isinstance(pipe, FluxPipeline)
    assert type(pipe).__name__ == "FluxPipeline" and type(pipe).__qualname__ == "FluxPipeline"
    assert repr(pipe).startswith("FluxPipeline {") and pipe.config["_class_name"] == "FluxPipeline"
    assert inspect.signature(type(pipe).__call__) == original_signature
    assert set(pipe.components) == set(never.components)
    pipe.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "model_index.json").read_text())["_class_name"] == "FluxPipeline"
    img2img = FluxImg2ImgPipeline.from_pipe(pipe)
    assert type(img2img) is FluxImg2ImgPipeline and img2img.transformer is pipe.transformer
    cached = flux_at(pipe, STEPS)
    assert not torch.equal(cached, flux_at(never, STEPS))
    hyca.disable(pipe)
    assert type(pipe) is FluxPipeline and "_hyca_requests" not in pipe.__dict__
    assert torch.equal(flux_at(pipe, STEPS), flux_at(never, STEPS))


def test_a_schedule_that_forecasts_the_last_step_keeps_its_own_cached_profile(tmp_path, monkeypatch):
    """compute_last=False chooses for another schedule than the default: its profile is a file
    of its own, so switching back and forth probes once per schedule, not at every switch
    (the real probe, counted; the shipped folder hidden)."""
    no_profiles_but_a_cache(tmp_path, monkeypatch)
    from hyca.adapters.diffusers import probe as probing

    probes, real = [], probing.probe
    monkeypatch.setattr(probing, "probe", lambda *a, **k: probes.append(k.get("compute_last")) or real(*a, **k))
    from hyca.reference import load_pipeline

    pipe = load_pipeline()
    for compute_last in (True, False, True, False):
        hyca.enable(pipe, interval=3, warmup=2, compute_last=compute_last)
        pipe("a large red circle at the center on a white background", num_inference_steps=8, seed=0)
        hyca.disable(pipe)
    assert len(probes) == 2
    names = sorted(p.name for p in (tmp_path / "cache").rglob("*.safetensors"))
    assert len(names) == 2 and sum(n.endswith("-nolast.safetensors") for n in names) == 1, names


def test_a_first_use_probe_that_fails_does_not_fail_the_call_and_is_said(tmp_path, monkeypatch):
    """A probe for the call's settings that raises (a recording it could not make, memory)
    leaves the call to the profile ``hyca.enable`` found, on its off-settings path, said in
    the log and the stats, once per settings: the same image as that profile given by name.
    (A helper's custom sigmas made the probe fail, and with it every call at those settings.)"""
    from hyca.profiles.sources import shipped_dir
    from hyca.reference import load_pipeline

    no_profiles_but_a_cache(tmp_path, monkeypatch)
    monkeypatch.setenv("HYCA_PROFILES", str(shipped_dir()))  # the shipped profiles stay a source
    tried = stand_in_probes(monkeypatch, lambda pipe, options: (_ for _ in ()).throw(RuntimeError("boom")))
    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    hyca.enable(pipe, interval=4, warmup=3)
    made_for = hooks.root_hook(pipe.transformer).engine.profile  # what hyca.enable found: a shipped profile

    def call(p):
        return p("a red circle", num_inference_steps=12, seed=0, output_type="pt").images

    first, second = call(pipe), call(pipe)
    assert len(tried) == 1  # once per settings, not on every call
    (stats,) = hyca.stats(pipe)
    said = [n for n in stats.notes if "the probe for 12 steps" in n]
    assert said and "failed (RuntimeError: boom)" in said[0] and stats.off_settings is not None
    named = load_pipeline()
    named.set_progress_bar_config(disable=True)
    hyca.enable(named, profile=made_for, interval=4, warmup=3)
    expected = call(named)
    torch.testing.assert_close(first, expected, rtol=0, atol=0)
    torch.testing.assert_close(second, expected, rtol=0, atol=0)
