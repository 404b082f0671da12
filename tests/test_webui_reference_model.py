"""The shipped reference model converted into the frontends' own FLUX class
(hyca.reference.webui) computes what the diffusers model computes: one transformer call on
the same inputs, and a whole WebUI generation (the extension's hooks, HyCa off) against the
diffusers pipeline on the same sigmas, noise and conditioning. This is what makes the WebUI
path's quality numbers (python -m hyca.bench.webui_path) comparable with the diffusers ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import reference_frontends as R
import webui_harness as H
from hyca.reference import load_pipeline
from hyca.reference.model import image_ids, pack, velocity
from hyca.reference.webui import frontend_scheduler, latent_to_tokens, to_bfl_state_dict, tokens_to_latent

PROMPTS = ["a large red circle at the center on a white background",
           "a small blue square at the top left on a black and white background"]


@pytest.fixture(scope="module")
def pipe():
    pipe = load_pipeline()
    R.register(pipe.transformer)
    yield pipe
    for kind in R.KINDS.values():
        H.OVERRIDES.pop(kind, None)


def test_frontend_patchify_sees_the_diffusers_tokens_in_their_order():
    """The latent built from the tokens, patchified 2x2 as the frontends do, gives the same
    tokens; its image ids are the diffusers pipeline's (0, row, column)."""
    with H.standins("forge"):
        from bfl_flux_layers import patchify

        tokens = torch.randn(2, 64, 48)
        img, ids, h_len, w_len = patchify(tokens_to_latent(tokens, 8, 8))
    assert torch.equal(img, tokens) and (h_len, w_len) == (8, 8)
    assert torch.equal(ids[0], image_ids(32, 32, 4))
    assert torch.equal(latent_to_tokens(tokens_to_latent(tokens, 8, 8)), tokens)


@pytest.mark.parametrize("flavour", ["forge", "neo"])
def test_converted_frontend_class_equals_the_diffusers_transformer(pipe, flavour):
    g = torch.Generator().manual_seed(3)
    x = pack(torch.randn(2, 3, 32, 32, generator=g), 4)
    sigma = torch.tensor([0.9, 0.3])
    hidden, pooled = pipe.encode_prompt(PROMPTS)
    with torch.no_grad():
        expected = velocity(pipe.transformer, x, sigma, hidden, pooled, 32, 32)
        with H.standins(flavour):
            model = R.frontend_model(pipe.transformer, flavour)
            out = model(tokens_to_latent(x, 8, 8), sigma * R.TIMESTEP_MULTIPLIER[flavour], context=hidden, y=pooled,
                        guidance=None)
    assert type(model).__name__ == "IntegratedFluxTransformer2DModel"
    torch.testing.assert_close(latent_to_tokens(out), expected, atol=2e-5, rtol=1e-4)


def test_converter_covers_every_diffusers_weight(pipe):
    bfl = to_bfl_state_dict(pipe.transformer)
    assert sum(t.numel() for t in bfl.values()) == sum(t.numel() for t in pipe.transformer.state_dict().values())
    assert bfl["double_blocks.0.img_attn.qkv.weight"].shape == (3 * 128, 128)
    assert not any(t.data_ptr() == p.data_ptr() for t in bfl.values() for p in pipe.transformer.parameters())


@pytest.mark.parametrize("flavour,guidance,shift", [("forge", 1.0, 3.0), ("forge", 2.5, 3.0), ("neo", 2.5, 3.0),
                                                   ("forge", 2.5, 1.0), ("neo", 1.0, 1.0)])
def test_webui_generation_equals_the_diffusers_pipeline(pipe, flavour, guidance, shift):
    """HyCa off (the script's checkbox unticked): the harness's Forge / Neo sampling over the
    flow sigmas of ``shift`` equals the diffusers pipeline stepping through the same sigmas
    (every shift the WebUI-path benchmark runs: a WebUI run on other sigmas than the
    diffusers reference would be scored against images it never aimed at)."""
    steps = 6
    original = pipe.scheduler
    pipe.scheduler = frontend_scheduler(shift)
    try:
        with H.Frontend(R.KINDS[flavour]) as frontend:
            noise = R.harness_noise(1, len(PROMPTS), frontend.spec.latent)[0]
            webui, _ = R.webui_images(pipe, frontend, [PROMPTS], steps, guidance, H.args(False), shift=shift)
        expected = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=guidance, latents=latent_to_tokens(noise),
                        output_type="pt").images
    finally:
        pipe.scheduler = original
    torch.testing.assert_close(webui, expected, atol=1e-4, rtol=0)
    assert not torch.equal(webui[0], webui[1])


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_frontend_schedule_is_the_webui_one(shift):
    """The diffusers scheduler steps through the harness's Forge "Simple" flow sigmas."""
    scheduler = frontend_scheduler(shift)
    scheduler.set_timesteps(28)
    torch.testing.assert_close(scheduler.sigmas, H.flow_sigmas(28, shift))


@pytest.mark.skipif(not os.environ.get("HYCA_FORGE_CHECKOUT"),
                    reason="set HYCA_FORGE_CHECKOUT to a checkout of stable-diffusion-webui-forge")
def test_real_forge_class_equals_the_diffusers_transformer():
    """The same with Forge's own backend/nn/flux.py (run in a fresh interpreter, since the
    stand-ins also call their package ``backend``)."""
    done = subprocess.run([sys.executable, str(Path(__file__).parent / "real_forge_flux.py"),
                           os.environ["HYCA_FORGE_CHECKOUT"]], capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["max_abs_diff"] <= 2e-5 * max(1.0, result["scale"])


def test_guard_switches_name_images_not_the_batched_calls_rows(pipe):
    """Forge batches cond and uncond into one call: the engine's batch rows are then
    2 x images. The infotext's guard switches name each switch's branch and, with several
    images, the image (1 or 2 here), never a row index as an image (the helper saw
    "(image 2)" for one image and "image 1..4" for two)."""
    import re

    from hyca.adapters.webui.settings import Settings

    original = pipe.scheduler
    pipe.scheduler = frontend_scheduler(3.0)
    said = {}
    try:
        with H.Frontend(R.KINDS["forge"]) as frontend:
            for images in (1, 2):
                args = Settings(enabled=True, interval=4, warmup=3, profile="TaylorSeer (taylor-2)").args()
                _, infotexts = R.webui_images(pipe, frontend, [PROMPTS[:images]], 20, 2.5, args)
                said[images] = re.search(r'HyCa guard switches: "([^"]*)"', infotexts[0]).group(1)
    finally:
        pipe.scheduler = original
    for images, text in said.items():
        switches = re.split(r", (?=\S+ -> )", text)
        assert switches and all(re.search(r"(cond|uncond)\)$", s) for s in switches), text
        numbers = {int(n) for listed in re.findall(r"\(images? ([\d, -]+), (?:cond|uncond)\)", text)
                   for n in re.findall(r"\d+", listed)}
        assert numbers <= set(range(1, images + 1)) and (images > 1 or not numbers), text
