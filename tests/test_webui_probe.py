"""The WebUI's automatic profile: the core's closed-loop probe run at a pass's first model
call on every frontend stand-in (tests/standins), guidance-aware, keyed by the pass's
settings.

Closed loop: while the probe's pass still holds the frontend's model call, every single
solver of the pool and the kept profile are run here on the probe's own run (its host,
with engines built here) and scored with a PSNR written here; the kept profile is at
least as near full compute as every single solver. The cached pass that follows is
compared with the same profile read from a file (the file path is checked against the
independent reference in test_webui_passes.py) and, when the profile keeps the plain
schedule start, with that reference directly."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from hyca import Profile
from hyca.engine.cache import HybridCache
from hyca.probing import SINGLES

from test_webui_adapters import Frontend, args
from webui_reference import expected_plan

KINDS = ["forge_flux", "forge_chroma", "forge_mmditx", "neo_flux", "neo_qwen", "neo_wan", "neo_lumina", "a1111_sd3"]


def psnr(output, reference):
    error = float((output.double() - reference.double()).square().sum())
    return math.inf if error == 0 else 10 * math.log10(float(reference.double().square().sum()) / error)


@pytest.fixture()
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("HYCA_CACHE", str(tmp_path))
    monkeypatch.setenv("HYCA_HUB_REPO", "none")
    monkeypatch.delenv("HYCA_PROFILES", raising=False)
    return tmp_path


@pytest.fixture()
def probes(monkeypatch):
    """Every probe run: its host, its settings, and (``evaluate``) each single solver and
    the kept profile run on the probe's own generation while its pass still runs."""
    from hyca.adapters.webui import probe

    seen = []
    real = probe.run_probe

    def spy(host, run, schedule, guard, fp, on_progress=None):
        profile = real(host, run, schedule, guard, fp, on_progress)
        entry = {"run": run, "profile": profile, "latent": host.latent}
        if spy.evaluate:
            reference = host.sample(None)
            blocks, dim = host.num_blocks, host.hidden_size  # the singles forecast the blocks' residuals

            def score(candidate):
                start = schedule.with_first_interval(candidate.metadata.get("first_interval"))
                return psnr(host.sample(HybridCache(candidate, start, guard=None if guard else False)), reference)

            entry["kept"] = score(profile)
            entry["singles"] = {name: score(Profile.uniform(name, blocks, dim)) for name in SINGLES}
        seen.append(entry)
        return profile

    spy.evaluate = False
    monkeypatch.setattr(probe, "run_probe", spy)
    return spy, seen


def head_reference(f, profile, interval, warmup, **settings):
    """The pass with an output-head profile, from webui_reference.HeadReference."""
    from test_webui_output_head import HEADS, head_of
    from webui_harness import ReferenceScript
    from webui_reference import HeadReference

    reference = HeadReference(f.model, head_of(f.model, HEADS[f.kind]), profile.dim_solvers(), interval, warmup, 2,
                              f.spec.timestep_multiplier)
    with reference:
        return f.run([], ReferenceScript(reference), **settings)[0]


@pytest.mark.parametrize("kind", KINDS)
def test_the_webui_probe_is_closed_loop_and_guidance_aware_on_every_frontend(kind, isolated, probes, tmp_path, capsys):
    spy, seen = probes
    spy.evaluate = True
    auto = args(True, 3, 2, profile="automatic")
    with Frontend(kind) as f:
        plain, _ = f.run(args(False), steps=10, cfg_scale=3.0)
        probed, p1 = f.run(auto, steps=10, cfg_scale=3.0)
        (entry,) = seen
        profile = entry["profile"]
        path = tmp_path / "kept.safetensors"
        from hyca.adapters.webui.fingerprint import fingerprint
        from hyca.adapters.webui.registry import recognise
        from hyca.profiles.io import save_profile

        save_profile(profile, path, fingerprint(f.model, recognise(f.model)), interval=3)
        from_file, _ = f.run(args(True, 3, 2, profile=path.name), steps=10, cfg_scale=3.0)
        if "first_interval" not in profile.metadata and profile.metadata.get("target") == "output":
            expected = head_reference(f, profile, 3, 2, steps=10, cfg_scale=3.0)
            torch.testing.assert_close(probed.images[0], expected.images[0], rtol=1e-4, atol=1e-4)
        elif "first_interval" not in profile.metadata:
            expected = f.reference(profile.dim_solvers(), 3, 2, branches=2, steps=10, cfg_scale=3.0)[0]
            torch.testing.assert_close(probed.images[0], expected.images[0], rtol=1e-4, atol=1e-4)
    out = capsys.readouterr().out
    meta = profile.metadata
    assert meta["selection"]["branches"] == ["cond", "uncond"]  # CFG 3: the guided output is what is scored
    assert meta["chosen_for"]["guidance_scale"] == 3.0 and meta["chosen_for"]["steps"] == 10
    trials = meta["selection"]["closed_loop"]["trials"]
    assert {f"uniform:{name}" for name in SINGLES} <= {t["name"] for t in trials}
    # the model output is a candidate target on every stand-in (the head's input, a linear map
    # away from it, is left out: hyca.probing.probe._SUBSUMED_BY_MODEL_OUTPUT)
    assert "model:eq5" in {t["name"] for t in trials}, [t["name"] for t in trials]
    assert entry["kept"] >= max(entry["singles"].values()) - 1e-6, (entry["kept"], entry["singles"])
    assert "probing" in out and "profile ready (probe, saved to" in out
    # the pass that asked for the profile runs cached with it from its first step
    assert p1.extra_generation_params["HyCa steps"] == "5 computed, 5 forecast"
    assert (probed.images[0] - plain.images[0]).abs().max() > 1e-3
    torch.testing.assert_close(probed.images[0], from_file.images[0], rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["forge_flux", "a1111_sd3"])
def test_without_guidance_only_the_cond_branch_is_recorded(kind, isolated, probes):
    _, seen = probes
    with Frontend(kind) as f:
        f.run(args(True, 3, 2, profile="automatic"), steps=8, cfg_scale=1.0)
    (entry,) = seen
    assert entry["profile"].metadata["selection"]["branches"] == ["cond"]
    assert entry["run"].guidance_scale == 1.0


def test_changed_settings_get_their_own_profile_and_known_ones_are_not_probed_again(isolated, probes):
    _, seen = probes
    with Frontend("neo_flux") as f:
        for steps, cfg, interval in [(10, 3.0, 3), (12, 3.0, 3), (10, 3.0, 4), (10, 2.0, 3), (10, 3.0, 3), (12, 3.0, 3)]:
            _, p = f.run(args(True, interval, 2, profile="automatic"), steps=steps, cfg_scale=cfg)
            assert "HyCa steps" in p.extra_generation_params
        from hyca.adapters.webui.controller import CONTROLLER

        automatic = [c for key, c in CONTROLLER.book._known.items() if key[1] == "automatic" and len(key) > 4]
    settings = [(e["run"].steps, e["run"].guidance_scale, e["run"].interval) for e in seen]
    assert settings == [(10, 3.0, 3), (12, 3.0, 3), (10, 3.0, 4), (10, 2.0, 3)]  # the last two were known
    for entry in seen:
        chosen_for = entry["profile"].metadata["chosen_for"]
        assert (chosen_for["steps"], chosen_for["guidance_scale"], chosen_for["interval"]) == \
            (entry["run"].steps, entry["run"].guidance_scale, entry["run"].interval)
    assert len(automatic) == 4


def test_a_new_session_finds_the_cached_profile_for_its_settings(isolated, probes):
    _, seen = probes
    with Frontend("forge_flux") as f:
        first, _ = f.run(args(True, 3, 2, profile="automatic"), steps=10)
    with Frontend("forge_flux") as f:  # a restarted WebUI (empty book); the factory's seeded weights again
        second, p = f.run(args(True, 3, 2, profile="automatic"), steps=10)
    assert len(seen) == 1 and len(list(isolated.glob("*.safetensors"))) == 1
    torch.testing.assert_close(first.images[0], second.images[0], rtol=0, atol=0)
    assert p.extra_generation_params["HyCa steps"] == "5 computed, 5 forecast"


def test_a_cached_profile_the_pass_cannot_apply_is_passed_over_for_its_own_probe(isolated, probes, capsys):
    """The cache holds, for the pass's exact settings, a profile the WebUI cannot apply (a
    model output as wide as the blocks' hidden states, where the frontend's model call gives 4
    latent channels: another host's layout): a restarted WebUI says it passes it over and
    probes its own, and the pass is cached as the first one was, not left uncached."""
    from hyca.profiles.io import load_profile, save_profile

    _, seen = probes
    with Frontend("forge_flux") as f:
        first, _ = f.run(args(True, 3, 2, profile="automatic"), steps=10)
    (saved,) = isolated.glob("*.safetensors")
    residual = load_profile(saved)
    width = residual.labels.shape[1]
    other = Profile.uniform("taylor-1", 1, width)  # as wide as the blocks' hidden states: the file reads as this model's
    other.metadata.update({k: v for k, v in residual.metadata.items() if k in ("fingerprint", "chosen_for")},
                          target="model_output")
    save_profile(other, saved)
    capsys.readouterr()
    with Frontend("forge_flux") as f:
        second, p = f.run(args(True, 3, 2, profile="automatic"), steps=10)
    out = capsys.readouterr().out
    assert "passing over" in out and f"model output of {width} channels" in out and "runs uncached" not in out
    assert out.index("passing over") < out.index("probing")  # the reason first, then what it causes
    assert len(seen) == 2
    torch.testing.assert_close(first.images[0], second.images[0], rtol=0, atol=0)
    assert p.extra_generation_params["HyCa steps"] == "5 computed, 5 forecast"


def test_split_cond_and_uncond_calls_probe_at_the_second_step(isolated, probes, capsys):
    _, seen = probes
    with Frontend("forge_flux") as f:
        _, p = f.run(args(True, 3, 2, profile="automatic"), steps=10, split=True)
    (entry,) = seen
    assert entry["profile"].metadata["selection"]["branches"] == ["cond", "uncond"]
    assert "cached from step 2" in capsys.readouterr().out
    # step 1's two calls ran uncached while the probe gathered both branches; the 9 steps after it are cached
    plan = expected_plan(9, 3, 2)
    assert p.extra_generation_params["HyCa steps"] == f"{sum(plan)} computed, {len(plan) - sum(plan)} forecast"


def test_guided_calls_that_never_tell_uncond_apart_are_said_and_run_uncached(isolated, probes, capsys, monkeypatch):
    """A1111 with cond and uncond in separate calls of one image each (its batch_cond_uncond
    off): nothing tells the branches apart, so no guided probe; said once, the pass uncached."""
    from hyca.adapters.webui import probe

    monkeypatch.setattr(probe, "branches_in_call", lambda x, hint, conditioning, guided: {"cond": conditioning})
    _, seen = probes
    with Frontend("a1111_sd3") as f:
        plain, _ = f.run(args(False), steps=8)
        out_img, p = f.run(args(True, 3, 2, profile="automatic"), steps=8)
    assert seen == [] and "HyCa steps" not in p.extra_generation_params
    assert capsys.readouterr().out.count("cannot probe with guidance") == 1
    torch.testing.assert_close(out_img.images[0], plain.images[0], rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["forge_flux", "neo_flux", "a1111_sd3"])
def test_the_hires_pass_of_an_automatic_profile_is_settled_and_cached(kind, isolated, monkeypatch, capsys):
    """Forge and Neo start the hires pass twice (either side of a unet reset) while its
    profile is still pending: it is settled at its first model call and cached, as the first
    pass is, with no "could not start"."""
    from hyca.adapters.webui import probe
    from hyca.profiles.settings import RunSettings

    settled = []

    def uniform_probe(host, run, schedule, guard, fp, on_progress=None):
        profile = Profile.uniform("taylor-1", host.num_blocks, host.hidden_size)
        profile.metadata["chosen_for"] = run.merged(RunSettings(interval=schedule.interval, warmup=schedule.warmup,
                                                                compute_last=schedule.compute_last)).to_json()
        settled.append(run.steps)
        return profile

    monkeypatch.setattr(probe, "run_probe", uniform_probe)
    with Frontend(kind) as f:
        out, p = f.run(args(True, 3, 2, profile="automatic"), steps=10, enable_hr=True, hr_second_pass_steps=8)
    console = capsys.readouterr().out
    assert "could not start" not in console and "HyCa error" not in p.extra_generation_params, console
    assert "hires pass:" in console and len(settled) == 2, console  # the hires pass probed for its own steps
    assert math.isfinite(float(out.images[0].abs().max()))


@pytest.mark.parametrize("kind", ["forge_flux", "neo_flux", "a1111_sd3"])
def test_interrupt_during_the_probe_stops_it_and_saves_nothing(kind, isolated, monkeypatch, capsys):
    """The probe runs inside one of the sampler's model calls, and the frontend checks its
    Interrupt flag only between them: the probe looks at the flag itself, stops at its next
    model call, saves nothing, and the generation stops as the frontend stops it; the next
    generation probes again and runs cached."""
    from hyca.adapters.webui import probe

    progress = []

    def press_interrupt(fraction, text):  # the user presses Interrupt once the probe shows progress
        from modules import shared

        progress.append(fraction)
        shared.state.interrupted = True

    monkeypatch.setattr(probe, "progress_bar", press_interrupt)
    auto = args(True, 3, 2, profile="automatic")
    with Frontend(kind) as f:
        _, p1 = f.run(auto, steps=10, cfg_scale=3.0)
        first = capsys.readouterr().out
        assert "probe stopped: the generation was interrupted" in first and "profile ready" not in first
        assert p1.extra_generation_params["HyCa interrupted"] == "Interrupt during the probe, before any step was cached"
        assert not list(isolated.rglob("*.safetensors"))  # nothing saved
        assert p1.calls <= 2  # the frontend stopped at its next model call
        assert len(progress) == 1  # the probe stopped at its first step after the flag
        monkeypatch.setattr(probe, "progress_bar", lambda fraction, text: None)
        _, p2 = f.run(auto, steps=10, cfg_scale=3.0)
    assert "profile ready (probe, saved to" in capsys.readouterr().out
    assert p2.extra_generation_params["HyCa steps"] == "5 computed, 5 forecast"


@pytest.mark.parametrize("kind", ["forge_flux", "neo_flux", "a1111_sd3"])
@pytest.mark.parametrize("interval, warmup", [(1, 2), (3, 20)])
def test_automatic_with_nothing_to_forecast_probes_nothing_and_says_so(kind, interval, warmup, isolated, monkeypatch,
                                                                      capsys):
    """N=1, or a warm-up as long as the pass: no step is forecast, so "automatic" probes none
    (docs/requests.md); the image is the plain model's, the infotext counts every step
    computed, and the console says so, with no "could not settle" (found by a fresh helper)."""
    from hyca.adapters.webui import probe

    monkeypatch.setattr(probe, "run_probe", lambda *a, **k: pytest.fail("probed a pass that forecasts nothing"))
    with Frontend(kind) as f:
        cached, p = f.run(args(True, interval, warmup, profile="automatic"), steps=10, cfg_scale=3.0)
        plain, _ = f.run(args(False), steps=10, cfg_scale=3.0)
    out = capsys.readouterr().out
    assert torch.equal(cached.images[0], plain.images[0])
    assert p.extra_generation_params["HyCa steps"] == "10 computed, 0 forecast"
    assert "every step is computed" in out and "could not settle" not in out and "probing" not in out
    assert not list(isolated.rglob("*.safetensors"))


def test_a_note_is_said_once_on_the_console_not_also_as_a_log_line(isolated, capsys, caplog):
    """The pass's notes are the console's to show ([HyCa] lines): the engine does not log them
    as well, which printed "every step is computed" twice in the terminal (a fresh helper)."""
    with caplog.at_level(logging.INFO, logger="hyca"), Frontend("forge_flux") as f:
        f.run(args(True, 1, 2, profile="FORA (reuse)"), steps=10)
    assert capsys.readouterr().out.count("every step is computed") == 1
    # (the console line itself goes to the "hyca.webui" logger too: the engine's is "hyca")
    assert not [r for r in caplog.records if r.name == "hyca" and "every step is computed" in r.getMessage()]


def test_skip_during_the_probe_is_said_as_a_skip_in_the_console_and_the_infotext(isolated, monkeypatch, capsys):
    """Skip pressed while the automatic probe runs: the console and the image's infotext say
    Skip (not "interrupted"), and that no step was cached (found by a fresh helper)."""
    from hyca.adapters.webui import probe

    def press_skip(fraction, text):
        from modules import shared

        shared.state.skipped = True

    monkeypatch.setattr(probe, "progress_bar", press_skip)
    with Frontend("forge_flux") as f:
        _, p = f.run(args(True, 3, 2, profile="automatic"), steps=10, cfg_scale=3.0)
    out = capsys.readouterr().out
    assert "probe stopped: the generation was skipped" in out
    assert p.extra_generation_params["HyCa interrupted"] == "Skip during the probe, before any step was cached"
