"""The WebUI probe chooses what the diffusers probe chooses when both are given the same
calibration input: the reference model loaded into Forge's and Neo's own FLUX class
(tests/reference_frontends.py), the WebUI's automatic profile probed on a batch of four
captions, against ``hyca.probe`` on the diffusers pipeline with the same four captions, the
noise the WebUI probe draws, the same sigmas, guidance, N, warm-up and last step. The
expectation is the diffusers path's own choice, computed by its own host.

Both sides run the blocks' tracks and the output head's (the WebUI adapters hook the
frontends' final linear map, ``final_layer.linear``, whose input is the tensor diffusers'
``proj_out`` receives). Two things are held equal on the diffusers side that its default
probe does differently: no model-output track on either side (the WebUI forecasts the
frontend's latent, 16 channels for FLUX, diffusers the transformer's packed output, 64: the
clusterings differ by construction; tests/test_webui_model_output.py checks the WebUI's), and the comparison is on the final latent (the pipeline's last scheduler
step), as the WebUI probe compares, where the reference pipeline's own output is the image
clamped to [0, 1] (its clamp alone moves near-tied candidates by a few hundredths of a dB)."""

from __future__ import annotations

import pytest
import torch

import reference_frontends as R
import webui_harness as H
from hyca.adapters.diffusers.probe import TransformerHost, probe_transformer
from hyca.adapters.webui import probe as webui_probe
from hyca.adapters.webui.settings import Settings
from hyca.reference import load_pipeline
from hyca.reference.pipeline import ReferencePipeline
from hyca.reference.webui import frontend_scheduler, latent_to_tokens

from test_webui_probe import isolated  # noqa: F401 - the fixture: a temporary profile cache, no Hub

#: The reference pipeline's own probe captions: a batch as large as the WebUI probe samples.
PROMPTS = list(ReferencePipeline.hyca_probe_defaults["prompt"])
STEPS, INTERVAL, WARMUP = 10, 3, 2


@pytest.fixture(scope="module")
def pipe():
    pipe = load_pipeline()
    R.register(pipe.transformer)
    original = pipe.scheduler
    pipe.scheduler = frontend_scheduler(3.0)  # Forge's "Simple" flow sigmas, FLUX's shift
    yield pipe
    pipe.scheduler = original
    for kind in R.KINDS.values():
        H.OVERRIDES.pop(kind, None)


def webui_choice(pipe, flavour: str, guidance: float, monkeypatch) -> tuple[dict, torch.Tensor]:
    """The WebUI probe's profile metadata and the noise its host drew."""
    seen = []
    real = webui_probe.run_probe

    def spy(host, run, schedule, guard, fp, on_progress=None):
        host.model_output = False  # as on the diffusers side (module doc)
        seen.append(host)
        return real(host, run, schedule, guard, fp, on_progress)

    monkeypatch.setattr(webui_probe, "run_probe", spy)
    on = Settings(enabled=True, interval=INTERVAL, warmup=WARMUP).args()
    with H.Frontend(R.KINDS[flavour]) as frontend:
        _, infotexts = R.webui_images(pipe, frontend, [PROMPTS], STEPS, guidance, on)
    (host,) = seen
    assert host.samples == len(PROMPTS) == webui_probe.PROBE_SAMPLES and list(host.latent) == list(frontend.spec.latent)
    noise = torch.randn(host.samples, *host.latent, generator=torch.Generator().manual_seed(host.seed))
    assert "HyCa profile: automatic" in infotexts[0]
    return host, noise


def diffusers_choice(pipe, guidance: float, noise_tokens: torch.Tensor, monkeypatch):
    """``hyca.probe``'s choice (its :func:`probe_transformer` on the pipeline call) for the
    captions from ``noise_tokens``, scored on the final latent: the tokens of the
    pipeline's last scheduler step; its host offers the blocks and the output head, not the
    model output."""
    made = TransformerHost.__init__

    def without_model_output(self, *a, **k):
        made(self, *a, **k)
        self.model_output = False

    monkeypatch.setattr(TransformerHost, "__init__", without_model_output)
    finals = []
    step = pipe.scheduler.step

    def recording_step(*a, **k):
        out = step(*a, **k)
        finals.append(out[0])
        return out

    def run():
        finals.clear()
        pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=guidance, latents=noise_tokens.clone(),
             output_type="pt")
        return finals[-1].detach().float().cpu()

    pipe.scheduler.step = recording_step
    try:
        return probe_transformer(pipe.transformer, run, STEPS, interval=INTERVAL, warmup=WARMUP,
                                 guidance_scale=guidance, progress=False)
    finally:
        del pipe.scheduler.step


@pytest.mark.parametrize("flavour,guidance", [("forge", 1.0), ("forge", 2.5), ("neo", 2.5)])
def test_webui_probe_chooses_as_the_diffusers_probe_on_the_same_input(pipe, isolated, flavour, guidance,
                                                                       monkeypatch):
    from hyca.profiles.io import load_profile

    host, noise = webui_choice(pipe, flavour, guidance, monkeypatch)
    (saved,) = list(isolated.rglob("*.safetensors"))
    webui = load_profile(saved)
    diffusers = diffusers_choice(pipe, guidance, latent_to_tokens(noise), monkeypatch)
    ours, theirs = webui.metadata["selection"], diffusers.metadata["selection"]
    assert ours["branches"] == theirs["branches"] == (["cond", "uncond"] if guidance > 1 else ["cond"])
    names = [t["name"] for t in theirs["closed_loop"]["trials"]]
    assert [t["name"] for t in ours["closed_loop"]["trials"]] == names and len(names) > 12
    assert "output:eq5" in names  # the output head's track, on both sides (no model output offered: module doc)
    assert ours["closed_loop"]["chosen"] == theirs["closed_loop"]["chosen"]
    assert torch.equal(webui.dim_solvers(), diffusers.dim_solvers())
    assert webui.metadata.get("first_interval") == diffusers.metadata.get("first_interval")
    for a, b in zip(ours["closed_loop"]["trials"], theirs["closed_loop"]["trials"]):
        # stored rounded to 1e-3 dB: scores within 1e-3 dB of each other round at most 2e-3 apart
        assert a["fidelity_db"] == pytest.approx(b["fidelity_db"], abs=2e-3), (a, b)


@pytest.mark.parametrize("batch,hint,guided,cond,uncond", [
    (6, [0, 1], True, [0, 1, 2, 0], [3, 4, 5, 3]),  # Forge / Neo: a cond chunk of 3, then an uncond chunk of 3
    (2, [1, 0], True, [1, 1, 1, 1], [0, 0, 0, 0]),  # one image per chunk, uncond first: that image 4 times
    (1, [0], False, [0, 0, 0, 0], None),            # unguided batch of one
    (4, None, True, [0, 1, 0, 1], [2, 3, 2, 3]),    # A1111: cond half, then uncond half, unnamed
    (3, None, False, [0, 1, 2, 0], None),           # A1111 unguided, fewer images than samples
    (8, None, False, [0, 1, 2, 3], None),           # more images than samples: the first ones
])
def test_the_probe_samples_the_first_four_images_or_repeats_them(batch, hint, guided, cond, uncond):
    """What each probe sample is conditioned on, written out by hand per frontend layout; a
    tensor without the call's batch axis (shared by every image) is passed as it is."""
    x = torch.zeros(batch, 4, 2, 2)
    shared = torch.ones(batch + 1, 3)
    conditioning = {"c_crossattn": torch.arange(batch).float().reshape(batch, 1), "shared": shared,
                    "transformer_options": {"patches": {}}}
    found = webui_probe.branches_in_call(x, hint, conditioning, guided)
    assert sorted(found) == (["cond", "uncond"] if uncond else ["cond"])
    for branch, images in (("cond", cond), ("uncond", uncond)):
        if images is None:
            continue
        assert found[branch]["c_crossattn"].flatten().tolist() == [float(i) for i in images]
        assert found[branch]["shared"] is shared
        if hint is not None:
            assert found[branch]["transformer_options"]["cond_or_uncond"] == [0 if branch == "cond" else 1]
