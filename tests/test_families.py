"""HyCa inside the real diffusers pipeline of every supported DiT family (tiny configs).

Per family: the schedule (which calls compute, observed from the blocks themselves),
equality with the per-block reference (tests/family_reference.py) for a multi-cluster,
multi-solver profile, with guidance branches where the pipeline runs them as separate
calls, and bit-identical outputs after ``hyca.disable``.
"""

import copy
import inspect
import logging
from collections import defaultdict

import pytest
import torch

import hyca
from hyca import Profile
from hyca.adapters.diffusers.families import FAMILIES, blocks_of, hidden_size
from hyca.math.solvers import pool_names

from family_reference import Reference, count_calls, observe_computed
from references import expected_plan
from tiny_families import CASES

STEPS = 8
INTERVAL, WARMUP = 3, 2
# families whose pipelines run cond and uncond as separate calls
SEPARATE_CFG = {"flux", "flux-kontext", "qwenimage", "hunyuanvideo", "hunyuanvideo15", "wan2.1", "wan2.2", "wan-vace", "skyreels-v2", "chronoedit", "chroma", "lumina2", "cogview4"}


def hybrid_profile(transformer, seed: int = 0) -> Profile:
    """Four clusters per block, five solvers, different in every block."""
    family = FAMILIES[type(transformer).__name__]
    blocks, dim = len(blocks_of(transformer, family)), hidden_size(transformer)
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor([pool_names().index(n) for n in ["reuse", "taylor-2", "lagrange-3", "bdf3", "am2"]])
    labels = torch.randint(0, 4, (blocks, dim), generator=g)
    return Profile(labels, ids[torch.randint(0, len(ids), (blocks, 4), generator=g)])


def settings_for(case, pipe) -> dict:
    profiles = {e: hybrid_profile(getattr(pipe, e), seed=i) for i, e in enumerate(case.experts)}
    profile = profiles if len(case.experts) > 1 else profiles["transformer"]
    # the per-block reference is the paper's engine; the guard is checked against its own reference
    return dict(profile=profile, interval=INTERVAL, warmup=WARMUP, guard=False), profiles


@pytest.mark.parametrize("name", sorted(CASES))
def test_schedule_and_per_block_reference(name):
    case = CASES[name]
    extra = dict(cfg=name in SEPARATE_CFG and name != "qwenimage-edit")
    base = case.build()
    full_pipe, reference_pipe, hyca_pipe = base, case.copy_of(base), case.copy_of(base)

    calls = {}
    full = None

    def full_run():
        nonlocal full
        full = case.run(full_pipe, STEPS, **extra)

    calls = count_calls(case, full_pipe, full_run)
    plans = {key: expected_plan(n, INTERVAL, WARMUP) for key, n in calls.items()}
    settings, profiles = settings_for(case, hyca_pipe)

    reference = Reference(case, profiles, plans)
    reference.attach(reference_pipe)
    try:
        expected = case.run(reference_pipe, STEPS, **extra)
    finally:
        reference.detach()

    hyca.enable(hyca_pipe, **settings)
    result = None

    def hyca_run():
        nonlocal result
        result = case.run(hyca_pipe, STEPS, **extra)

    computed = observe_computed(case, hyca_pipe, hyca_run)
    assert computed == plans
    assert len(plans) == len(case.experts) * (2 if extra["cfg"] else 1)
    torch.testing.assert_close(result, expected, rtol=1e-4, atol=1e-4)
    assert (result - full).abs().max() > 1e-2  # forecasting changed the output: the check has teeth


def _structure(output):
    """What a block returned, up to values: None or each tensor's shape."""
    parts = output if isinstance(output, tuple) else (output,)
    return tuple(None if p is None else tuple(p.shape) for p in parts)


def block_structures(case, pipe) -> tuple[list, dict]:
    """Torch hooks recording every block call's output structure, per block and batch
    size (SD3's skip-layer guidance pass runs with a smaller batch)."""
    seen, handles = defaultdict(set), []

    def record(key, output):
        structure = _structure(output)
        batch = next(shape[0] for shape in structure if shape is not None)
        seen[key + (batch,)].add(structure)

    for expert in case.experts:
        for attribute, _, _ in case.streams:
            for i, block in enumerate(getattr(getattr(pipe, expert), attribute)):
                handles.append(block.register_forward_hook(lambda m, a, o, k=(expert, attribute, i): record(k, o)))
    return handles, seen


@pytest.mark.parametrize("name", sorted(set(CASES) - {"qwenimage-edit"}))
def test_disable_is_bit_identical_to_a_never_patched_pipeline(name):
    case = CASES[name]
    never = case.build()
    patched = case.copy_of(never)
    settings, _ = settings_for(case, patched)
    hyca.enable(patched, **settings)
    handles, structures = block_structures(case, patched)
    with_hyca = case.run(patched, STEPS)
    for h in handles:
        h.remove()
    # passed-through blocks return what computed blocks return (SD3's last block: None text)
    assert all(len(found) == 1 for found in structures.values()), structures
    hyca.disable(patched)
    assert not hyca.is_enabled(patched)
    untouched = case.run(never, STEPS)
    assert not torch.equal(with_hyca, untouched)
    assert torch.equal(case.run(patched, STEPS), untouched)


def test_sd3_skip_layer_guidance_pass_is_left_alone():
    case = CASES["sd3-slg"]
    pipe = case.build()
    hyca.enable(pipe, profile="taylor-2", interval=INTERVAL, warmup=WARMUP)
    skip_layer_calls = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda m, a, k: skip_layer_calls.append(k.get("skip_layers")), with_kwargs=True)
    case.run(pipe, STEPS)
    handle.remove()
    assert skip_layer_calls.count([1]) == STEPS - 1  # steps 1 .. 7 add the guidance pass
    stats = hyca.stats(pipe)[0]
    computed = sum(expected_plan(STEPS, INTERVAL, WARMUP))
    assert (stats.computed, stats.forecast) == (computed, STEPS - computed)  # guidance passes not counted


def test_wan22_experts_have_their_own_profile_state_and_step_count(caplog):
    case = CASES["wan2.2"]
    pipe = case.build()
    calls = count_calls(case, pipe, lambda: case.run(pipe, STEPS))
    high, low = calls[("transformer", 0)], calls[("transformer_2", 0)]
    assert (high, low) == (4, 4)  # boundary_ratio 0.85 splits the shifted schedule in half

    profiles = {"transformer": "taylor-2", "transformer_2": "fora"}
    engines = hyca.enable(pipe, profile=profiles, interval=INTERVAL, warmup=WARMUP)
    assert [e.solvers[0].name for e in engines] == ["taylor-2", "reuse"]
    with caplog.at_level(logging.INFO, logger="hyca"):
        case.run(pipe, STEPS, cfg=True)
    # each expert counts only its own calls: warm-up, cycle and last call within its segment
    for expert, stats in zip(case.experts, hyca.stats(pipe)):
        n = calls[(expert, 0)]
        assert (stats.computed, stats.total) == (sum(expected_plan(n, INTERVAL, WARMUP)), n)
    logged = [r.message for r in caplog.records if r.message.startswith("HyCa [")]
    assert sorted(m.split(":")[0] for m in logged) == ["HyCa [cond]", "HyCa [cond]", "HyCa [uncond]",
                                                        "HyCa [uncond]"]

    with pytest.raises(KeyError, match="profile has no entry for 'transformer_2'"):
        hyca.enable(pipe, profile={"transformer": "fora"})


def test_unnamed_guidance_calls_get_one_state_each(caplog):
    """Chroma's pipeline runs cond and uncond without a cache context."""
    case = CASES["chroma"]
    pipe = case.build()
    hyca.enable(pipe, profile="taylor-1", interval=INTERVAL, warmup=WARMUP)
    with caplog.at_level(logging.INFO, logger="hyca"):
        first = case.run(pipe, STEPS, cfg=True)
        second = case.run(pipe, STEPS, cfg=True)
    computed = sum(expected_plan(STEPS, INTERVAL, WARMUP))
    for branch in ("default", "default#2"):
        assert sum(f"HyCa [{branch}]: {computed} of {STEPS} steps computed" in r.message
                   for r in caplog.records) == 2
    assert torch.equal(first, second)


@pytest.mark.parametrize("steps, plan", [
    (4, [True, False, True, True]),  # FLUX.1-schnell: N=2, warm-up 1, last step computed
    (8, [True, False, True, False, True, False, True, True]),  # Lightning
])
def test_few_step_defaults(steps, plan):
    case = CASES["qwenimage"]
    pipe = case.build()
    settings = hyca.recommended_settings(pipe, steps)
    assert (settings["interval"], settings["warmup"]) == (2, 1)
    hyca.enable(pipe, profile="taylor-1", **settings)
    assert observe_computed(case, pipe, lambda: case.run(pipe, steps)) == {("transformer", 0): plan}


def test_recommended_settings_scale_with_steps():
    pipe = CASES["wan2.2"].build()
    assert hyca.recommended_settings(pipe.transformer, 28) == dict(interval=4, warmup=3, num_inference_steps=28)
    assert hyca.recommended_settings(pipe.transformer, 50)["interval"] == 5
    assert hyca.recommended_settings(pipe, 16) == dict(interval=2, warmup=1)  # two experts; the last step: the profile's
    with pytest.raises(ValueError, match="num_inference_steps must be a positive integer"):
        hyca.recommended_settings(pipe, 0)


@pytest.mark.parametrize("steps, speedup", [(20, 2.0), (28, 3.0), (28, 3.5), (50, 4.0), (50, 5.0)])
def test_a_target_speedup_picks_the_smallest_interval_that_reaches_it(steps, speedup):
    from hyca.engine.schedule import Schedule

    settings = hyca.recommended_settings(CASES["qwenimage"].build(), steps, speedup=speedup)
    reached = lambda n: steps / sum(Schedule(n, settings["warmup"]).plan(steps))  # noqa: E731
    assert reached(settings["interval"]) >= speedup > reached(settings["interval"] - 1)
    hyca.enable(CASES["qwenimage"].build(), profile="fora", **settings)  # what it returns, enable takes


def test_an_unreachable_speedup_says_what_it_reaches(caplog):
    with caplog.at_level("WARNING", logger="hyca"):
        settings = hyca.recommended_settings(CASES["qwenimage"].build(), 8, speedup=10)
    assert settings["interval"] >= 4 and "out of reach" in caplog.text


@pytest.mark.parametrize("steps, speedup", [(8, 3.0), (11, 3.0), (28, 7.0), (12, 20.0)])
def test_a_recommended_interval_always_fits_the_run(steps, speedup, caplog):
    """What recommended_settings picks never draws the engine's "N does not fit" note: at
    least one step is computed between the warm-up and the last one."""
    from hyca.engine.schedule import Schedule

    settings = hyca.recommended_settings(CASES["qwenimage"].build(), steps, speedup=speedup)
    schedule = Schedule(settings["interval"], settings["warmup"])
    plan = schedule.plan(steps)
    assert any(plan[settings["warmup"]:steps - 1]) and schedule.interval_beyond(steps) is None


def test_every_family_in_the_table_has_a_tiny_pipeline_test():
    covered = {type(CASES[name].transformer(0)).__name__ for name in CASES}
    assert covered == set(FAMILIES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_table_matches_the_model(name):
    """Every name the table uses exists where the hooks will look for it."""
    transformer = CASES[name].transformer(0)
    family = FAMILIES[type(transformer).__name__]
    forward = inspect.signature(type(transformer).forward).parameters
    assert {family.timestep_arg, family.input_arg, *family.bypass_args} <= set(forward)
    # the first block receives the forecast: its stream must be the output stream, whole
    assert family.block_lists[0].stream_tokens == "all"
    for spec in family.block_lists:
        blocks = getattr(transformer, spec.attribute)
        assert len(blocks) > 0
        returns = {spec.returns} if isinstance(spec.returns, str) else set(spec.returns)
        assert spec.stream in returns
        for block in blocks:
            assert returns <= set(inspect.signature(type(block).forward).parameters)
            if spec.text_dropped_if is not None:
                assert isinstance(getattr(block, spec.text_dropped_if), bool)


def test_failed_edit_then_text_to_image_on_one_transformer_leave_no_state_behind():
    """Qwen-Image-Edit's extra image tokens change the sequence length. A run that dies
    half-way (so the pipeline never resets), then a text-to-image run and an edit run on
    the same transformer, each equal the same run on a fresh copy."""
    edit_case, t2i_case = CASES["qwenimage-edit"], CASES["qwenimage"]
    base = edit_case.transformer(0)
    settings = dict(profile="taylor-2", interval=INTERVAL, warmup=WARMUP)
    alone = {}
    for name, case in (("edit", edit_case), ("t2i", t2i_case)):
        pipe = case.pipeline(copy.deepcopy(base))
        hyca.enable(pipe, **settings)
        alone[name] = case.run(pipe, STEPS)

    shared = copy.deepcopy(base)
    hyca.enable(shared, **settings)
    edit, t2i = edit_case.pipeline(shared), t2i_case.pipeline(shared)

    def die_at_step_4(pipe, step, timestep, tensors):
        if step == 4:
            raise KeyboardInterrupt("user pressed stop")
        return tensors

    with pytest.raises(KeyboardInterrupt):
        edit_case.run(edit, STEPS, callback_on_step_end=die_at_step_4)
    assert torch.equal(t2i_case.run(t2i, STEPS), alone["t2i"])
    with pytest.raises(KeyboardInterrupt):
        edit_case.run(edit, STEPS, callback_on_step_end=die_at_step_4)
    assert torch.equal(edit_case.run(edit, STEPS), alone["edit"])


@pytest.mark.parametrize("name, sigma_of", [
    ("wan2.1", lambda t: t / 1000),  # the pipeline gives sigma in its cache context; t = 1000 sigma
    ("qwenimage", lambda t: t),  # no sigma in the context: the transformer's timestep input (t / 1000)
])
def test_sigma_positions(name, sigma_of):
    case = CASES[name]
    base = case.build()
    reference_pipe, hyca_pipe = case.copy_of(base), case.copy_of(base)
    calls = count_calls(case, base, lambda: case.run(base, STEPS, cfg=True))
    plans = {key: expected_plan(n, INTERVAL, WARMUP) for key, n in calls.items()}
    settings, profiles = settings_for(case, hyca_pipe)
    reference = Reference(case, profiles, plans, position_of=sigma_of)
    reference.attach(reference_pipe)
    try:
        expected = case.run(reference_pipe, STEPS, cfg=True)
    finally:
        reference.detach()
    step_pipe = case.copy_of(base)
    hyca.enable(step_pipe, positions="step", **settings)
    hyca.enable(hyca_pipe, positions="sigma", **settings)
    result = case.run(hyca_pipe, STEPS, cfg=True)
    torch.testing.assert_close(result, expected, rtol=1e-4, atol=1e-4)
    assert (result - case.run(step_pipe, STEPS, cfg=True)).abs().max() > 1e-3  # the axis matters


#: the guided call's extra arguments per family whose pipeline has classifier-free guidance
#: (tests/tiny_families.py: ``cfg=True``); FLUX.2 (guidance-distilled) has none
GUIDED = sorted(set(CASES) - {"flux2"})


@pytest.mark.parametrize("name, guided", [(n, False) for n in sorted(CASES)] + [(n, True) for n in GUIDED])
def test_the_closed_loop_probe_records_and_chooses_in_every_family(name, guided):
    """The probe on each family's own pipeline call (recording, then every candidate's cached
    run): it completes and records the branches the run has. Before this test, the probe of
    two families failed outright: HunyuanVideo 1.5 names its passes as diffusers' guiders do
    (pred_cond / pred_uncond) and recorded nothing; Z-Image's model output is one tensor per
    image and its recording failed the whole probe. Wan 2.2 probes its first expert over the
    steps it runs."""
    from hyca.adapters.diffusers.probe import probe_transformer

    case = CASES[name]
    pipe = case.build()
    run = (lambda: case.run(pipe, STEPS, cfg=True)) if guided else (lambda: case.run(pipe, STEPS))
    steps = STEPS
    if len(case.experts) > 1:  # the first expert runs the high-noise part of the steps
        seen = []
        handle = pipe.transformer.register_forward_pre_hook(lambda module, args: seen.append(1))
        run()
        handle.remove()
        steps = len(seen) // (2 if guided else 1)
    profile = probe_transformer(pipe.transformer, run, steps, interval=INTERVAL, warmup=WARMUP, progress=False,
                                candidates=("reuse", "taylor-1"), guidance_scale=3.0 if guided else None)
    selection = profile.metadata["selection"]
    # eq. 5 and both singles on the residuals at least (Z-Image: no model-output track, said)
    assert {"eq5", "uniform:reuse", "uniform:taylor-1"} <= {t["name"] for t in selection["closed_loop"]["trials"]}
    assert set(selection.get("left_out", {})) == ({"model_output"} if name == "zimage" else set())
    assert selection["branches"][0].startswith("cond")
    if guided and name in SEPARATE_CFG | {"qwenimage-edit"}:  # separate calls: both branches recorded
        assert selection["branches"] == ["cond", "uncond"]
