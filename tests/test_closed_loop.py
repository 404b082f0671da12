"""Closed-loop choosing (hyca/probing/closed_loop.py) and the guidance-aware probe.

The decision logic is checked with a generate() whose errors are set per candidate; the
probe end to end on a tiny FluxPipeline, where every number in its report is recomputed
here independently (a fresh cached run per profile against the fully computed one)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import hyca
from hyca.adapters.diffusers.probe import probe, probe_transformer
from hyca.engine.schedule import Schedule
from hyca.math.solvers import pool, pool_names
from hyca.probing import closed_loop
from hyca.profiles.profile import Profile
from hyca.profiles.settings import RunSettings

from references import block_step_mean_error, capture_residuals
from tiny import Inputs, conditioning, euler_sample, tiny_flux, tiny_pipeline

STEPS, INTERVAL, WARMUP = 12, 3, 2


def mixed_profile() -> Profile:
    """2 blocks x 4 dims, 2 clusters using taylor-2 and am2."""
    labels = torch.tensor([[0, 0, 1, 1], [0, 1, 0, 1]])
    names = pool_names()
    return Profile(labels, torch.tensor([[names.index("taylor-2"), names.index("am2")]] * 2))


def scripted(errors: dict[tuple[str, ...], float]):
    """generate(profile) whose output misses the reference by errors[solvers used]."""
    reference = torch.ones(10)

    def generate(profile: Profile) -> torch.Tensor:
        used = tuple(sorted(pool()[i].name for i in torch.unique(profile.dim_solvers()).tolist()))
        return reference + errors.get(used, 1.0)

    return generate, reference


def test_fidelity_is_signal_to_error_in_db_averaged_over_samples():
    ref = torch.full((4,), 2.0)
    assert closed_loop.fidelity_db(ref + 0.2, ref) == pytest.approx(10 * math.log10(16 / 0.16))
    assert closed_loop.fidelity_db(ref, ref) == math.inf
    batch = torch.full((2, 4), 2.0)
    off = batch + torch.tensor([[0.2], [0.02]])  # 20 dB and 40 dB: the mean, not the pooled energy ratio
    assert closed_loop.fidelity_db(off, batch) == pytest.approx(30.0)
    with pytest.raises(ValueError, match="shape"):
        closed_loop.fidelity_db(ref[:2], ref)


def test_the_best_candidate_is_kept_and_every_single_solver_is_tried():
    generate, reference = scripted({("am2", "taylor-2"): 0.5, ("reuse",): 0.3, ("taylor-1",): 0.4})
    chosen, trials, name = closed_loop.choose(mixed_profile(), generate, reference, refine=False)
    assert name == "uniform:reuse" and chosen.solver_names() == ["reuse"]
    assert [t.name for t in trials] == ["eq5", *(f"uniform:{n}" for n in pool_names())]
    assert torch.equal(chosen.labels, mixed_profile().labels)  # the clustering is kept


def test_a_candidate_that_runs_as_one_already_run_takes_its_scores_without_a_run():
    """Eq. 5 chose taylor-1 for every cluster: its uniform taylor-1 candidate is the same run
    (the engine sees the same solver in every dimension), so it is reported with eq. 5's
    scores and not generated again; the same solver on another start is a run of its own."""
    generate, reference = scripted({("taylor-1",): 0.2, ("reuse",): 0.3})
    calls = []

    def counted(profile, *samples):
        calls.append(profile)
        return generate(profile)

    uniform = closed_loop.with_solvers(mixed_profile(), torch.full_like(mixed_profile().solvers,
                                                                        pool_names().index("taylor-1")))
    short = closed_loop.Track("start2:", closed_loop.with_metadata(uniform, first_interval=2), singles=1)
    singles = [pool()[pool_names().index(n)] for n in ("reuse", "taylor-1")]
    _, trials, name = closed_loop.choose([closed_loop.Track("", uniform), short], counted, reference, singles,
                                         refine=False)
    names = [t.name for t in trials]
    assert names == ["eq5", "uniform:reuse", "uniform:taylor-1", "start2:eq5", "start2:uniform:taylor-1"]
    by_name = {t.name: t for t in trials}
    assert by_name["uniform:taylor-1"].per_sample_db == by_name["eq5"].per_sample_db
    assert by_name["uniform:taylor-1"].to_json()["same_as"] == "eq5" and by_name["eq5"].same_as is None
    assert by_name["start2:uniform:taylor-1"].same_as == "start2:eq5"
    assert len(calls) == 3  # eq5, reuse, the short start's eq5 (its taylor-1 twin takes its scores)
    assert name == "eq5"


def test_no_solver_outside_the_candidates_runs_not_even_a_peers_strategy():
    """``solvers`` given (e.g. ``hyca.probe(candidates=["fora"])``): a track's ``always``
    and guard-off ``unguarded`` solvers (TaylorSeer lite's taylor-1 / taylor-2) are left
    out when they are not among them; every trial uses reuse only."""
    generate, reference = scripted({("reuse",): 0.3, ("taylor-1",): 0.1, ("taylor-2",): 0.05})
    reuse = closed_loop.with_solvers(mixed_profile(), torch.zeros_like(mixed_profile().solvers))
    lite = closed_loop.Track("model,lite:", closed_loop.with_metadata(reuse, target="model_output"), 3,
                             always=("reuse", "taylor-1", "taylor-2"), unguarded=("taylor-1", "taylor-2"))
    chosen, trials, _ = closed_loop.choose([closed_loop.Track("", reuse), lite], generate, reference,
                                           [pool()[pool_names().index("reuse")]], refine=False)
    assert [t.name for t in trials] == ["eq5", "uniform:reuse", "model,lite:eq5", "model,lite:uniform:reuse"]
    assert chosen.solver_names() == ["reuse"]


def test_the_plan_told_after_the_first_track_is_the_number_of_trials():
    """``on_plan`` gives a progress bar its total once the first track has run: without
    refinements or screening exactly the trials the choice makes (a track's peer strategies
    that are among the best singles already are not counted twice; a helper saw 41 shrink to 35)."""
    generate, reference = scripted({("reuse",): 0.3, ("taylor-1",): 0.1, ("taylor-2",): 0.05, ("am2",): 0.2,
                                    ("am2", "taylor-2"): 0.15})
    profile = mixed_profile()
    lite = closed_loop.Track("model,lite:", closed_loop.with_metadata(profile, target="model_output"), 3,
                             always=("reuse", "taylor-1", "taylor-2"), unguarded=("taylor-1", "taylor-2"))
    told = []
    _, trials, _ = closed_loop.choose([closed_loop.Track("", profile), lite], generate, reference,
                                      [pool()[pool_names().index(n)] for n in ("reuse", "taylor-1", "taylor-2", "am2")],
                                      refine=False, on_plan=told.append)
    assert told == [len(trials)] and len(trials) == 1 + 4 + 1 + 4 + 2  # eq5, 4 singles; eq5, 3 best + reuse, 2


def test_ties_keep_the_earlier_candidate():
    generate, reference = scripted({("am2", "taylor-2"): 0.3, ("reuse",): 0.3})
    assert closed_loop.choose(mixed_profile(), generate, reference, refine=False)[2] == "eq5"


def test_a_refinement_is_kept_only_when_it_gets_closer():
    # eq5 beats every single solver; handing taylor-2's clusters to the best single solver
    # (taylor-1) does not get closer, handing am2's does
    generate, reference = scripted({("am2", "taylor-2"): 0.2, ("taylor-1",): 0.5, ("taylor-1", "taylor-2"): 0.1,
                                    ("am2", "taylor-1"): 0.3})
    chosen, trials, name = closed_loop.choose(mixed_profile(), generate, reference)
    assert sorted(chosen.solver_names()) == ["taylor-1", "taylor-2"]
    assert name == "eq5+am2->taylor-1"
    # largest group first (a tie: pool order), each tried on what was kept so far
    assert [t.name for t in trials[-2:]] == ["eq5+taylor-2->taylor-1", "eq5+am2->taylor-1"]



def test_unguarded_candidates_run_with_the_guard_off_and_can_win():
    """A track's ``unguarded`` solvers (the model output on TaylorSeer lite's schedule, as lite
    runs it) are tried after the rest with metadata ``guard: false``, which the engine reads."""
    runs = []

    def generate(profile: Profile) -> torch.Tensor:
        runs.append(profile.metadata.get("guard"))
        unguarded = profile.metadata.get("guard") is False
        return torch.ones(10) + (0.1 if unguarded else 0.5)

    track = closed_loop.Track("model,lite:", mixed_profile(), unguarded=("taylor-1",))
    chosen, trials, name = closed_loop.choose([track], generate, torch.ones(10), refine=False)
    assert name == "model,lite:uniform:taylor-1,no-guard" and trials[-1].name == name
    assert chosen.metadata["guard"] is False and chosen.solver_names() == ["taylor-1"]
    assert runs == [None] * (1 + len(pool_names())) + [False]

@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(tiny_flux())


def generate(pipe, seed=1, **extra):
    return pipe(**conditioning(), height=64, width=64, num_inference_steps=STEPS, output_type="latent",
                generator=torch.Generator().manual_seed(seed), **extra).images


def test_the_probes_choice_is_never_worse_on_its_own_run_than_any_single_solver(pipe):
    settings = dict(height=64, width=64, steps=STEPS, interval=INTERVAL, warmup=WARMUP, clusters=3, seed=1,
                    progress=False)
    profile = probe(pipe, **conditioning(), **settings)
    report = profile.metadata["selection"]["closed_loop"]
    assert len(report["trials"]) >= 1 + len(pool())
    full = generate(pipe)

    def fidelity(p):  # independently: a fresh cached run of the probe's own prompt and seed
        hyca.enable(pipe, profile=p, interval=INTERVAL, warmup=WARMUP)  # guard on, as the probe ran it
        try:
            return closed_loop.fidelity_db(generate(pipe), full)
        finally:
            hyca.disable(pipe)

    chosen = fidelity(profile)
    reported = {t["name"]: t["fidelity_db"] for t in report["trials"]}
    assert chosen == pytest.approx(reported[report["chosen"]], abs=1e-3)
    for name in pool_names():
        assert chosen >= fidelity(name) - 1e-9, name
    assert profile.metadata["chosen_for"] == RunSettings(steps=STEPS, guidance_scale=1.0, shift=1.0,
                                                         interval=INTERVAL, warmup=WARMUP, compute_last=True,
                                                         positions="step").to_json()
    assert profile.metadata["timing"]["closed_loop_s"] > 0


def guided_loop(model, cond, uncond, scale, window):
    """Euler sampling with true classifier-free guidance: a cond and an uncond call per step,
    in named cache contexts, along the sigma ``window``."""

    def velocity(m, x, sigma, step):
        s = window[step].reshape(1)
        with m.cache_context("cond"):
            c = cond.call(m, x, s)
        with m.cache_context("uncond"):
            u = uncond.call(m, x, s)
        return u + scale * (c - u)

    return lambda: euler_sample(model, cond, STEPS, velocity)


def test_with_guidance_the_probe_scores_the_guided_residual():
    """Both branches are recorded and eq. 5's replay errors are those of the guided residual
    R_u + g (R_c - R_u), computed here exactly from plain forward hooks."""
    model, cond, uncond, scale = tiny_flux(), Inputs(seed=1), Inputs(seed=4), 3.0
    window = 0.5 - 0.004 * torch.linspace(0, 1, STEPS)
    loop = guided_loop(model, cond, uncond, scale, window)
    profile = probe_transformer(model, loop, STEPS, interval=INTERVAL, warmup=WARMUP, rows=512, progress=False,
                                guidance_scale=scale, selection="eq5")
    assert profile.metadata["selection"]["branches"] == ["cond", "uncond"]
    _, captured = capture_residuals(model, loop)  # per step: 5 cond blocks, then 5 uncond blocks
    per_step = torch.stack([torch.stack(captured[i:i + 10]) for i in range(0, len(captured), 10)]).squeeze(2)
    c, u = per_step[:, :5], per_step[:, 5:]
    guided = u + scale * (c - u)
    plan = Schedule(INTERVAL, WARMUP).plan(STEPS)
    steps_axis = [float(k) for k in range(STEPS)]
    for name in ("reuse", "taylor-1"):
        estimate = profile.metadata["selection"]["replay_error"]["uniform"][name]
        exact = block_step_mean_error(guided, pool_names().index(name), plan, steps_axis)
        assert estimate == pytest.approx(exact, rel=0.15), name
        cond_only = block_step_mean_error(c, pool_names().index(name), plan, steps_axis)
        assert estimate != pytest.approx(cond_only, rel=0.15), name  # the guided residual is not the cond one


def test_a_batched_call_is_split_into_its_guidance_halves():
    from hyca.probing.recorder import SketchRecorder

    recorder = SketchRecorder(1, 4, Schedule(2, 1), guidance_scale=2.0, batched_guidance="uncond-first")
    uncond, cond = torch.randn(1, 3, 4), torch.randn(1, 3, 4)
    torch.testing.assert_close(recorder._guided_halves(torch.cat([uncond, cond])), uncond + 2.0 * (cond - uncond))
    recorder = SketchRecorder(1, 4, Schedule(2, 1), guidance_scale=2.0, batched_guidance="cond-first")
    torch.testing.assert_close(recorder._guided_halves(torch.cat([cond, uncond])), uncond + 2.0 * (cond - uncond))
    with pytest.raises(ValueError, match="batched_guidance"):
        SketchRecorder(1, 4, Schedule(2, 1), batched_guidance="sideways")


def test_a_run_that_returns_nothing_keeps_eq5_and_says_so(caplog):
    model, inputs = tiny_flux(), Inputs()
    loop = lambda: None if euler_sample(model, inputs, STEPS) is not None else None  # noqa: E731
    profile = probe_transformer(model, loop, STEPS, interval=INTERVAL, warmup=WARMUP, progress=False)
    assert profile.metadata["selection"]["closed_loop"] == {"skipped": "the run returned no output"}
    assert any("open loop" in r.message for r in caplog.records)


def test_fixed_inputs_give_the_same_profile(pipe):
    settings = dict(height=64, width=64, steps=STEPS, interval=INTERVAL, warmup=WARMUP, clusters=3, seed=1,
                    progress=False, candidates=("reuse", "taylor-1", "taylor-2"))
    a, b = probe(pipe, **conditioning(), **settings), probe(pipe, **conditioning(), **settings)
    assert torch.equal(a.labels, b.labels) and torch.equal(a.solvers, b.solvers)
    assert a.metadata["selection"]["closed_loop"] == b.metadata["selection"]["closed_loop"]
    assert np.isfinite([t["fidelity_db"] or 0 for t in a.metadata["selection"]["closed_loop"]["trials"]]).all()
