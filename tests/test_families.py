"""HyCa inside the real diffusers pipeline of every supported DiT family (tiny configs).

Per family: the schedule (which calls compute, observed from the blocks themselves),
equality with the per-block reference (tests/family_reference.py) for a multi-cluster,
multi-solver profile, with guidance branches where the pipeline runs them as separate
calls, and bit-identical outputs after ``hyca.disable``.
"""

import logging

import pytest
import torch

import hyca
from hyca import Profile
from hyca.adapters.diffusers.families import FAMILIES, blocks_of, hidden_size
from hyca.math.solvers import pool_names

from family_reference import Reference, count_calls, expected_plan, observe_computed
from tiny_families import CASES

STEPS = 8
INTERVAL, WARMUP = 3, 2
# families whose pipelines run cond and uncond as separate calls
SEPARATE_CFG = {"qwenimage", "hunyuanvideo", "wan2.1", "wan2.2", "chroma", "lumina2", "cogview4"}


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
    return dict(profile=profile, interval=INTERVAL, warmup=WARMUP), profiles


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
    plans = {key: expected_plan(INTERVAL, WARMUP, n) for key, n in calls.items()}
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
    """Torch hooks recording every block call's output structure, per block."""
    seen, handles = {}, []
    for expert in case.experts:
        for attribute, _, _ in case.streams:
            for i, block in enumerate(getattr(getattr(pipe, expert), attribute)):
                key = (expert, attribute, i)
                seen[key] = set()
                handles.append(block.register_forward_hook(lambda m, a, o, k=key: seen[k].add(_structure(o))))
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
