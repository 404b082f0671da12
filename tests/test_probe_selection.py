"""The closed loop's pick among scored candidates (hyca/probing/selection.py): successive
halving and the simplest-within-noise rule, against a brute-force evaluation by formula.

generate() is scripted: each candidate (the solvers its profile uses) misses the reference
by a set relative error per calibration sample, so every fidelity is known in closed form,
``-20 log10(error)`` dB, and the expected winner is computed here from the script alone."""

from __future__ import annotations

import math

import pytest
import torch

from hyca.adapters.diffusers.probe import _separable, _subset
from hyca.math.solvers import pool, pool_names
from hyca.probing import closed_loop, selection
from hyca.profiles.profile import Profile

SAMPLES = 8


def mixed_profile() -> Profile:
    """2 blocks x 4 dims, 2 clusters using taylor-2 and am2 (eq. 5's mixed assignment)."""
    names = pool_names()
    return Profile(torch.tensor([[0, 0, 1, 1], [0, 1, 0, 1]]),
                   torch.tensor([[names.index("taylor-2"), names.index("am2")]] * 2))


def used(profile: Profile) -> tuple[str, ...]:
    return tuple(sorted(pool()[i].name for i in torch.unique(profile.dim_solvers()).tolist()))


def scripted(errors: dict[tuple[str, ...], list[float]], default: float = 0.5):
    """generate(profile[, samples]) missing the reference by ``errors[solvers used][sample]``
    (relative), and a log of the samples each call ran."""
    reference = torch.ones(SAMPLES, 10)
    calls: list[tuple[tuple[str, ...], tuple[int, ...]]] = []

    def generate(profile: Profile, samples: tuple[int, ...] | None = None) -> torch.Tensor:
        rows = list(samples) if samples is not None else list(range(SAMPLES))
        calls.append((used(profile), tuple(rows)))
        error = torch.tensor(errors.get(used(profile), [default] * SAMPLES), dtype=torch.float64)[rows]
        return reference[rows] * (1 + error[:, None])

    return generate, reference, calls


def brute_force(errors: dict[tuple[str, ...], list[float]], default: float = 0.5) -> str:
    """The best mean fidelity over eq. 5 and every single solver, by formula (ties: eq. 5, then pool order)."""
    def mean_db(solvers: tuple[str, ...]) -> float:
        return sum(-20 * math.log10(e) for e in errors.get(solvers, [default] * SAMPLES)) / SAMPLES

    names = [("eq5", ("am2", "taylor-2"))] + [(f"uniform:{n}", (n,)) for n in pool_names()]
    best = names[0]
    for name, solvers in names[1:]:
        if mean_db(solvers) > mean_db(best[1]):
            best = (name, solvers)
    return best[0]


CLEAR = {("am2", "taylor-2"): [0.1] * SAMPLES, ("taylor-1",): [0.02, 0.03] * 4, ("reuse",): [0.2] * SAMPLES}


def test_halving_picks_what_brute_force_picks_when_the_margin_is_clear():
    generate, reference, calls = scripted(CLEAR)
    screen = selection.Screen((0, 1), SAMPLES, finalists=2)
    chosen, trials, name = closed_loop.choose(mixed_profile(), generate, reference, refine=False,
                                              tolerance="se", screen=screen)
    assert name == brute_force(CLEAR) == "uniform:taylor-1"
    assert used(chosen) == ("taylor-1",)
    # every candidate screened on samples 0 and 1; only the finalists on the other six
    screened = [c for c in calls if c[1] == (0, 1)]
    rest = [c for c in calls if c[1] == tuple(range(2, SAMPLES))]
    assert len(screened) == 1 + len(pool()) and len(rest) == 2 and len(calls) == len(screened) + len(rest)
    assert {c[0] for c in rest} == {("taylor-1",), ("am2", "taylor-2")}  # the two best screened, in trial order
    # the finalists' trials report every sample, at the closed-form fidelity
    final = {t.name: t for t in trials if not t.samples}
    assert final["uniform:taylor-1"].per_sample_db == pytest.approx(
        [-20 * math.log10(e) for e in CLEAR[("taylor-1",)]])


def test_without_halving_every_candidate_runs_every_sample_and_the_best_wins():
    generate, reference, calls = scripted(CLEAR)
    _, _, name = closed_loop.choose(mixed_profile(), generate, reference, refine=False, tolerance="best")
    assert name == brute_force(CLEAR)
    assert all(samples == tuple(range(SAMPLES)) for _, samples in calls)


def test_halving_keeps_the_best_single_solver_as_a_finalist():
    # eq. 5 and two refinements... here: eq5 best screened, single solvers all worse on the screen
    errors = {("am2", "taylor-2"): [0.05] * SAMPLES, ("bdf2",): [0.3, 0.3] + [0.01] * 6}
    generate, reference, calls = scripted(errors)
    screen = selection.Screen((0, 1), SAMPLES, finalists=1)
    _, _, name = closed_loop.choose(mixed_profile(), generate, reference, refine=False, tolerance="best",
                                    screen=screen)
    # bdf2 is the best single on the screen too (0.3 beats the default 0.5), so it is run on the rest and wins
    assert {c[0] for c in calls if c[1] == tuple(range(2, SAMPLES))} == {("am2", "taylor-2"), ("bdf2",)}
    assert name == brute_force(errors) == "uniform:bdf2"


def noisy(mixed_gain_db: float) -> dict[tuple[str, ...], list[float]]:
    """eq. 5's mixed assignment ahead of reuse by ``mixed_gain_db`` on average, with a
    per-caption scatter of +-3 dB around it."""
    reuse = [0.1] * SAMPLES
    scatter = [3.0, -3.0] * (SAMPLES // 2)
    return {("reuse",): reuse,
            ("am2", "taylor-2"): [0.1 * 10 ** (-(mixed_gain_db + s) / 20) for s in scatter]}


def test_the_simplest_candidate_within_one_standard_error_is_kept():
    errors = noisy(0.5)  # paired difference: mean 0.5 dB, standard error 3 / sqrt(8) = 1.06 dB
    generate, reference, _ = scripted(errors)
    assert brute_force(errors) == "eq5"
    assert closed_loop.choose(mixed_profile(), generate, reference, refine=False, tolerance="best")[2] == "eq5"
    assert closed_loop.choose(mixed_profile(), generate, reference, refine=False, tolerance="se")[2] == \
        "uniform:reuse"
    assert closed_loop.choose(mixed_profile(), generate, reference, refine=False, tolerance=0.4)[2] == "eq5"
    assert closed_loop.choose(mixed_profile(), generate, reference, refine=False, tolerance=0.6)[2] == \
        "uniform:reuse"


def test_a_gain_beyond_the_noise_keeps_the_composite():
    errors = noisy(2.0)  # 2 dB > one standard error (1.06 dB)
    generate, reference, _ = scripted(errors)
    assert closed_loop.choose(mixed_profile(), generate, reference, refine=False, tolerance="se")[2] == "eq5"


def test_within_noise_is_one_standard_error_of_the_paired_difference():
    best = torch.tensor([30.0, 32.0, 28.0, 30.0], dtype=torch.float64)
    differences = [-1.0, 1.0, -2.0, 0.4]  # mean -0.4; sample std 1.3115 -> standard error 0.6557
    other = best + torch.tensor(differences, dtype=torch.float64)
    mean = sum(differences) / 4
    se = math.sqrt(sum((d - mean) ** 2 for d in differences) / 3) / 2
    assert -se < mean  # by hand: level
    assert selection.within_noise(other, best, "se")
    assert not selection.within_noise(other - 0.3, best, "se")  # mean -0.7 < -0.6557
    assert selection.within_noise(other, best, 0.4) and not selection.within_noise(other, best, 0.39)


def test_simplicity_order_first_track_single_then_mixed_then_other_tracks_then_refinements():
    order = ["uniform:reuse", "eq5", "output:uniform:reuse", "output:eq5", "eq5+am2->taylor-1"]
    tracks = [0, 0, 1, 1, 0]
    keys = [selection.complexity(t, n) for t, n in zip(tracks, order)]
    assert keys[0] < keys[1] < keys[4] and keys[1] < keys[2] < keys[3]


def test_fixed_inputs_give_identical_choices():
    errors = noisy(0.5)
    results = []
    for _ in range(2):
        generate, reference, calls = scripted(errors)
        chosen, trials, name = closed_loop.choose(mixed_profile(), generate, reference, tolerance="se",
                                                  screen=selection.screen_for(SAMPLES))
        results.append((name, [t.to_json() for t in trials], calls, chosen.solvers.tolist()))
    assert results[0] == results[1]


def test_screen_validates_its_samples():
    with pytest.raises(ValueError):
        selection.Screen((0, 8), SAMPLES)
    with pytest.raises(ValueError):
        selection.Screen((), SAMPLES)
    assert selection.screen_for(1) is None
    assert selection.screen_for(8).first == (0, 1) and selection.screen_for(8).rest == tuple(range(2, 8))


def test_a_pipeline_call_splits_into_samples_only_with_its_own_noise():
    latents = torch.arange(12.0).reshape(3, 4)
    call = {"prompt": ["a", "b", "c"], "latents": latents, "negative_prompt": "ugly", "guidance_scale": 2.0}
    assert _separable(call) == 3
    part = _subset(call, (0, 2))
    assert part["prompt"] == ["a", "c"] and torch.equal(part["latents"], latents[[0, 2]])
    assert part["negative_prompt"] == "ugly" and part["guidance_scale"] == 2.0
    assert _separable({"prompt": ["a", "b"]}) is None  # the noise comes from one generator for the batch
    assert _separable({"prompt": "a", "latents": latents[:1]}) is None
    assert _separable({"prompt": ["a", "b"], "latents": latents}) is None  # 3 latents for 2 prompts


def test_progress_reaches_the_end_without_a_console_bar():
    """The app's case: no tqdm bar (progress=False), only on_progress; it must move through
    the closed-loop runs (not sit at the recording's share) and end at 1."""
    from hyca.adapters.diffusers.probe import probe
    from tiny import conditioning, tiny_flux, tiny_pipeline

    seen: list[float] = []
    profile = probe(tiny_pipeline(tiny_flux()), **conditioning(), height=64, width=64, steps=8, interval=3, warmup=2,
                    clusters=2, progress=False, on_progress=lambda fraction, _: seen.append(fraction))
    runs = len(profile.metadata["selection"]["closed_loop"]["trials"])
    after_recording = [f for f in seen if f > 0.3]
    assert len(after_recording) == runs + 1  # one report per cached run, then the choice at 1
    assert seen == sorted(seen) and seen[-1] == 1.0


def test_halving_without_separable_samples_says_it_cannot_halve(caplog):
    """One prompt and no per-sample latents: nothing to screen on; the probe says so and
    records no screen."""
    import logging

    from hyca.adapters.diffusers.probe import probe
    from tiny import conditioning, tiny_flux, tiny_pipeline

    with caplog.at_level(logging.WARNING, logger="hyca"):
        profile = probe(tiny_pipeline(tiny_flux()), **conditioning(), height=64, width=64, steps=8, interval=3,
                        warmup=2, clusters=2, progress=False, halving=True)
    assert "halving needs calibration samples" in caplog.text
    assert profile.metadata["probe"]["halving"] is None
