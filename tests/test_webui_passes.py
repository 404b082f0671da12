"""Per-pass correctness of the WebUI extension through the stand-ins: img2img, the hires
pass (and switching HyCa off there), second-order samplers, cond/uncond split across
calls, batch count and size, interrupts and host exceptions, HyCa's own failures, other
extensions' wrappers and patches, unsupported models, and the automatic profile (probe on
first use, per-LoRA probes). Expected outputs come from webui_reference.py."""

import re

import pytest
import torch

from hyca import Profile

from webui_harness import Frontend, args, no_hyca_left
from webui_harness import ReferenceScript
from references import expected_plan


def computed(plan):
    return sum(plan), len(plan) - sum(plan)


def steps_text(*plans):
    c = sum(sum(p) for p in plans)
    return f"{c} computed, {sum(len(p) for p in plans) - c} forecast"


def assert_matches_reference(f, settings, branches=1, interval=3, warmup=2, hires_off=False):
    reference = f.reference(f.uniform_solvers(), interval, warmup, branches, **settings) if not hires_off else None
    if hires_off:
        from webui_reference import ReferenceHyCa

        ref = ReferenceHyCa(f.model, f.kind, f.uniform_solvers(), interval, warmup, branches, f.spec.timestep_multiplier)

        class HiresOff(ReferenceScript):
            def _start(self, p, *a, **k):
                self.reference.interval = 1 if p.is_hr_pass else interval
                super()._start(p)

        with ref:
            reference = f.run([], HiresOff(ref), **settings)
    cached, p = f.run(args(True, interval, warmup, hires=not hires_off), **settings)
    plain, _ = f.run(args(False), **settings)
    for got, want, full in zip(cached.images, reference[0].images, plain.images):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert (got - full).abs().max() > 1e-3
    assert no_hyca_left(f.model)
    return p, cached


@pytest.mark.parametrize("kind", ["forge_flux", "neo_lumina", "a1111_sd3"])
def test_img2img_walks_the_cut_schedule(kind):
    with Frontend(kind) as f:
        p, _ = assert_matches_reference(f, dict(steps=10, img2img=True, denoising_strength=0.6))
    # int(0.6 * 10) = 6: sigmas[3:] of the 10-step schedule, 7 steps
    assert p.extra_generation_params["HyCa steps"] == steps_text(expected_plan(7, 3, 2))


@pytest.mark.parametrize("kind", ["forge_flux", "neo_flux", "a1111_sd3"])
def test_hires_pass_gets_its_own_state_and_schedule(kind):
    settings = dict(steps=8, enable_hr=True, hr_second_pass_steps=6, denoising_strength=0.5)
    with Frontend(kind) as f:
        p, out = assert_matches_reference(f, settings)
    assert out.images[0].shape[-1] == 16  # the hires latent
    # hires: 6 steps of a schedule stretched to int(6 / 0.5) = 12
    assert p.extra_generation_params["HyCa steps"] == steps_text(expected_plan(8, 3, 2), expected_plan(6, 3, 2))


@pytest.mark.parametrize("kind", ["forge_mmditx", "neo_flux", "a1111_sd3"])
def test_hires_pass_can_be_left_uncached(kind, capsys):
    settings = dict(steps=8, enable_hr=True, hr_second_pass_steps=6, denoising_strength=0.5)
    with Frontend(kind) as f:
        p, _ = assert_matches_reference(f, settings, hires_off=True)
    assert p.extra_generation_params["HyCa steps"] == steps_text(expected_plan(8, 3, 2))
    assert p.extra_generation_params["HyCa hires"] == "off"
    assert capsys.readouterr().out.count("off for the hires pass") == 1  # once, though Forge starts the pass twice


@pytest.mark.parametrize("sampler", ["heun", "dpm2"])
@pytest.mark.parametrize("kind", ["forge_chroma", "neo_qwen", "a1111_sd3"])
def test_second_order_samplers_count_steps_by_sigma(kind, sampler):
    with Frontend(kind) as f:
        p, _ = assert_matches_reference(f, dict(steps=8, sampler_name=sampler))
    assert p.extra_generation_params["HyCa steps"] == steps_text(expected_plan(8, 3, 2))


@pytest.mark.parametrize("sampler", ["euler", "heun"])
@pytest.mark.parametrize("kind", ["forge_flux", "neo_wan"])
def test_cond_and_uncond_split_across_calls_keep_separate_state(kind, sampler):
    with Frontend(kind) as f:
        assert_matches_reference(f, dict(steps=8, split=True, sampler_name=sampler), branches=2)


def test_batch_count_and_size():
    with Frontend("neo_wan") as f:
        p, out = assert_matches_reference(f, dict(steps=10, n_iter=2, batch_size=2))
    assert len(out.images) == 2 and out.images[0].shape[0] == 2
    for line in out.infotexts:  # each batch reports its own pass, not a running total
        assert 'HyCa steps: "5 computed, 5 forecast"' in line


@pytest.mark.parametrize("kind", ["forge_flux", "neo_flux", "a1111_sd3"])
def test_interrupt_leaves_no_state_and_the_image_says_it_was_cut(kind, capsys):
    """The frontends return the latent they had when Interrupt is pressed and still write
    its infotext (their ``launch_sampling`` catches ``InterruptedException``): the record
    says the pass stopped, after how many of its steps, and counts only those."""
    with Frontend(kind) as f:
        fresh, _ = f.run(args(True), steps=10)
        assert "HyCa interrupted" not in fresh.infotexts[0]
        capsys.readouterr()
        interrupted, _ = f.run(args(True), steps=10, interrupt_at=5)
        assert no_hyca_left(f.model)
        again, _ = f.run(args(True), steps=10)
    assert not torch.equal(interrupted.images[0], fresh.images[0])
    assert torch.equal(again.images[0], fresh.images[0])
    # the flag is set at the sixth model call; the sampler's callback stops after that step
    assert "HyCa interrupted: Interrupt after 6 of 10 steps" in interrupted.infotexts[0]
    assert f'HyCa steps: "{steps_text(expected_plan(10, 3, 2)[:6])}"' in interrupted.infotexts[0]
    assert ("pass: stopped by Interrupt after 6 of 10 steps: 3 computed, 3 forecast; 50% of block compute skipped"
            in capsys.readouterr().out)
    assert "HyCa interrupted" not in again.infotexts[0]


@pytest.mark.parametrize("kind", ["forge_flux", "a1111_sd3"])
def test_after_a_skipped_batch_the_next_batch_says_nothing_of_it(kind, capsys):
    """Skip ends one batch (the frontends clear the flag before the next) and every batch's
    infotext is built from one ``extra_generation_params``: the skipped batch says so, the
    next one does not, and its image equals the same batch unskipped."""
    with Frontend(kind) as f:
        full, _ = f.run(args(True), steps=10, n_iter=2)
        skipped, _ = f.run(args(True), steps=10, n_iter=2, skip_at=4)
    assert "HyCa interrupted: Skip after 5 of 10 steps" in skipped.infotexts[0]
    assert "HyCa interrupted" not in skipped.infotexts[1]
    assert f'HyCa steps: "{steps_text(expected_plan(10, 3, 2))}"' in skipped.infotexts[1]
    assert torch.equal(skipped.images[1], full.images[1])
    assert not torch.equal(skipped.images[0], full.images[0])


class HostError(RuntimeError):
    pass


@pytest.mark.parametrize("kind", ["forge_flux", "neo_qwen", "a1111_sd3"])
def test_host_exception_skips_postprocess_and_the_next_generation_starts_clean(kind, monkeypatch):
    with Frontend(kind) as f:
        fresh, _ = f.run(args(True), steps=10)
        calls = {"n": 0}
        target = f.model
        original = type(target).forward

        def failing(self, *a, **k):  # out of memory on the 6th model call
            calls["n"] += 1
            if calls["n"] == 6:
                raise HostError("CUDA out of memory (stand-in)")
            return original(self, *a, **k)

        monkeypatch.setattr(type(target), "forward", failing)
        with pytest.raises(HostError):
            f.run(args(True), steps=10)
        monkeypatch.setattr(type(target), "forward", original)
        again, _ = f.run(args(True), steps=10)
    assert torch.equal(again.images[0], fresh.images[0])


@pytest.mark.parametrize("where", ["predicted_residual", "record"])
@pytest.mark.parametrize("kind", ["forge_flux", "neo_flux", "neo_lumina", "a1111_sd3"])
def test_failure_inside_hyca_falls_back_to_uncached_output(kind, where, monkeypatch, capsys):
    from hyca.engine.cache import HybridCache

    def broken(self, *a, **k):
        raise RuntimeError("engine stand-in failure")

    monkeypatch.setattr(HybridCache, where, broken)
    with Frontend(kind) as f:
        plain, _ = f.run(args(False), steps=8)
        out, p = f.run(args(True), steps=8)
        assert no_hyca_left(f.model)
    assert torch.equal(out.images[0], plain.images[0])
    lines = [line for line in capsys.readouterr().out.splitlines() if "continues uncached" in line]
    assert len(lines) == 1 and "engine stand-in failure" in lines[0]


def test_other_extensions_wrapper_and_patches_stay_in_charge():
    with Frontend("neo_flux") as f:
        seen = {"wrapper": 0, "patch": 0}
        base = f.model

        def other_wrapper(model_function, kw):
            seen["wrapper"] += 1
            return model_function(kw["input"], kw["timestep"], **kw["c"])

        def other_patch(args_, extra):
            seen["patch"] += 1
            return extra["original_block"](args_)

        def install(p):
            unet = p.sd_model.forge_objects_original.unet
            unet.set_model_unet_function_wrapper(other_wrapper)
            unet.set_model_patch_replace(other_patch, "dit", "double_block", 1)

        from webui_harness import Processing, generate

        expected = f.reference(f.uniform_solvers(), 3, 2, steps=10)[0]
        p = Processing("neo_flux", base, steps=10)
        install(p)
        with torch.no_grad():
            out = generate(p, f.script, args(True))
    torch.testing.assert_close(out.images[0], expected.images[0], rtol=1e-4, atol=1e-4)
    assert seen["wrapper"] == 10  # every model call still went through the other wrapper
    assert seen["patch"] == 5  # and its block patch ran on each computed step


def test_unsupported_model_is_left_untouched(capsys):
    from webui_harness import Processing, generate

    class UNetModel(torch.nn.Module):  # an SDXL-like model HyCa does not know
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x, timestep, context=None, **kwargs):
            return self.conv(x)

    with Frontend("forge_flux") as f:
        model = UNetModel()
        runs = []
        for enabled in (True, True, False):
            p = Processing("forge_flux", model, steps=4)
            with torch.no_grad():
                runs.append(generate(p, f.script, args(enabled)).images[0])
        assert not any(k in p.extra_generation_params for k in ("HyCa steps",))
    assert torch.equal(runs[0], runs[2])
    said = [line for line in capsys.readouterr().out.splitlines() if "not supported" in line]
    assert len(said) == 1 and "UNetModel" in said[0]


def test_nunchaku_variant_is_not_touched():
    from hyca.adapters.webui.registry import recognise

    with Frontend("forge_flux") as f:
        quantized = type("NunchakuFluxTransformer2dModel", (type(f.model),), {})()
        assert recognise(f.model) is not None and recognise(quantized) is None


@pytest.mark.parametrize("kind", ["forge_flux", "a1111_sd3"])
def test_automatic_profile_probes_once_then_caches(kind, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HYCA_CACHE", str(tmp_path))
    monkeypatch.setenv("HYCA_HUB_REPO", "none")
    monkeypatch.delenv("HYCA_PROFILES", raising=False)
    auto = args(True, 3, 2, profile="automatic")
    with Frontend(kind) as f:
        plain, _ = f.run(args(False), steps=10)
        probed, p1 = f.run(auto, steps=10)
        files = list(tmp_path.glob("*.safetensors"))
        from hyca.adapters.webui.controller import CONTROLLER

        (profile,) = [c.profile for key, c in CONTROLLER.book._known.items() if key[1] == "automatic"]
        cached, p2 = f.run(auto, steps=10)
        # LoRA reuse off: a new LoRA set is probed on its own pass and compared with the base
        lora_probe, p3 = f.run(args(True, 3, 2, profile="automatic", lora_reuse=False), steps=10, lora_hash="abc123")
        lora_run, p4 = f.run(args(True, 3, 2, profile="automatic", lora_reuse=False), steps=10, lora_hash="abc123")
        if "first_interval" not in profile.metadata:
            expected = f.reference(profile.dim_solvers(), 3, 2, branches=2, steps=10)[0]
            torch.testing.assert_close(cached.images[0], expected.images[0], rtol=1e-4, atol=1e-4)
    out = capsys.readouterr().out
    # the probe runs at the pass's first call, and the pass is cached with its profile
    assert p1.extra_generation_params["HyCa steps"] == "5 computed, 5 forecast"
    assert (probed.images[0] - plain.images[0]).abs().max() > 1e-3
    torch.testing.assert_close(probed.images[0], cached.images[0], rtol=0, atol=0)
    assert len(files) == 1 and out.count("profile ready (probe, saved to") == 1
    assert len(profile.solver_names()) >= 1 and profile.num_clusters > 1
    assert p2.extra_generation_params["HyCa steps"] == "5 computed, 5 forecast"
    # the same weights probed the same way: the LoRA set's clusters agree exactly
    assert re.search(r"ARI 1\.000 against the base profile", out)
    assert p3.extra_generation_params["HyCa LoRA ARI"] == p4.extra_generation_params["HyCa LoRA ARI"] == "1.000"
    torch.testing.assert_close(lora_run.images[0], cached.images[0], rtol=0, atol=0)
    torch.testing.assert_close(lora_probe.images[0], cached.images[0], rtol=0, atol=0)


def hybrid_profile(blocks, dim, seed=0):
    """Four clusters per block, five different solvers."""
    from hyca.math.solvers import pool_names

    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor([pool_names().index(n) for n in ("reuse", "taylor-2", "lagrange-3", "bdf3", "am2")])
    return Profile(torch.randint(0, 4, (blocks, dim), generator=g), ids[torch.randint(0, 5, (blocks, 4), generator=g)])


@pytest.mark.parametrize("kind", ["neo_flux", "forge_mmditx"])
def test_local_profile_file_is_listed_validated_and_used(kind, tmp_path, monkeypatch, capsys):
    from hyca.adapters.webui import profiles
    from hyca.adapters.webui.fingerprint import fingerprint
    from hyca.adapters.webui.registry import recognise
    from hyca.profiles.io import save_profile

    monkeypatch.setenv("HYCA_PROFILES", str(tmp_path))
    with Frontend(kind) as f:
        fp = fingerprint(f.model, recognise(f.model))
        profile = hybrid_profile(sum(fp["blocks"].values()), fp["hidden_size"])
        save_profile(profile, tmp_path / "mine.safetensors", fp)
        foreign = dict(fp, blocks={"other_blocks": 1}, hidden_size=8)
        save_profile(Profile.uniform("reuse", 1, 8), tmp_path / "foreign.safetensors", foreign)
        # a diffusers model's profile (the shipped reference ones) and a file that is no profile:
        # not offered, as no WebUI model could run them
        save_profile(Profile.uniform("reuse", 1, 8), tmp_path / "diffusers.safetensors",
                     dict(foreign, **{"class": "FluxTransformer2DModel"}))
        (tmp_path / "junk.safetensors").write_bytes(b"not a profile")
        menu = set(profiles.choices())
        assert {"mine.safetensors", "foreign.safetensors"} <= menu
        assert not {"diffusers.safetensors", "junk.safetensors"} & menu
        assert not any(name.startswith("FluxTransformer2DModel-") for name in menu)  # the shipped ones
        expected = f.reference(profile.dim_solvers(), 3, 2, steps=10)[0]
        out, p = f.run(args(True, 3, 2, profile="mine.safetensors"), steps=10)
        plain, _ = f.run(args(False), steps=10)
        wrong, p_wrong = f.run(args(True, 3, 2, profile="foreign.safetensors"), steps=10)
    torch.testing.assert_close(out.images[0], expected.images[0], rtol=1e-4, atol=1e-4)
    assert p.extra_generation_params["HyCa profile"] == "mine.safetensors"
    # a profile for another model: one clear line, and the generation runs uncached
    assert torch.equal(wrong.images[0], plain.images[0])
    assert "HyCa steps" not in p_wrong.extra_generation_params
    assert p_wrong.extra_generation_params["HyCa error"] == "ProfileError, this pass ran uncached"  # said there too
    lines = [line for line in capsys.readouterr().out.splitlines() if "could not start" in line]
    assert len(lines) == 1 and "foreign.safetensors" in lines[0]


def test_cache_precision_setting_stores_the_history_in_that_dtype(monkeypatch):
    from hyca.engine.cache import HybridCache

    seen = set()
    real_end_step = HybridCache.end_step

    def spy(self, state):  # the real end_step, noting the dtype of what the history holds
        real_end_step(self, state)
        seen.update(t.dtype for h in state.histories for t in h)

    monkeypatch.setattr(HybridCache, "end_step", spy)
    with Frontend("forge_flux") as f:
        reference = f.reference(f.uniform_solvers(), 3, 2, steps=10)[0]
        half, p = f.run(args(True, 3, 2, cache_dtype="bfloat16"), steps=10)
    assert seen == {torch.bfloat16}
    assert p.extra_generation_params["HyCa cache dtype"] == "bfloat16"
    error = (half.images[0] - reference.images[0]).abs().max()
    assert 0 < error < 0.05  # rounded history, same forecast up to bf16 precision
