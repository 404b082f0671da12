"""A profile used away from the settings it was chosen for (issue 21 item 4): the run takes
the robust path (every solver group starts from a low order, the guard deciding) and says
so, from one decision in the core, in the stats, the WebUI infotext and console, ComfyUI's
console and the app; at its own settings the run is the one it always was."""

from __future__ import annotations

import re

import pytest
import torch

import hyca
from hyca.adapters.diffusers.fingerprint import fingerprint
from hyca.math.solvers import pool_names
from hyca.profiles.off_settings import decide
from hyca.profiles.profile import Profile
from hyca.profiles.settings import RunSettings

from profile_helpers import random_profile
from tiny import Inputs, euler_sample, tiny_flux

STEPS, INTERVAL, WARMUP = 8, 3, 2
#: 8 steps at N=3, warm-up 2 compute steps 0, 1, 4 and 7: one steady check, so the guard can
#: switch nothing (guard.first_switch) and a run keeps the solvers it starts with
HERE = RunSettings(steps=STEPS, interval=INTERVAL, warmup=WARMUP)
ELSEWHERE = RunSettings(steps=50, interval=INTERVAL, warmup=WARMUP)


# --- the decision -----------------------------------------------------------------------------

def test_the_decision_names_what_differs_and_the_path():
    run = RunSettings(steps=28, guidance_scale=1.0, shift=3.0, interval=6, warmup=3)
    assert decide(run, run, guard=True) is None
    unguided = RunSettings(steps=50, guidance_scale=1.0, shift=1.0, interval=6, warmup=3)
    off = decide(unguided, run, guard=True)
    assert (off.path, off.start, off.differences) == ("robust", "taylor-1", ("steps 50 vs 28", "shift 1 vs 3"))
    assert off.short() == "robust (taylor-1 start, guard)"
    assert "this run differs: steps 50 vs 28; shift 1 vs 3" in off.describe()
    assert "robust path: the run starts every solver group from taylor-1" in off.describe()
    # guided, or on an even sigma schedule: plain reuse
    guided = RunSettings(steps=28, guidance_scale=2.5, shift=3.0, interval=6, warmup=3)
    assert decide(unguided, guided, guard=True).start == "reuse"
    even = RunSettings(steps=28, guidance_scale=1.0, shift=1.0, interval=6, warmup=3)
    assert decide(guided, even, guard=True).start == "reuse"
    # without the guard nothing could give a group its solver back: the profile runs as chosen
    off = decide(unguided, run, guard=False)
    assert (off.path, off.start) == ("profile", None) and "the guard is off" in off.describe()
    with pytest.raises(ValueError, match="off-settings path"):
        decide(unguided, run, guard=True, path="bold")


@pytest.mark.parametrize("shift, start", [(1.0, "reuse"), (3.0, "taylor-1")])
def test_a_schedule_given_as_sigmas_counts_by_its_shape(shift, start):
    """A WebUI / ComfyUI run states sigmas, not a shift: flow-matching sigmas of 20 steps
    shifted by hand (sigma' = s * sigma / (1 + (s - 1) * sigma)) decide as the shift would."""
    plain = [1 - i / 20 for i in range(21)]
    sigmas = tuple(shift * x / (1 + (shift - 1) * x) for x in plain)
    run = RunSettings(steps=20, guidance_scale=1.0, sigmas=sigmas, interval=4, warmup=3)
    chosen = RunSettings(steps=50, guidance_scale=1.0, interval=4, warmup=3)
    assert decide(chosen, run, guard=True).start == start


# --- the engine, through the diffusers hooks on a bare transformer -----------------------------

def _sample(model, profile, path="robust", guard=True):
    """One-branch 8-step run; the final latent and its stats."""
    inputs = Inputs(seed=1)

    def velocity(m, x, sigma, step):
        with m.cache_context("cond", num_inference_steps=STEPS):
            return inputs.call(m, x, sigma)

    for engine in hyca.enable(model, profile=profile, interval=INTERVAL, warmup=WARMUP, guard=guard):
        engine.off_settings = path
    try:
        out, _ = euler_sample(model, inputs, STEPS, velocity)
        return out, hyca.stats(model)[0]
    finally:
        hyca.disable(model)


def _chosen_at(profile: Profile, settings: RunSettings) -> Profile:
    made = Profile(profile.labels.clone(), profile.solvers.clone(), dict(profile.metadata))
    made.metadata.update(interval=INTERVAL, warmup=WARMUP, chosen_for=settings.to_json())
    return made


def _mixed(model) -> Profile:
    """Four clusters per block over the whole pool, with high orders in it."""
    profile = random_profile(fingerprint(model), seed=3)
    assert len(set(profile.solvers.flatten().tolist()) - {0, 1}) >= 3  # not only reuse / taylor-1
    return profile


def test_off_settings_runs_as_every_group_started_from_the_robust_solver_by_hand():
    """The robust path's output equals an independent run: the same clustering with every
    group's solver replaced by the start solver the decision names (reuse groups raised too),
    built by hand and run at its own settings (8 steps at N=3 give the guard no switch); the
    stats carry the decision and its sentence."""
    model = tiny_flux()
    mixed = _mixed(model)
    robust, stats = _sample(model, _chosen_at(mixed, ELSEWHERE))
    start = stats.off_settings.start
    assert stats.off_settings.path == "robust" and start in ("reuse", "taylor-1")
    by_hand = Profile(mixed.labels.clone(), torch.full_like(mixed.solvers, pool_names().index(start)))
    expected, expected_stats = _sample(model, by_hand)
    # the per-solver sums (hyca/engine/cache.py) group the dimensions differently: float rounding
    torch.testing.assert_close(robust, expected, rtol=1e-5, atol=1e-5)
    assert expected_stats.off_settings is None and not expected_stats.switches
    assert stats.off_settings.differences == ("steps 50 vs 8",)
    assert stats.switches and all(s.to == start and s.step == 1 and s.solver != start for s in stats.switches)
    # the starting switches say who made them: no guard check did (fresh-eyes finding 4)
    assert all(s.by == "robust start" and s.describe().endswith("(robust start)") for s in stats.switches)
    assert stats.off_settings.describe() in stats.notes
    # and it is not what the profile as chosen gives (the test can tell them apart)
    as_chosen, as_chosen_stats = _sample(model, _chosen_at(mixed, ELSEWHERE), path="profile")
    assert (as_chosen - robust).abs().max() > 1e-3
    assert as_chosen_stats.off_settings.path == "profile" and not as_chosen_stats.switches


def test_a_profile_of_plain_reuse_raised_to_taylor_1_forecasts_as_taylor_1():
    """Raising a group above its profile's solver gives it the history its new solver
    reads: a reuse-only profile started from taylor-1 runs as the taylor-1 profile."""
    model = tiny_flux()
    names = pool_names()
    reuse = Profile.uniform("reuse", 5, 32)
    raised, stats = _sample(model, _chosen_at(reuse, ELSEWHERE), path="taylor-1")
    expected, _ = _sample(model, Profile.uniform("taylor-1", 5, 32))
    plain, _ = _sample(model, reuse)
    assert stats.switches and all(s.solver == "reuse" and s.to == "taylor-1" for s in stats.switches)
    torch.testing.assert_close(raised, expected, rtol=1e-5, atol=1e-5)
    assert (raised - plain).abs().max() > 1e-3 and names.index("taylor-1") != names.index("reuse")


def test_at_its_own_settings_the_run_is_bit_identical_to_the_robust_path_off():
    model = tiny_flux()
    mixed = _chosen_at(_mixed(model), HERE)
    robust, stats = _sample(model, mixed)
    off, _ = _sample(model, mixed, path="profile")
    assert torch.equal(robust, off)
    assert stats.off_settings is None and not stats.switches and not stats.notes


def test_with_the_guard_off_the_profile_runs_as_chosen_and_says_so():
    model = tiny_flux()
    profile = _chosen_at(_mixed(model), ELSEWHERE)
    robust, stats = _sample(model, profile, guard=False)
    off, _ = _sample(model, profile, path="profile", guard=False)
    assert torch.equal(robust, off) and not stats.switches
    assert stats.off_settings.path == "profile" and "the guard is off" in " ".join(stats.notes)


# --- the WebUI: console and infotext ------------------------------------------------------------

def test_webui_pass_off_its_profiles_settings_says_the_path_in_infotext_and_console(automatic, capsys):
    from hyca.profiles.io import read_profile, save_profile

    from webui_harness import Frontend, args

    with Frontend("forge_flux") as f:
        f.run(args(True, 3, 2, profile="automatic"), steps=10, cfg_scale=1.0)  # probes, unguided, 10 steps
    (path,) = automatic.glob("*.safetensors")
    profile, _ = read_profile(path)
    profile.solvers = torch.full_like(profile.solvers, pool_names().index("taylor-2"))  # above taylor-1
    save_profile(profile, path)
    capsys.readouterr()
    with Frontend("forge_flux") as f:
        _, at = f.run(args(True, 3, 2, profile=path.name, guard=True), steps=10, cfg_scale=1.0)
        assert "chosen for other settings" not in capsys.readouterr().out
        _, off = f.run(args(True, 3, 2, profile=path.name, guard=True), steps=8, cfg_scale=1.0)
        out = capsys.readouterr().out
    assert "HyCa off-settings" not in at.extra_generation_params
    assert off.extra_generation_params["HyCa off-settings"] == "robust (taylor-1 start, guard)"
    switches = off.extra_generation_params["HyCa guard switches"].split(", ")
    assert switches and all(re.fullmatch(r"taylor-2 -> taylor-1 at step 0 \(robust start\)", s) for s in switches), switches
    (line,) = [line for line in out.splitlines() if "chosen for other settings" in line]
    assert "steps 10 vs 8" in line and "robust path: the run starts every solver group from taylor-1" in line


def test_a_profile_chosen_for_no_settings_is_not_said_to_be_chosen_for_other_ones():
    """A solver named by the user (no chosen_for) on a run the host sees differ (a re-noising
    sampler): the note says what differs, not "chosen for other settings (unknown settings)"."""
    from hyca.profiles.off_settings import decide
    from hyca.profiles.settings import RunSettings

    off = decide(RunSettings(), RunSettings(steps=20), guard=True, extra=("sampler: lcm adds fresh noise",))
    text = off.describe()
    assert text.startswith("this run differs from what the profile assumes (sampler: lcm adds fresh noise)")
    assert "chosen for other settings" not in text
