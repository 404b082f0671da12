"""HyCa in diffusers pipelines as people run them (issue 12), for every family in the table.

Each scenario ends with a request whose output must equal the same request on a freshly
hooked pipeline (a deep copy of the same weights, enabled with the same settings, nothing
run before), whose computed/forecast pattern, observed from the first block itself, must
be the schedule's (tests/family_reference.py writes it out independently of HyCa), and
whose ``hyca.stats`` must say the same:

- ``second-pipeline``: a second pipeline object shares the transformer and has its own
  scheduler (a txt2img and an img2img or hires pipeline do); HyCa was enabled on the first.
- ``scheduler-swapped``: ``pipe.scheduler = ...`` after ``hyca.enable``.
- ``aborted``: an exception from ``callback_on_step_end`` (a UI's cancel) stops a run
  half-way; the next request has another step count.
- ``no-cleanup``: the pipeline's ``maybe_free_model_hooks`` does nothing (custom
  pipelines, frontends that drive the transformer themselves).
- ``offload-before`` / ``offload-after``: ``enable_model_cpu_offload`` before or after
  ``hyca.enable`` (on the CPU as its execution device: the hook mechanics, not the copies).
"""

from __future__ import annotations

import pytest
import torch

import hyca
from hyca.adapters.diffusers.hooks import root_hook

from family_reference import observe_computed
from references import expected_plan
from tiny_families import CASES, IMG2IMG

INTERVAL, WARMUP = 2, 1
SETTINGS = dict(profile="taylor-1", interval=INTERVAL, warmup=WARMUP)
# steps of the first and the next request: each transformer's last call is odd, so forecast unless
# compute_last knows the right count (Wan 2.2's experts see about half the steps each)
STEPS = {"wan2.2": (10, 8)}
DEFAULT_STEPS = (6, 4)
SCENARIOS = ("second-pipeline", "scheduler-swapped", "aborted", "no-cleanup", "offload-before", "offload-after")
FAMILY_CASES = sorted(set(CASES) - {"sd3-slg"})  # sd3-slg is SD3 with guidance: tests/test_families.py

_fresh: dict[tuple[str, int], tuple[torch.Tensor, dict, list]] = {}


class Stop(Exception):
    """What a UI's cancel button raises from callback_on_step_end."""


def stop_at(step: int):
    def callback(pipe, i, t, tensors):
        if i == step:
            raise Stop(f"cancelled at step {i}")
        return tensors
    return callback


def observed_run(case, pipe, steps, **extra):
    result = {}

    def run():
        result["out"] = case.run(pipe, steps, **extra)

    pattern = observe_computed(case, pipe, run)
    return result["out"], pattern


def fresh(name: str, steps: int):
    """The request on a freshly built, freshly hooked pipeline: output, observed pattern, stats."""
    if (name, steps) not in _fresh:
        case = CASES[name]
        pipe = case.build()
        hyca.enable(pipe, **SETTINGS)
        out, pattern = observed_run(case, pipe, steps)
        stats = [(s.computed, s.forecast) for s in hyca.stats(pipe)]
        _fresh[(name, steps)] = out, pattern, stats
    return _fresh[(name, steps)]


def check(name: str, pipe, steps: int, stats_of=None) -> None:
    """The next request on ``pipe`` equals the fresh one, computes what the schedule says
    and reports it."""
    case = CASES[name]
    expected, expected_pattern, expected_stats = fresh(name, steps)
    out, pattern = observed_run(case, pipe, steps)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert pattern == expected_pattern
    # independent of HyCa: W warm-up calls, every N-th after, the last one
    assert all(flags == expected_plan(len(flags), INTERVAL, WARMUP) for flags in pattern.values())
    assert [(s.computed, s.forecast) for s in hyca.stats(stats_of or pipe)] == expected_stats
    assert not any(stats.notes for stats in hyca.stats(stats_of or pipe))
    assert any(not flag for flags in pattern.values() for flag in flags)  # something was forecast


def scenario(name: str, kind: str) -> None:
    case = CASES[name]
    FIRST, SECOND = STEPS.get(name, DEFAULT_STEPS)
    pipe = case.build()
    if kind == "offload-before":
        pipe.enable_model_cpu_offload(device="cpu")
    hyca.enable(pipe, **SETTINGS)
    if kind == "offload-after":
        pipe.enable_model_cpu_offload(device="cpu")
    if kind == "no-cleanup":
        pipe.maybe_free_model_hooks = lambda: None
    if kind == "aborted":
        with pytest.raises(Stop):
            case.run(pipe, FIRST, callback_on_step_end=stop_at(2))
    else:
        check(name, pipe, FIRST)
    if kind == "second-pipeline":
        second = case.pipeline(**{e: getattr(pipe, e) for e in case.experts})
        check(name, second, SECOND, stats_of=second)
        check(name, pipe, FIRST)
        return
    if kind == "scheduler-swapped":
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    check(name, pipe, SECOND)
    assert hyca.is_enabled(pipe)


@pytest.mark.parametrize("kind", SCENARIOS)
@pytest.mark.parametrize("name", FAMILY_CASES)
def test_host_conformance(name, kind):
    if kind == "aborted" and name == "hunyuanvideo15":
        pytest.skip("HunyuanVideo15Pipeline has no callback_on_step_end to cancel from")
    scenario(name, kind)


@pytest.mark.parametrize("name", FAMILY_CASES)
def test_every_pipeline_call_ends_with_the_cache_freed(name):
    """The README's promise: state is reset after every pipeline call, for every family
    (CacheMixin or not)."""
    case = CASES[name]
    pipe = case.build()
    hyca.enable(pipe, **SETTINGS)
    case.run(pipe, STEPS.get(name, DEFAULT_STEPS)[0])
    for expert in case.experts:
        states = root_hook(getattr(pipe, expert)).states.all_states()
        assert all(state.step == 0 and not any(state.histories) for state in states.values())


# --- img2img: runs that start part-way down the schedule ------------------------------------

IMG2IMG_STEPS = 10


def img2img_fresh(name: str, strength: float):
    make, call = IMG2IMG[name]
    pipe = make(CASES[name].transformer(0))
    hyca.enable(pipe, **SETTINGS)
    with torch.no_grad():
        out = call(pipe, IMG2IMG_STEPS, strength)
    return out, [(s.computed, s.forecast) for s in hyca.stats(pipe)]


def img2img_check(name: str, pipe, strength: float) -> None:
    expected, expected_stats = img2img_fresh(name, strength)
    with torch.no_grad():
        out = IMG2IMG[name][1](pipe, IMG2IMG_STEPS, strength)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    calls = int(IMG2IMG_STEPS * strength)  # the pipelines' get_timesteps: the last strength x steps
    computed = sum(expected_plan(calls, INTERVAL, WARMUP))
    assert [(s.computed, s.forecast) for s in hyca.stats(pipe)] == expected_stats == [(computed, calls - computed)]


@pytest.mark.parametrize("name", sorted(IMG2IMG))
def test_img2img_at_another_strength_after_an_aborted_run(name):
    """The issue's cause 2: cancelled txt2img, then img2img at strength 0.6 on the same transformer."""
    case = CASES[name]
    pipe = case.build()
    hyca.enable(pipe, **SETTINGS)
    img2img = IMG2IMG[name][0](pipe.transformer)
    with pytest.raises(Stop):
        case.run(pipe, 12, callback_on_step_end=stop_at(5))
    img2img_check(name, img2img, 0.6)


@pytest.mark.parametrize("name", sorted(IMG2IMG))
def test_img2img_strengths_one_after_another(name):
    """The issue's cause 3 (SD3's transformer has no CacheMixin): 0.9 then 0.6, and an
    aborted 0.9 then 0.6, each as on a fresh pipeline."""
    make, call = IMG2IMG[name]
    pipe = make(CASES[name].transformer(0))
    hyca.enable(pipe, **SETTINGS)
    img2img_check(name, pipe, 0.9)
    img2img_check(name, pipe, 0.6)
    with pytest.raises(Stop), torch.no_grad():
        call(pipe, IMG2IMG_STEPS, 0.9, callback_on_step_end=stop_at(3))
    img2img_check(name, pipe, 0.6)


@pytest.mark.parametrize("name", sorted(IMG2IMG))
def test_txt2img_then_img2img_pipeline_sharing_the_transformer(name):
    """The issue's cause 1: HyCa enabled on the txt2img pipeline; the img2img pipeline (its
    own scheduler, as ``from_pipe`` or a hires pass makes it) shares the transformer."""
    case = CASES[name]
    pipe = case.build()
    hyca.enable(pipe, **SETTINGS)
    img2img = IMG2IMG[name][0](pipe.transformer)
    check(name, pipe, 6)
    img2img_check(name, img2img, 0.6)
    check(name, pipe, 4)


# --- other caches: a clear error before anything is sampled, in either order ---------------


def _apply_other_cache(case, transformer) -> None:
    from diffusers import TaylorSeerCacheConfig
    from diffusers.hooks import apply_taylorseer_cache

    if hasattr(transformer, "enable_cache"):
        transformer.enable_cache(TaylorSeerCacheConfig(cache_interval=2))
    else:  # transformers without CacheMixin: the hook applied directly, on the blocks
        config = TaylorSeerCacheConfig(cache_interval=2, cache_identifiers=[rf"{case.streams[0][0]}\.\d+"])
        apply_taylorseer_cache(transformer, config)
        assert any(m._diffusers_hook.hooks for m in transformer.modules() if hasattr(m, "_diffusers_hook"))


def _blocks_ran(case, pipe, run) -> int:
    ran = []
    first = getattr(pipe.transformer, case.streams[0][0])[0]
    handle = first.register_forward_pre_hook(lambda m, a: ran.append(1))
    try:
        run()
    finally:
        handle.remove()
    return len(ran)


@pytest.mark.parametrize("name", FAMILY_CASES)
def test_another_cache_in_either_order_is_an_error_before_sampling(name):
    case = CASES[name]
    pipe = case.build()
    hyca.enable(pipe, **SETTINGS)
    _apply_other_cache(case, pipe.transformer)
    assert not hyca.is_enabled(pipe)

    def run():
        with pytest.raises(RuntimeError, match="has HyCa enabled and now also .*use one of them"):
            case.run(pipe, 4)

    assert _blocks_ran(case, pipe, run) == 0  # refused at the transformer's first call, before any block

    other = case.build()
    _apply_other_cache(case, other.transformer)
    with pytest.raises(RuntimeError, match="already has a diffusers cache"):
        hyca.enable(other, **SETTINGS)


@pytest.mark.parametrize("hyca_first", [True, False])
def test_cache_dit_in_either_order_is_an_error(hyca_first):
    cache_dit = pytest.importorskip("cache_dit")
    case = CASES["flux"]
    pipe = case.build()
    config = cache_dit.DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=0, num_inference_steps=4)
    if hyca_first:
        hyca.enable(pipe, **SETTINGS)
        cache_dit.enable_cache(pipe.transformer, cache_config=config)
        with pytest.raises(RuntimeError, match="cache-dit"):
            case.run(pipe, 4)
    else:
        cache_dit.enable_cache(pipe.transformer, cache_config=config)
        with pytest.raises(RuntimeError, match="cache-dit enabled .*cache_dit.disable_cache"):
            hyca.enable(pipe, **SETTINGS)


# --- several calls per timestep without a cache context ------------------------------------

#: the transformer's timestep input from the scheduler's timestep t (0 .. 1000), per pipeline
MODEL_TIME = {"flux": lambda t: t / 1000, "sd3": lambda t: t, "chroma": lambda t: t / 1000,
              "lumina2": lambda t: 1 - t / 1000}


def _captured_calls(case, steps=2, **extra):
    """The arguments a pipeline gives its transformer: one call per guidance branch."""
    pipe = case.build()
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda m, a, k: seen.append((a, dict(k))) if len(seen) < 2 else None, with_kwargs=True)
    case.run(pipe, steps, **extra)
    handle.remove()
    return pipe.transformer, seen


def heun_loop(name: str, transformer, calls, scheduler, branches: int):
    """A hand-written Heun sampler (FlowMatchHeunDiscreteScheduler: 2N - 1 model calls for
    N steps, the second stage of a step at the next sigma) calling the transformer without
    any cache context; ``branches`` calls per stage with the same input (cond, uncond).
    Returns the final sample and, per call, whether its first block ran."""
    family = hyca.adapters.diffusers.FAMILIES[type(transformer).__name__]
    case = CASES[name]
    first = getattr(transformer, case.streams[0][0])[0]
    ran, flags = [False], []
    handles = [transformer.register_forward_pre_hook(lambda m, a: ran.__setitem__(0, False)),
               transformer.register_forward_hook(lambda m, a, o: flags.append(ran[0]))]
    handles += [c.register_forward_hook(lambda m, a, o: ran.__setitem__(0, True)) for c in first.children()]
    signature = torch.inspect_signature(transformer) if hasattr(torch, "inspect_signature") else None
    import inspect
    signature = inspect.signature(type(transformer).forward)
    args, kwargs = calls[0]
    bound = signature.bind(transformer, *args, **kwargs).arguments
    x = bound[family.input_arg].clone()
    try:
        with torch.no_grad():
            for t in scheduler.timesteps:
                outputs = []
                for k in range(branches):
                    a, kw = calls[k]
                    arguments = dict(signature.bind(transformer, *a, **kw).arguments)
                    arguments.pop("self")
                    arguments[family.input_arg] = x
                    arguments[family.timestep_arg] = torch.full_like(torch.as_tensor(bound[family.timestep_arg]),
                                                                     float(MODEL_TIME[name](t)))
                    arguments["return_dict"] = False
                    outputs.append(transformer(**arguments)[0])
                v = outputs[0] if branches == 1 else outputs[1] + 2.0 * (outputs[0] - outputs[1])
                x = scheduler.step(v, t, x).prev_sample
    finally:
        for h in handles:
            h.remove()
    return x, flags


@pytest.mark.parametrize("name, branches", [("flux", 1), ("sd3", 1), ("chroma", 2), ("lumina2", 2)])
def test_heun_stages_without_cache_context_are_one_branch_and_the_last_call_is_computed(name, branches):
    from diffusers import FlowMatchHeunDiscreteScheduler

    case = CASES[name]
    transformer, calls = _captured_calls(case, cfg=branches == 2)
    scheduler = FlowMatchHeunDiscreteScheduler()
    steps = 4
    scheduler.set_timesteps(steps)
    n = len(scheduler.timesteps)
    assert n == 2 * steps - 1  # one timestep per model call
    fresh_copy = __import__("copy").deepcopy(transformer)
    hyca.enable(transformer, scheduler=scheduler, **SETTINGS)
    first, flags = heun_loop(name, transformer, calls, scheduler, branches)
    plan = expected_plan(n, INTERVAL, WARMUP)
    for k in range(branches):  # every branch: all 2N - 1 calls in one state, the last one computed
        assert flags[k::branches] == plan
    assert hyca.stats(transformer)[0].computed == sum(plan)
    scheduler.set_timesteps(steps)  # a second run on the same transformer: the same result
    second, _ = heun_loop(name, transformer, calls, scheduler, branches)
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    scheduler.set_timesteps(steps)
    hyca.enable(fresh_copy, scheduler=scheduler, **SETTINGS)
    torch.testing.assert_close(heun_loop(name, fresh_copy, calls, scheduler, branches)[0], first, rtol=0, atol=0)


# --- offloading: sequential and group offloading in either order -----------------------------


def _sequential_hooks(pipe) -> None:
    """What ``enable_sequential_cpu_offload`` puts on the transformer (accelerate's
    ``cpu_offload``: an AlignDevicesHook on every module holding parameters of its own,
    Wan's blocks included, and an io_same_device one on the model), without moving the
    weights to the meta device: with the CPU as execution device accelerate cannot load
    them back (it fails the same way without HyCa). So this checks the hook chain, not the
    copies; real sequential offload needs a GPU."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module, attach_align_device_hook

    attach_align_device_hook(pipe.transformer, execution_device=torch.device("cpu"), offload=False)
    add_hook_to_module(pipe.transformer, AlignDevicesHook(io_same_device=True), append=True)


def _offload(pipe, kind: str) -> None:
    cpu = torch.device("cpu")
    if kind == "sequential":
        _sequential_hooks(pipe)
    elif kind == "group-block":
        pipe.transformer.enable_group_offload(onload_device=cpu, offload_device=cpu, offload_type="block_level",
                                              num_blocks_per_group=1)
    else:
        pipe.transformer.enable_group_offload(onload_device=cpu, offload_device=cpu, offload_type="leaf_level")


@pytest.mark.parametrize("order", ["before", "after"])
@pytest.mark.parametrize("kind", ["sequential", "group-block", "group-leaf"])
@pytest.mark.parametrize("name", ["flux", "wan2.1", "sd3"])  # Wan's blocks hold parameters of their own
def test_offloading_in_either_order(name, kind, order):
    case = CASES[name]
    pipe = case.build()
    never = case.copy_of(pipe)
    if order == "before":
        _offload(pipe, kind)
    hyca.enable(pipe, **SETTINGS)
    if order == "after":
        _offload(pipe, kind)
    assert hyca.is_enabled(pipe)
    check(name, pipe, 6)
    check(name, pipe, 4)
    hyca.disable(pipe)  # the offloading hooks stay, HyCa's go: bit-identical to a never-hooked model
    assert not hyca.is_enabled(pipe)
    torch.testing.assert_close(case.run(pipe, 4), case.run(never, 4), rtol=0, atol=0)


def test_hooks_unwrapped_by_removing_offloading_are_put_back():
    """Sequential offload applied before HyCa and removed after (accelerate restores each
    block's forward as it was before HyCa wrapped it): HyCa finds its hooks gone before the
    next call, puts them back, and ``is_enabled`` never claims caching that cannot happen."""
    case = CASES["wan2.1"]
    pipe = case.build()
    _sequential_hooks(pipe)
    hyca.enable(pipe, **SETTINGS)
    pipe.remove_all_hooks()
    assert not hasattr(pipe.transformer.blocks[0], "_hf_hook")
    assert hyca.is_enabled(pipe)
    check("wan2.1", pipe, 6)


# --- blocks that update their input in place (issue 13) --------------------------------------


def test_a_block_that_updates_its_input_in_place_gets_its_true_residual():
    """A FLUX single block rewritten to add its update into ``hidden_states`` in place and
    return that same tensor (as Forge Neo's blocks do): HyCa's output is the one it has on
    the out-of-place block, not the one a zero residual would give."""
    case = CASES["flux"]
    normal = case.build()
    in_place = case.copy_of(normal)
    for block in in_place.transformer.single_transformer_blocks:
        original = type(block).forward

        def forward(self, hidden_states, encoder_hidden_states, *args, _original=original, **kwargs):
            text, image = _original(self, hidden_states, encoder_hidden_states, *args, **kwargs)
            hidden_states.copy_(image)
            return text, hidden_states

        block.__class__ = type("InPlaceSingleBlock", (type(block),), {"forward": forward})
    for pipe in (normal, in_place):
        hyca.enable(pipe, **SETTINGS)
    expected = case.run(normal, 6, cfg=True)
    torch.testing.assert_close(case.run(in_place, 6, cfg=True), expected, rtol=1e-5, atol=1e-5)
    meter = root_hook(in_place.transformer).meter
    single = len(in_place.transformer.transformer_blocks)
    assert [meter.writes_in_place(i) for i in range(single, single + 3)] == [True] * 3
    assert meter.writes_in_place(0) is False
