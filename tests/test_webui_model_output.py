"""Model-output profiles (``target="model_output"``) in the WebUI extension, on every
frontend stand-in: the session records the frontend's model call (Forge / Neo
``apply_model``'s denoised latent, A1111's ``MMDiT.forward`` velocity) as its derivative and,
on a forecast call, does not run the model at all. The expectation is independent
(webui_reference.ModelOutputReference): plain torch hooks on the unpatched diffusion model
store its velocity output on computed steps and replace it on skipped ones by the
hand-written per-channel forecast."""

from __future__ import annotations

import pytest
import torch

from hyca import Profile
from hyca.math.solvers import pool_names

from test_webui_output_head import isolated  # noqa: F401 - the fixture: a temporary profile folder and cache, no Hub
from webui_harness import Frontend, ReferenceScript, args, no_hyca_left
from webui_reference import ModelOutputReference

KINDS = ["forge_flux", "forge_chroma", "forge_mmditx", "neo_flux", "neo_qwen", "neo_wan", "neo_lumina", "a1111_sd3"]
STEPS, INTERVAL, WARMUP = 10, 3, 2


def model_output_profile(channels: int, seed: int = 0) -> Profile:
    """One "block" of ``channels`` latent channels, each given one of four solvers."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor([pool_names().index(n) for n in ("reuse", "taylor-2", "lagrange-3", "am2")])
    profile = Profile(torch.randint(0, 4, (1, channels), generator=g), ids.reshape(1, 4))
    profile.metadata["target"] = "model_output"
    return profile


class ModelCalls:
    """How many times the diffusion model's own forward ran, counted at its first block (A1111's
    model is gated by an instance ``forward``: the module's pre-hooks run even when HyCa skips it)."""

    def __init__(self, model: torch.nn.Module):
        from hyca.adapters.webui.registry import recognise

        self.first_block, self.count = recognise(model).blocks(model)[0][2], 0

    def __enter__(self):
        self.handle = self.first_block.register_forward_pre_hook(lambda *_: setattr(self, "count", self.count + 1))
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def reference_run(f: Frontend, profile: Profile, **settings):
    """The reference's result; its branches are told apart by call order at one sigma, so a
    frontend that batches cond and uncond into one call has one (Heun calls twice at a sigma)."""
    branches = 2 if settings.get("split") else 1
    reference = ModelOutputReference(f.model, profile.dim_solvers(), INTERVAL, WARMUP, branches,
                                     f.spec.timestep_multiplier)
    with reference:
        out, _ = f.run([], ReferenceScript(reference), steps=STEPS, **settings)
    return out, reference


def saved(f: Frontend, folder, profile: Profile, name: str = "model.safetensors") -> str:
    from hyca.adapters.webui.fingerprint import fingerprint
    from hyca.adapters.webui.registry import recognise
    from hyca.profiles.io import save_profile

    save_profile(profile, folder / name, fingerprint(f.model, recognise(f.model)))
    return name


@pytest.mark.parametrize("kind", KINDS)
def test_a_model_output_profile_forecasts_the_model_call_and_skips_the_model(kind, isolated):
    with Frontend(kind) as f:
        profile = model_output_profile(f.spec.latent[0])
        name = saved(f, isolated, profile)
        expected, reference = reference_run(f, profile)
        with ModelCalls(f.model) as calls:
            cached, p = f.run(args(True, INTERVAL, WARMUP, profile=name), steps=STEPS)
        assert no_hyca_left(f.model)
        plain, _ = f.run(args(False), steps=STEPS)
    torch.testing.assert_close(cached.images[0], expected.images[0], rtol=1e-4, atol=1e-4)
    assert (cached.images[0] - plain.images[0]).abs().max() > 1e-3
    assert p.extra_generation_params["HyCa steps"] == "5 computed, 5 forecast"
    assert calls.count == sum(reference.decisions) < len(reference.decisions)  # forecast calls never ran the model


@pytest.mark.parametrize("kind,sampler", [("forge_flux", "dpm2"), ("forge_flux", "heun"), ("neo_wan", "dpm2"), ("neo_wan", "heun"), ("a1111_sd3", "dpm2")])
def test_second_order_calls_forecast_the_model_output_at_their_fraction(kind, sampler, isolated):
    with Frontend(kind) as f:
        profile = model_output_profile(f.spec.latent[0], seed=1)
        name = saved(f, isolated, profile)
        expected, _ = reference_run(f, profile, sampler_name=sampler)
        cached, _ = f.run(args(True, INTERVAL, WARMUP, profile=name), steps=STEPS, sampler_name=sampler)
    torch.testing.assert_close(cached.images[0], expected.images[0], rtol=1e-4, atol=1e-4)


def test_batched_and_split_guidance_calls_give_the_same_image(isolated):
    """Forge batches cond and uncond into one call or calls them apart (``split``): the
    model output is forecast per branch either way."""
    with Frontend("forge_flux") as f:
        name = saved(f, isolated, model_output_profile(f.spec.latent[0], seed=2))
        batched, _ = f.run(args(True, INTERVAL, WARMUP, profile=name), steps=STEPS, sampler_name="heun")
        split, _ = f.run(args(True, INTERVAL, WARMUP, profile=name), steps=STEPS, sampler_name="heun", split=True)
        expected, _ = reference_run(f, model_output_profile(f.spec.latent[0], seed=2), sampler_name="heun",
                                    split=True)
    torch.testing.assert_close(batched.images[0], split.images[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(split.images[0], expected.images[0], rtol=1e-4, atol=1e-4)


def test_a_probed_model_output_profile_caches_the_pass_that_asked_for_it(isolated, monkeypatch, capsys):
    """The automatic path: the probe is offered the model output; its choice is saved, read
    back and run from the pass's first step, equal to the reference."""
    from hyca.adapters.webui import probe
    from hyca.profiles.settings import RunSettings

    chosen = {}

    def probe_returning_a_model_output_profile(host, run, schedule, guard, fp, on_progress=None):
        assert host.model_output
        chosen["profile"] = model_output_profile(4, seed=3)
        chosen["profile"].metadata["chosen_for"] = run.merged(RunSettings(
            interval=schedule.interval, warmup=schedule.warmup, compute_last=schedule.compute_last)).to_json()
        return chosen["profile"]

    monkeypatch.setattr(probe, "run_probe", probe_returning_a_model_output_profile)
    with Frontend("neo_flux") as f:
        cached, p = f.run(args(True, INTERVAL, WARMUP, profile="automatic"), steps=STEPS)
        expected, _ = reference_run(f, chosen["profile"])
    torch.testing.assert_close(cached.images[0], expected.images[0], rtol=1e-4, atol=1e-4)
    assert p.extra_generation_params["HyCa steps"] == "5 computed, 5 forecast"
    out = capsys.readouterr().out
    assert "could not" not in out and "profile ready" in out, out


def test_a_profile_of_other_channels_falls_back_to_uncached_and_says_so(isolated, capsys):
    """A model-output profile made for another layout (a diffusers profile of FLUX's 64
    packed channels) cannot forecast this model call: it is found before the model runs (the
    model runs once per call, as without HyCa), one console line, the pass uncached, and the
    infotext says HyCa stopped."""
    with Frontend("forge_flux") as f:
        name = saved(f, isolated, model_output_profile(4 * f.spec.latent[0]))
        with ModelCalls(f.model) as calls:
            refused, p = f.run(args(True, INTERVAL, WARMUP, profile=name), steps=STEPS)
        with ModelCalls(f.model) as plain_calls:
            plain, _ = f.run(args(False), steps=STEPS)
        assert no_hyca_left(f.model)
    assert torch.equal(refused.images[0], plain.images[0]) and calls.count == plain_calls.count
    lines = [line for line in capsys.readouterr().out.splitlines() if "output channels" in line]
    assert len(lines) == 1 and "16 output channels" in lines[0] and "uncached" in lines[0], lines
    assert "16 output channels" in p.extra_generation_params["HyCa stopped"]


def test_a_failure_part_way_is_in_the_infotext_and_runs_no_call_twice(isolated, monkeypatch):
    """HyCa stops at its first forecast (an injected fault): that call and the rest run
    uncached, once each, and the infotext says HyCa stopped and why, beside the steps it ran."""
    from hyca.engine.cache import HybridCache

    def broken(self, state):
        raise RuntimeError("injected fault")

    with Frontend("neo_flux") as f:
        name = saved(f, isolated, model_output_profile(f.spec.latent[0]))
        monkeypatch.setattr(HybridCache, "predicted_residual", broken)
        with ModelCalls(f.model) as calls:
            stopped, p = f.run(args(True, INTERVAL, WARMUP, profile=name), steps=STEPS)
        monkeypatch.undo()
        with ModelCalls(f.model) as plain_calls:
            plain, _ = f.run(args(False), steps=STEPS)
    assert torch.equal(stopped.images[0], plain.images[0]) and calls.count == plain_calls.count
    assert "injected fault" in p.extra_generation_params["HyCa stopped"]


def test_a_forecast_that_is_not_finite_computes_that_call_and_the_pass_goes_on(isolated, monkeypatch, capsys):
    """DPM2's midpoint call of a forecast step gets a non-finite forecast: that call runs the
    model (said once), and the pass stays cached."""
    from hyca.engine.cache import HybridCache, NonFiniteForecast

    real = HybridCache.predicted_residual

    def nan_between_steps(self, state):
        if state.current_position % 1:
            state.stats.non_finite += 1
            raise NonFiniteForecast("not finite")
        return real(self, state)

    monkeypatch.setattr(HybridCache, "predicted_residual", nan_between_steps)
    with Frontend("forge_flux") as f:
        name = saved(f, isolated, model_output_profile(f.spec.latent[0]))
        out, p = f.run(args(True, INTERVAL, WARMUP, profile=name), steps=STEPS, sampler_name="dpm2")
    assert "HyCa stopped" not in p.extra_generation_params
    assert p.extra_generation_params["HyCa steps"] == "5 computed, 5 forecast"
    assert bool(torch.isfinite(out.images[0]).all())
    assert capsys.readouterr().out.count("a forecast was not finite") == 1


def test_the_real_probe_offers_and_can_keep_the_model_output(isolated, capsys):
    """The core closed-loop probe on a WebUI pass records the model output on its own run
    and scores its candidates: the report lists them beside the residual ones."""
    from hyca.profiles.io import load_profile

    with Frontend("forge_flux") as f:
        cached, p = f.run(args(True, 2, WARMUP, profile="automatic"), steps=STEPS)
    saved_profile, = (isolated / "cache").glob("*.safetensors")
    names = [trial["name"] for trial in load_profile(saved_profile).metadata["selection"]["closed_loop"]["trials"]]
    assert {"model:eq5", "model,lite:eq5", "eq5"} <= set(names), names  # both default targets, scored
    assert not [n for n in names if n.startswith("output")], names  # the head's: the model output's linear image
    assert "HyCa steps" in p.extra_generation_params


def test_a_lite_profile_that_forecasts_the_last_step_says_so_in_the_infotext(isolated):
    """A profile the probe chose with TaylorSeer lite's end (metadata ``skip_last``) forecasts
    the last step even with "Compute the last step" on, as chosen; the infotext keeps what was
    asked ("HyCa last step: on") and says what ran."""
    from hyca.profiles.settings import RunSettings

    with Frontend("forge_flux") as f:
        profile = model_output_profile(f.spec.latent[0])
        profile.metadata.update(first_interval=2, skip_last=True, chosen_for=RunSettings(
            steps=STEPS, interval=INTERVAL, warmup=WARMUP, compute_last=False).to_json())
        name = saved(f, isolated, profile)
        _, p = f.run(args(True, INTERVAL, WARMUP, compute_last=True, profile=name), steps=STEPS)
        _, plain_end = f.run(args(True, INTERVAL, WARMUP, compute_last=True, profile=saved(
            f, isolated, model_output_profile(f.spec.latent[0]), "plain.safetensors")), steps=STEPS)
    assert p.extra_generation_params["HyCa last step ran"].startswith("forecast")
    assert "HyCa last step ran" not in plain_end.extra_generation_params


def test_the_hosts_exception_from_a_model_call_hyca_asked_for_passes_through():
    """A forecast that is not finite makes the call run the model; an interrupt (or out of
    memory) the model raises there is the host's: it passes through untouched, and HyCa does
    not stop or run the call again (ComfyUI clears its interrupt flag when it raises)."""
    from hyca.adapters.webui.session import PassSession
    from hyca.engine.cache import HybridCache, NonFiniteForecast
    from hyca.engine.schedule import Schedule

    class Interrupted(Exception):
        pass

    engine = HybridCache(model_output_profile(4), Schedule(interval=3, warmup=2), guard=False, compare_settings=False)
    sigmas = [1.0 - k / 10 for k in range(11)]
    session = PassSession(engine, sigmas, "pass")
    x = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    calls = []

    def model_call():
        calls.append(1)
        return x * 0.5

    for sigma in sigmas[:2]:  # the warm-up computes
        session.run_call(x, sigma, None, model_call)

    def interrupted():
        calls.append(1)
        raise Interrupted

    def not_finite(state):
        raise NonFiniteForecast("not finite")

    engine.predicted_residual = not_finite
    with pytest.raises(Interrupted):
        session.run_call(x, sigmas[2], None, interrupted)  # a forecast step: its forecast is not finite
    assert len(calls) == 3 and not session.failed and session.stopped is None


@pytest.mark.parametrize("kind", ["forge_flux", "neo_flux", "a1111_sd3"])
def test_a_sampler_that_adds_noise_every_step_forecasts_residuals_with_reuse(kind, isolated, capsys):
    """"Euler a" re-noises every step: a model-output profile's forecast cannot follow the
    fresh noise, so the pass forecasts the residuals with plain reuse, giving the image of
    the FORA menu entry, and says why on the console and in the infotext (as ComfyUI does:
    tests/test_comfyui_reference.py); Euler keeps the profile."""
    with Frontend(kind) as f:
        name = saved(f, isolated, model_output_profile(f.spec.latent[0], seed=4))
        noisy, p = f.run(args(True, INTERVAL, WARMUP, profile=name), steps=STEPS, sampler_name="Euler a")
        fora, _ = f.run(args(True, INTERVAL, WARMUP, profile="FORA (reuse)"), steps=STEPS, sampler_name="Euler a")
        plain, _ = f.run(args(False), steps=STEPS, sampler_name="Euler a")
        kept, _ = f.run(args(True, INTERVAL, WARMUP, profile=name), steps=STEPS)
        fora_euler, _ = f.run(args(True, INTERVAL, WARMUP, profile="FORA (reuse)"), steps=STEPS)
    out = capsys.readouterr().out
    torch.testing.assert_close(noisy.images[0], fora.images[0], rtol=0, atol=0)
    assert (noisy.images[0] - plain.images[0]).abs().max() > 1e-3  # cached: the comparison can tell
    assert (kept.images[0] - fora_euler.images[0]).abs().max() > 1e-3
    assert "sampler: Euler a adds fresh noise every step" in out and "plain reuse (FORA) instead of its profile" in out
    assert "HyCa off-settings" in p.extra_generation_params  # the infotext: the pass ran away from its profile


@pytest.mark.parametrize("kind", ["forge_flux", "a1111_sd3"])
def test_a_sampler_that_replaces_the_noise_every_step_computes_every_step(kind, isolated, capsys):
    """"LCM" draws the whole noise anew at every step: no forecast follows it
    (bench/results/renoising.md), so the pass computes every step (its image is the one with
    HyCa off) and the console says why; the infotext counts no forecast step."""
    with Frontend(kind) as f:
        cached, p = f.run(args(True, INTERVAL, WARMUP, profile="FORA (reuse)"), steps=STEPS, sampler_name="LCM")
        plain, _ = f.run(args(False), steps=STEPS, sampler_name="LCM")
        automatic, _ = f.run(args(True, INTERVAL, WARMUP, profile="automatic"), steps=STEPS, sampler_name="LCM")
        euler, _ = f.run(args(True, INTERVAL, WARMUP, profile="FORA (reuse)"), steps=STEPS)
        euler_plain, _ = f.run(args(False), steps=STEPS)
    out = capsys.readouterr().out
    torch.testing.assert_close(cached.images[0], plain.images[0], rtol=0, atol=0)
    torch.testing.assert_close(automatic.images[0], plain.images[0], rtol=0, atol=0)
    assert "probing" not in out  # "automatic" probes nothing for a run that forecasts nothing
    assert (euler.images[0] - euler_plain.images[0]).abs().max() > 1e-3  # FORA does forecast on Euler
    assert "sampler: LCM replaces the sample's noise at every step" in out
    assert p.extra_generation_params["HyCa steps"] == f"{STEPS} computed, 0 forecast"

