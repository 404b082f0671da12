"""Image sizes the app and the CLI refuse, with one line that says the limit and what to do.

Expectations are written out: the pixel counts, and per pipeline the multiple its own
``check_inputs`` asks for in diffusers 0.42 (FLUX: ``vae_scale_factor * 2`` = 16; SD3:
``vae_scale_factor * patch_size`` = 16; Sana: 32 with its 32x VAE and patch 1; the
reference model: its pixel patch).
"""

from __future__ import annotations

import pytest

from hyca.app import handlers as h
from hyca.app.models import REFERENCE, LoadedModel, choice, max_pixels, size_multiple, size_problem
from hyca.cli import main

from tiny_families import CASES


@pytest.fixture()
def no_limit_set(monkeypatch):
    monkeypatch.delenv("HYCA_MAX_PIXELS", raising=False)


def test_default_limits_per_device(no_limit_set):
    assert max_pixels("cpu") == 256 * 256
    assert max_pixels("cuda") == 2048 * 2048
    assert size_problem(256, 256, 16, "cpu") is None
    assert size_problem(2048, 1024, 16, "cuda") is None


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_4096_squared_is_one_actionable_line(no_limit_set, device):
    why = size_problem(4096, 4096, 16, device)
    assert why is not None and "\n" not in why
    assert "16,777,216 pixels" in why and "HYCA_MAX_PIXELS=16777216" in why


def test_the_limit_is_configurable(monkeypatch):
    monkeypatch.setenv("HYCA_MAX_PIXELS", str(1024 * 1024))
    assert size_problem(1024, 1024, 16, "cpu") is None
    assert "1,048,576" in size_problem(1024, 1040, 16, "cpu")
    monkeypatch.setenv("HYCA_MAX_PIXELS", "lots")
    with pytest.raises(ValueError, match="HYCA_MAX_PIXELS must be a positive whole number"):
        max_pixels()
    assert size_problem(64, 64, 16, "cpu") == "HYCA_MAX_PIXELS must be a positive whole number of pixels, got 'lots'"


def test_sizes_off_the_models_grid_are_refused_with_a_fitting_size(no_limit_set):
    assert size_problem(72, 64, 16, "cpu") == (
        "72x64: this model needs height and width in multiples of 16 pixels (e.g. 64x64)")


@pytest.mark.parametrize("name, multiple", [("flux", 16), ("sd3", 16), ("sana", 32), ("qwenimage", 16)])
def test_size_multiple_of_each_pipeline(name, multiple):
    assert size_multiple(CASES[name].build()) == multiple


def test_the_reference_models_multiple_is_its_patch():
    from hyca.reference import tiny_components

    pipe = tiny_components()
    patch = round((pipe.transformer.config.in_channels / 3) ** 0.5)  # RGB pixels packed p x p per token
    assert size_multiple(pipe) == patch > 1


def test_the_app_refuses_before_running(no_limit_set):
    from hyca.reference import tiny_components

    pipe = tiny_components()
    served = LoadedModel(choice(REFERENCE), pipe, size=(32, 32))
    assert h._settings(served, "a red circle", 0, 8, "HyCa", 3, 2, "none").height == 32
    huge = LoadedModel(choice(REFERENCE), pipe, size=(4096, 4096))
    with pytest.raises(h.AppError, match=r"^4096x4096 is 16,777,216 pixels, more than this machine serves"):
        h._settings(huge, "a red circle", 0, 8, "HyCa", 3, 2, "none")


def test_the_cli_refuses_4096_squared_before_loading_a_model(no_limit_set, monkeypatch, capsys):
    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded for a size that cannot run")

    monkeypatch.setattr("hyca.cli._load_pipeline", must_not_load)
    assert main(["probe", "--model", "reference", "--height", "4096", "--width", "4096", "--device", "cpu"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hyca probe: error: --height/--width 4096x4096 is 16,777,216 pixels")
    assert "HYCA_MAX_PIXELS" in err[0]


def test_the_cli_refuses_a_size_off_the_reference_models_grid(no_limit_set, tmp_path, capsys):
    from hyca.reference import tiny_components

    tiny_components().save_pretrained(tmp_path / "ref")
    assert main(["probe", "--model", str(tmp_path / "ref"), "--height", "33", "--width", "32",
                 "--device", "cpu", "-o", str(tmp_path)]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("hyca ")]  # not diffusers' bars
    assert len(err) == 1 and "needs height and width in multiples of" in err[0]
    assert not list(tmp_path.glob("*.safetensors"))
