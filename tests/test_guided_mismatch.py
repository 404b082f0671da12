"""A profile chosen without guidance, on a guided run, starts every solver group from plain
reuse (the robust path, ``hyca.profiles.off_settings``), in every family whose guidance HyCa can see: two
branches in separate calls (true CFG), or a batched call whose pipeline keeps its scale
(``_guidance_scale``). The expectation is independent of that code: the same run with a
uniform ``reuse`` profile."""

from __future__ import annotations

import inspect

import pytest
import torch

import hyca
from hyca.adapters.diffusers.families import blocks_of, family_of, hidden_size
from hyca.profiles.settings import RunSettings

from tiny_families import CASES

STEPS, INTERVAL, WARMUP = 6, 2, 1
EXPERT_STEPS = {"wan2.2": 12}  # each expert sees about half the steps: enough to forecast some
GUIDED = sorted(n for n, c in CASES.items() if "cfg" in inspect.signature(c.call).parameters and n != "sd3-slg")


def unguided_profile(transformer, solver: str) -> hyca.Profile:
    profile = hyca.Profile.uniform(solver, len(blocks_of(transformer, family_of(transformer))),
                                   hidden_size(transformer))
    profile.metadata.update(interval=INTERVAL, warmup=WARMUP, chosen_for=RunSettings(
        steps=STEPS, guidance_scale=1.0, interval=INTERVAL, warmup=WARMUP).to_json())
    return profile


def guided_run(name: str, solver: str, guard: bool = True):
    case = CASES[name]
    pipe = case.build()
    profiles = {e: unguided_profile(getattr(pipe, e), solver) for e in case.experts}
    hyca.enable(pipe, profile=profiles if len(profiles) > 1 else profiles["transformer"], interval=INTERVAL,
                warmup=WARMUP, guard=guard)
    out = case.run(pipe, EXPERT_STEPS.get(name, STEPS), cfg=True)
    return out, hyca.stats(pipe)


@pytest.mark.parametrize("name", GUIDED)
def test_an_unguided_profile_runs_a_guided_generation_as_plain_reuse(name):
    expected, _ = guided_run(name, "reuse")
    trusted, _ = guided_run(name, "taylor-2", guard=False)  # the paper's engine: the profile's solver
    out, stats = guided_run(name, "taylor-2")
    assert (trusted - expected).abs().max() > 1e-3  # so the comparison below can tell them apart
    # the per-solver sums of the engine add the same residuals in another order: rounding only
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    assert all(s.switches and all(w.to == "reuse" for w in s.switches) for s in stats)
    assert all(any("starts every solver group from plain reuse" in n for n in s.notes) for s in stats)
