"""Settings-aware profiles: what a profile was chosen for, how lookup ranks profiles by the
run's settings, and how a run on other settings is told so."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
import torch

import hyca
from hyca.adapters.diffusers.fingerprint import fingerprint
from hyca.profiles.io import save_profile
from hyca.profiles.names import profile_filename
from hyca.profiles.settings import RunSettings, differences, mismatch_cost
from hyca.profiles.sources import resolve_profile

from profile_helpers import random_profile
from tiny import Inputs, euler_sample, tiny_flux, tiny_pipeline

RUN = RunSettings(steps=28, guidance_scale=2.5, shift=3.0, interval=6, warmup=3, compute_last=True, positions="step")


def test_json_round_trip_and_tag():
    assert RunSettings.from_json(RUN.to_json()) == RUN
    assert RUN.tag() == "w3-s28-g2.5-sh3"
    # what makes another profile makes another file: the last step forecast, the sigma axis
    assert replace(RUN, compute_last=False).tag() == "w3-s28-g2.5-sh3-nolast" != RUN.tag()
    assert RunSettings(steps=28, positions="sigma", compute_last=False).tag() == "s28-sigma-nolast"
    with pytest.raises(ValueError, match="'steps'"):
        RunSettings.from_json({"steps": "many"})
    assert RunSettings.from_json({"steps": 8, "unknown": 1}).steps == 8  # newer writers' keys are ignored


def test_differences_name_what_is_known_on_both_sides():
    chosen = RunSettings(steps=50, guidance_scale=1.0, shift=1.0, interval=6, warmup=3)
    assert differences(chosen, RUN) == ["steps 50 vs 28", "guidance 1 vs 2.5", "shift 1 vs 3"]
    assert differences(RunSettings(interval=6), RUN) == []  # unknown is never a difference
    assert mismatch_cost(RUN, RUN) == 0


def test_cost_ranks_the_interval_then_guidance_then_steps():
    near = RunSettings(steps=30, guidance_scale=2.5, interval=6)
    unguided = RunSettings(steps=28, guidance_scale=1.0, interval=6)
    other_n = RunSettings(steps=28, guidance_scale=2.5, interval=4)
    assert mismatch_cost(near, RUN) < mismatch_cost(unguided, RUN) < mismatch_cost(other_n, RUN)


def test_legacy_metadata_reads_as_settings():
    legacy = {"interval": 5, "warmup": 3, "positions": "step", "probe": {"steps": 50}}
    assert RunSettings.of_profile(legacy) == RunSettings(steps=50, interval=5, warmup=3, positions="step")


@pytest.fixture()
def folders(tmp_path, monkeypatch):
    monkeypatch.setenv("HYCA_PROFILES", str(tmp_path / "extra"))
    (tmp_path / "extra").mkdir()
    return tmp_path


def saved(fp, folder, settings: RunSettings, name: str | None = None):
    profile = random_profile(fp, interval=settings.interval)
    profile.metadata["chosen_for"] = settings.to_json()
    return save_profile(profile, folder / (name or profile_filename(fp, settings.interval, settings)), fp)


def test_lookup_prefers_the_profile_chosen_for_the_run(folders):
    fp = fingerprint(tiny_flux())
    unguided = saved(fp, folders / "extra", RunSettings(steps=50, guidance_scale=1.0, interval=6, warmup=3))
    matching = saved(fp, folders / "cache", RUN)
    found = resolve_profile(fp, run=RUN, cache_dir=folders / "cache", hub_repo=None)
    assert found.path == matching and found.differences == []
    # only the other one: it is used, and the result says what differs
    matching.unlink()
    found = resolve_profile(fp, run=RUN, cache_dir=folders / "cache", hub_repo=None)
    assert found.path == unguided and found.differences == ["steps 50 vs 28", "guidance 1 vs 2.5"]


def test_a_mismatch_is_probed_when_the_caller_said_its_settings(folders):
    fp = fingerprint(tiny_flux())
    saved(fp, folders / "extra", RunSettings(steps=50, guidance_scale=1.0, interval=6, warmup=3))
    made = random_profile(fp, interval=6)
    made.metadata["chosen_for"] = RUN.to_json()
    found = resolve_profile(fp, run=RUN, cache_dir=folders / "cache", hub_repo=None, probe=lambda: made,
                            probe_if_mismatched=True)
    assert found.source == "probe" and found.path == folders / "cache" / profile_filename(fp, 6, RUN)
    assert torch.equal(found.profile.labels, made.labels) and found.differences == []


def two_branches(cond, uncond, steps, scale=2.0):
    """A velocity for :func:`euler_sample`: cond and uncond in separate calls, as true CFG."""
    def guided(m, x, sigma, step):
        with m.cache_context("cond", num_inference_steps=steps):
            c = cond.call(m, x, sigma)
        with m.cache_context("uncond", num_inference_steps=steps):
            u = uncond.call(m, x, sigma)
        return u + scale * (c - u)
    return guided


def test_a_run_on_other_settings_is_told_once(caplog):
    """The profile says 50 steps without guidance; the run has 8 steps and two guidance
    branches: the engine notes both in the run's stats and logs it once."""
    model, cond, uncond = tiny_flux(), Inputs(seed=1), Inputs(seed=2)
    profile = hyca.Profile.uniform("taylor-1", 5, 32)
    profile.metadata.update(interval=3, warmup=2, chosen_for=RunSettings(steps=50, guidance_scale=1.0, interval=3,
                                                                          warmup=2).to_json())
    guided = two_branches(cond, uncond, 8)

    hyca.enable(model, profile=profile, interval=3, warmup=2)
    try:
        with caplog.at_level(logging.WARNING, logger="hyca"):
            for _ in range(2):
                euler_sample(model, cond, 8, guided)
        notes = [n for s in hyca.stats(model) for n in s.notes]
    finally:
        hyca.disable(model)
    told = [r.message for r in caplog.records if "chosen for" in r.message]
    assert len(told) == 1 and "steps 50 vs 8" in told[0] and "two guidance branches" in told[0]
    assert any("steps 50 vs 8" in n for n in notes)


def _one_branch(m, inputs, x, sigma):
    with m.cache_context("cond", num_inference_steps=8):
        return inputs.call(m, x, sigma)


def _guided_sample(model, profile, guard, chosen_guidance):
    """A two-branch guided run (guidance 2.0, 8 steps) with ``profile`` marked as chosen at
    ``chosen_guidance``: the final latent and the cond branch's stats."""
    cond, uncond = Inputs(seed=1), Inputs(seed=2)
    profile.metadata.update(interval=3, warmup=2, chosen_for=RunSettings(
        steps=8, guidance_scale=chosen_guidance, interval=3, warmup=2).to_json())
    guided = two_branches(cond, uncond, 8)

    hyca.enable(model, profile=profile, interval=3, warmup=2, guard=guard)
    try:
        out, _ = euler_sample(model, cond, 8, guided)
        return out, hyca.stats(model)[0]
    finally:
        hyca.disable(model)


def test_a_profile_chosen_without_guidance_starts_a_guided_run_from_plain_reuse():
    """An unguided profile's solvers were never scored on cond - uncond, and 8 steps at N=3
    leave the guard no steady check to demote them by: with the guard on, the run forecasts
    as a uniform reuse profile would; the switches and the reason are in the stats.
    With the guard off (the paper's engine) or a profile chosen with guidance, the profile's
    solvers forecast."""
    model = tiny_flux()
    mixed = random_profile(fingerprint(model), seed=3)
    reuse, _ = _guided_sample(model, hyca.Profile.uniform("reuse", 5, 32), True, 1.0)
    guarded, stats = _guided_sample(model, mixed, True, 1.0)
    # the same forecasts; the per-solver sums (cache.py) differ from one sum by float rounding
    torch.testing.assert_close(guarded, reuse, rtol=1e-5, atol=1e-5)
    assert stats.switches and all(s.to == "reuse" and s.step == 1 for s in stats.switches)
    assert any("starts every solver group from plain reuse" in n for n in stats.notes)
    paper, stats = _guided_sample(model, mixed, False, 1.0)
    assert (paper - reuse).abs().max() > 1e-2 and not stats.switches
    matched, stats = _guided_sample(model, mixed, True, 2.0)
    assert (matched - reuse).abs().max() > 1e-2 and not stats.switches


def test_a_scale_up_to_one_is_no_guidance_in_diffusers():
    """Diffusers pipelines guide only above 1 (``do_classifier_free_guidance``): a call at
    0.5 runs one branch, so it reads as unguided, as the pipeline runs it."""
    from hyca.adapters.diffusers.settings import guidance_of

    pipe = tiny_pipeline(tiny_flux())
    assert guidance_of(pipe, {"true_cfg_scale": 0.5, "negative_prompt": ""}) == 1.0
    assert guidance_of(pipe, {"true_cfg_scale": 3.0, "negative_prompt": ""}) == 3.0
    # FLUX runs true CFG only with a negative prompt (``do_true_cfg = true_cfg_scale > 1 and has_neg_prompt``)
    assert guidance_of(pipe, {"true_cfg_scale": 3.0}) == 1.0
    assert RunSettings(guidance_scale=guidance_of(pipe, {"true_cfg_scale": 0.5})).guided is False


def test_what_the_pipeline_runs_with_is_compared_not_what_enable_was_told():
    """The scheduler swapped for a shifted one after ``hyca.enable``, and a guidance scale
    other than the profile's: both are said in the run's notes, read from the pipeline that
    runs (its scheduler's shift, the scale it keeps as ``_guidance_scale``)."""
    from hyca.reference import tiny_components

    pipe = tiny_components(seed=0)
    from hyca.adapters.diffusers.families import blocks_of, family_of, hidden_size

    blocks = len(blocks_of(pipe.transformer, family_of(pipe.transformer)))
    profile = hyca.Profile.uniform("taylor-1", blocks, hidden_size(pipe.transformer))
    profile.metadata.update(interval=3, warmup=2, chosen_for=RunSettings(
        steps=8, guidance_scale=2.5, shift=1.0, interval=3, warmup=2).to_json())
    hyca.enable(pipe, profile=profile, interval=3, warmup=2)
    try:
        pipe(["a red circle"], num_inference_steps=8, guidance_scale=2.5, output_type="pt")
        assert not any(n for s in hyca.stats(pipe) for n in s.notes)  # the settings it was chosen for
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, shift=3.0)
        pipe(["a red circle"], num_inference_steps=8, guidance_scale=7.0, output_type="pt")
        notes = [n for s in hyca.stats(pipe) for n in s.notes]
    finally:
        hyca.disable(pipe)
    assert notes and all("guidance 2.5 vs 7" in n and "shift 1 vs 3" in n for n in notes)


def test_the_engine_takes_the_profiles_schedule_start():
    profile = hyca.Profile.uniform("taylor-1", 5, 32)
    profile.metadata.update(interval=6, warmup=3, first_interval=2)
    (engine,) = hyca.enable(tiny_flux(), profile=profile, interval=6, warmup=3)
    assert engine.schedule.first_interval == 2
    (engine,) = hyca.enable(tiny_flux(), profile=profile, interval=4, warmup=3)  # chosen for another N: not taken
    assert engine.schedule.first_interval is None


def test_enable_with_run_settings_probes_for_them(tmp_path, monkeypatch):
    monkeypatch.setenv("HYCA_CACHE", str(tmp_path))
    monkeypatch.setenv("HYCA_HUB_REPO", "none")
    monkeypatch.setenv("HYCA_PROFILES", str(tmp_path / "nothing-here"))
    pipe = tiny_pipeline(tiny_flux())
    calls = {}

    def fake_probe(target, **options):
        calls.update(options)
        made = random_profile(fingerprint(pipe.transformer), interval=options["interval"])
        made.metadata["chosen_for"] = RunSettings(steps=options["steps"], interval=options["interval"],
                                                  warmup=options["warmup"]).to_json()
        return made

    monkeypatch.setattr("hyca.adapters.diffusers.probe.probe", fake_probe)
    hyca.enable(pipe, interval=3, warmup=2, num_inference_steps=12, guidance_scale=3.0)
    assert calls["steps"] == 12 and calls["true_cfg_scale"] == 3.0 and calls["negative_prompt"] == ""
    assert (calls["interval"], calls["warmup"]) == (3, 2)


def test_distilled_guidance_is_not_classifier_free_guidance():
    """diffusers 0.42: Flux2Pipeline's guidance_scale is a model input (no
    do_classifier_free_guidance property, one transformer call per step); Flux2KleinPipeline's
    and SD3's are CFG; FLUX.1's CFG is true_cfg_scale."""
    import diffusers
    from hyca.adapters.diffusers.settings import guidance_name, guidance_of

    def bare(cls):
        return cls.__new__(cls)

    assert guidance_name(bare(diffusers.Flux2Pipeline)) is None
    assert guidance_of(bare(diffusers.Flux2Pipeline), {"guidance_scale": 4.0}) == 1.0  # no CFG at all
    assert guidance_name(bare(diffusers.Flux2KleinPipeline)) == "guidance_scale"
    assert guidance_name(bare(diffusers.StableDiffusion3Pipeline)) == "guidance_scale"
    assert guidance_name(bare(diffusers.FluxPipeline)) == "true_cfg_scale"


def test_two_sigma_schedules_with_the_same_ends_read_differently():
    """ComfyUI's simple and karras schedules both run from 1 to 0: the description names each
    schedule by its hash (the one in file names), so "probing one for this run's settings"
    never shows the same settings on both sides (found by a fresh helper)."""
    simple = RunSettings(steps=4, sigmas=(1.0, 0.75, 0.5, 0.25, 0.0))
    karras = RunSettings(steps=4, sigmas=(1.0, 0.5, 0.2, 0.05, 0.0))
    assert simple.describe() != karras.describe()
    assert f"sigmas 1..0 (#{simple.sigmas_hash()})" in simple.describe()
