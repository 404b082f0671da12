"""What a block does with its input and which blocks run must not change what HyCa
records or forecasts: in-place blocks (Forge Neo FLUX), a block that starts writing in
place unannounced, blocks left out by Forge's SD3.5 skip list, and another extension's
layer-skip patch. Expected outputs come from webui_reference.py, which measures every
block against a copy of its input and adds the forecast at the first block that runs."""

import copy

import pytest
import torch

from webui_harness import Frontend, args, no_hyca_left
from webui_harness import Processing, ReferenceScript, generate
from webui_reference import ReferenceHyCa


def run_with(f, script, script_args, install=None, **settings):
    """One generation with ``install(p)`` applied to the frontend's unet first."""
    p = Processing(f.kind, f.model, **settings)
    if install is not None:
        install(p)
    return generate(p, script, script_args), p


def reference_with(f, install=None, interval=3, warmup=2, **settings):
    reference = ReferenceHyCa(f.model, f.kind, f.uniform_solvers(), interval, warmup, 1, f.spec.timestep_multiplier)
    with reference:
        out, _ = run_with(f, ReferenceScript(reference), [], install, **settings)
    return out


def test_neo_flux_blocks_write_in_place_like_upstream():
    """The stand-in reproduces upstream's in-place blocks: output is the input object."""
    with Frontend("neo_flux") as f:
        double, single = f.model.double_blocks[0], f.model.single_blocks[0]
        img, txt = torch.randn(1, 16, 32), torch.randn(1, 5, 32)
        vec, pe = torch.randn(1, 32), torch.zeros(1, 21, 32)
        with torch.no_grad():
            out_img, out_txt = double(img=img, txt=txt, vec=vec, pe=pe)
            x = torch.randn(1, 21, 32)
            out_x = single(x, vec=vec, pe=pe)
    assert out_img is img and out_txt is txt and out_x is x


@pytest.mark.parametrize("guard", [False, True])
def test_neo_flux_forecast_steps_match_the_reference_and_the_probe_sees_real_residuals(guard, tmp_path, monkeypatch):
    """In-place blocks: skip steps equal the reference (which copies inputs), and the
    residuals the probe records are not zero."""
    with Frontend("neo_flux") as f:
        reference = f.reference(f.uniform_solvers(), 3, 2, steps=10)[0]
        cached, p = f.run(args(True, 3, 2, guard=guard), steps=10)
        plain, _ = f.run(args(False), steps=10)
        from hyca.probing.recorder import SketchRecorder

        seen = []
        real_record = SketchRecorder.record
        monkeypatch.setattr(SketchRecorder, "record",
                            lambda self, state, block, residual: seen.append((self.target, residual.abs().max().item()))
                            or real_record(self, state, block, residual))
        monkeypatch.setenv("HYCA_CACHE", str(tmp_path))
        monkeypatch.setenv("HYCA_HUB_REPO", "none")
        monkeypatch.delenv("HYCA_PROFILES", raising=False)
        f.run(args(True, 3, 2, profile="automatic"), steps=10)
    if not guard:
        torch.testing.assert_close(cached.images[0], reference.images[0], rtol=1e-4, atol=1e-4)
    assert (cached.images[0] - plain.images[0]).abs().max() > 1e-2
    assert p.extra_generation_params["HyCa steps"] == "5 computed, 5 forecast"
    blocks = [value for target, value in seen if target == "residual"]
    # the model output's recording (the head's input is recorded only when asked for: probe._SUBSUMED_BY_MODEL_OUTPUT)
    outputs = [value for target, value in seen if target == "model_output"]
    assert len(blocks) == 10 * 2 * 5 and min(blocks) > 0  # 10 steps x 2 branches (CFG 3) x 5 blocks, none zero
    assert len(outputs) == 10 * 2 and min(outputs) > 0  # the model call's output, once per step and branch


def test_block_that_starts_writing_in_place_is_a_failure_not_a_zero_residual(monkeypatch, capsys):
    """Forge samples under inference_mode: no version counter tells a write. A block seen
    out of place that later hands back its input updated in place would record an
    identically zero residual; HyCa says so once and the pass runs uncached."""
    with Frontend("forge_flux") as f:
        plain, _ = f.run(args(False), steps=8)
        block_class = type(f.model.single_blocks[1])
        calls = {"n": 0}
        original = block_class.forward

        def sometimes_in_place(self, x, vec, pe):
            if self is f.model.single_blocks[1]:
                calls["n"] += 1
                if calls["n"] > 1:
                    return self.body(x, vec, pe, in_place=True)
            return original(self, x, vec, pe)

        monkeypatch.setattr(block_class, "forward", sometimes_in_place)
        out, p = f.run(args(True, 3, 2), steps=8)
        assert no_hyca_left(f.model)
    torch.testing.assert_close(out.images[0], plain.images[0], rtol=1e-5, atol=1e-5)
    lines = [line for line in capsys.readouterr().out.splitlines() if "continues uncached" in line]
    assert len(lines) == 1 and "identically zero" in lines[0]


@pytest.mark.parametrize("kind", ["neo_flux", "a1111_sd3"])
def test_a_block_that_hands_back_its_input_unchanged_records_a_zero_residual(kind, monkeypatch):
    """An identity block (e.g. skipped by another extension) that returns its own input:
    zero is its true residual, and caching goes on (under inference_mode and no_grad)."""
    with Frontend(kind) as f:
        blocks = f.model.double_blocks if kind == "neo_flux" else f.model.joint_blocks
        target = blocks[1]

        def identity(*a, **k):
            if kind == "neo_flux":
                return k["img"], k["txt"]
            return a[0], a[1]

        monkeypatch.setattr(target, "forward", identity)
        reference = f.reference(f.uniform_solvers(), 3, 2, steps=10)[0]
        cached, p = f.run(args(True, 3, 2), steps=10)
    torch.testing.assert_close(cached.images[0], reference.images[0], rtol=1e-4, atol=1e-4)
    assert p.extra_generation_params["HyCa steps"] == "5 computed, 5 forecast"


def skip_block_zero(p):
    """Forge's SD3.5 skip list (mmditx.py ``transformer_options["skip_layers"]``)."""
    p.sd_model.forge_objects_original.unet.model_options["transformer_options"]["skip_layers"] = [0]


def test_forecast_does_not_depend_on_block_zero_running():
    with Frontend("forge_mmditx") as f:
        reference = reference_with(f, skip_block_zero, steps=10)
        cached, p = run_with(f, f.script, args(True, 3, 2), skip_block_zero, steps=10)
        skipped_plain, _ = run_with(f, f.script, args(False), skip_block_zero, steps=10)
        plain, _ = f.run(args(False), steps=10)
    assert not torch.equal(skipped_plain.images[0], plain.images[0])  # block 0 really was left out
    torch.testing.assert_close(cached.images[0], reference.images[0], rtol=1e-4, atol=1e-4)
    assert (cached.images[0] - skipped_plain.images[0]).abs().max() > 1e-3
    assert p.extra_generation_params["HyCa steps"] == "5 computed, 5 forecast"


def test_another_extensions_layer_skip_patch_on_block_zero():
    """A Neo ``dit`` replace patch that skips double block 0 (hands its inputs back):
    HyCa's patch wraps it, records a zero residual for it, and forecasts as the reference
    does (where block 0 never runs and block 1 adds the forecast)."""

    def skip(args_, extra):
        return {"img": args_["img"], "txt": args_["txt"]}

    def install(p):
        p.sd_model.forge_objects_original.unet.set_model_patch_replace(skip, "dit", "double_block", 0)

    with Frontend("neo_flux") as f:
        reference = reference_with(f, install, steps=10)
        cached, p = run_with(f, f.script, args(True, 3, 2), install, steps=10)
        skipped_plain, _ = run_with(f, f.script, args(False), install, steps=10)
    torch.testing.assert_close(cached.images[0], reference.images[0], rtol=1e-4, atol=1e-4)
    assert (cached.images[0] - skipped_plain.images[0]).abs().max() > 1e-3
    assert p.extra_generation_params["HyCa steps"] == "5 computed, 5 forecast"


def test_unet_options_are_not_shared_between_runs():
    """Guard for the helpers above: patches set on one Processing do not leak."""
    with Frontend("neo_flux") as f:
        p = Processing("neo_flux", f.model, steps=2)
        q = Processing("neo_flux", f.model, steps=2)
        p.sd_model.forge_objects_original.unet.set_model_patch_replace(lambda a, e: a, "dit", "double_block", 0)
        assert "patches_replace" not in copy.deepcopy(q.sd_model.forge_objects_original.unet.model_options)["transformer_options"]
