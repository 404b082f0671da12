"""The host-neutral closed-loop probe (hyca/probing/probe.py, host.py) on a toy host.

The toy model's block residuals are set by construction: a quadratic in sigma per
dimension (optionally plus a small input-dependent term), summed onto the input and read
out as the velocity. On a uniform sigma grid a quadratic is what a three-point
extrapolation through the last computed steps (lagrange-3) reproduces exactly and what
reuse and first-order Taylor miss in every dimension, so what the probe must keep is
known without it. Expectations come from a plain Euler loop written here and a
PSNR formula written here, not from the probe's own numbers."""

from __future__ import annotations

import math

import pytest
import torch

from hyca.engine.cache import BranchState, HybridCache
from hyca.engine.schedule import Schedule
from hyca.math.solvers import pool
from hyca.probing import SINGLES, euler_sample, probe_host
from hyca.probing.recorder import SketchRecorder
from hyca.profiles.profile import Profile
from hyca.profiles.settings import RunSettings

STEPS, INTERVAL, WARMUP, BLOCKS, TOKENS, DIM = 12, 3, 3, 3, 4, 6
# uniform: a quadratic in sigma is one in the step; a warm-up of 3 gives second-order Taylor its 3 points
SIGMAS = [1 - i / STEPS for i in range(STEPS + 1)]


class ToyModel:
    """Blocks whose residual is ``a + b sigma + c sigma^2`` per (block, token, dim), different
    per branch, plus ``coupling * tanh(h W)`` (0: the residual ignores the input)."""

    def __init__(self, coupling: float = 0.0, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        shape = (2, BLOCKS, TOKENS, DIM)  # branch 0 cond, 1 uncond
        self.a, self.b = torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)
        self.c = 2 + torch.rand(shape, generator=g, dtype=torch.float64)  # curved in every dimension
        self.w = torch.randn(BLOCKS, DIM, DIM, generator=g, dtype=torch.float64) / math.sqrt(DIM)
        self.coupling = coupling

    def residual(self, h: torch.Tensor, sigma: float, branch: str, block: int) -> torch.Tensor:
        i = 0 if branch == "cond" else 1
        return (self.a[i, block] + self.b[i, block] * sigma + self.c[i, block] * sigma ** 2
                + self.coupling * torch.tanh(h @ self.w[block]))

    def velocity(self, x: torch.Tensor, sigma: float, branch: str, forecast: torch.Tensor | None = None,
                 report=None) -> torch.Tensor:
        """``x`` plus every block's residual (or ``forecast`` for their sum), read out."""
        if forecast is not None:
            return 0.1 * (x + forecast)
        h = x
        for block in range(BLOCKS):
            r = self.residual(h, sigma, branch, block)
            if report is not None:
                report(block, r)
            h = h + r
        return 0.1 * h


class ToyHost:
    """A :class:`~hyca.probing.ProbeHost` built on :func:`euler_sample` (as the WebUI's is)."""

    num_blocks, hidden_size = BLOCKS, DIM

    def __init__(self, model: ToyModel, guidance_scale: float | None = None) -> None:
        self.model, self.guidance_scale, self.calls = model, guidance_scale, []

    def sample(self, engine):
        states = {}

        def denoise(x, sigma, branch):
            self.calls.append(branch)
            if engine is None:
                return self.model.velocity(x, sigma, branch)
            state = states.setdefault(branch, BranchState())
            computing = engine.begin_step(state, sigma, (tuple(x.shape), x.dtype), STEPS)
            if computing:
                out = self.model.velocity(x, sigma, branch, report=lambda b, r: engine.record(state, b, r))
            else:
                out = self.model.velocity(x, sigma, branch, forecast=engine.predicted_residual(state))
            engine.end_step(state)
            return out

        x = torch.randn(1, TOKENS, DIM, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        return euler_sample(denoise, x, SIGMAS, self.guidance_scale)


def psnr(output: torch.Tensor, reference: torch.Tensor) -> float:
    error = float((output - reference).double().square().sum())
    return math.inf if error == 0 else 10 * math.log10(float(reference.double().square().sum()) / error)


def cached_run(host: ToyHost, profile: Profile, guard: bool | None = None) -> torch.Tensor:
    """A cached generation written out here: Euler steps, computed or forecast as the schedule says."""
    start = Schedule(INTERVAL, WARMUP).with_first_interval(profile.metadata.get("first_interval"))
    return host.sample(HybridCache(profile, start, guard=guard))


def run_probe(host: ToyHost, guidance: float | None = None, **options) -> Profile:
    return probe_host(host, RunSettings(steps=STEPS, guidance_scale=guidance, shift=1.0), Schedule(INTERVAL, WARMUP),
                      clusters=2, progress=False, fingerprint={"class": "Toy"}, facts={"frontend": "toy"}, **options)


def test_euler_sample_is_eulers_method_and_guides_cond_then_uncond():
    calls = []

    def denoise(x, sigma, branch):
        calls.append((sigma, branch))
        return torch.full_like(x, 2.0 if branch == "cond" else -1.0) * sigma

    x = torch.zeros(2)
    sigmas = [1.0, 0.5, 0.0]
    # by hand: steps of -0.5 with d = sigma * (u + 3 (c - u)) = sigma * 8
    assert torch.allclose(euler_sample(denoise, x, sigmas, 3.0), torch.full((2,), -0.5 * 8 * 1.0 - 0.5 * 8 * 0.5))
    assert calls == [(1.0, "cond"), (1.0, "uncond"), (0.5, "cond"), (0.5, "uncond")]
    calls.clear()
    assert torch.allclose(euler_sample(denoise, x, sigmas, 1.0), torch.full((2,), -0.5 * 2 * 1.0 - 0.5 * 2 * 0.5))
    assert [b for _, b in calls] == ["cond", "cond"]
    with pytest.raises(ValueError, match="two sigmas"):
        euler_sample(denoise, x, [1.0], None)


def test_the_probe_keeps_a_solver_that_is_exact_on_quadratic_residuals():
    host = ToyHost(ToyModel())
    profile = run_probe(host)
    used = {pool()[i].name for i in torch.unique(profile.dim_solvers()).tolist()}
    assert not used & {"reuse", "taylor-1"}, used  # both miss a quadratic in every dimension
    reference = host.sample(None)
    assert psnr(cached_run(host, profile), reference) > 100  # exact up to rounding
    assert psnr(cached_run(host, Profile.uniform("lagrange-3", BLOCKS, DIM)), reference) > 100
    for inexact in ("reuse", "taylor-1"):
        assert psnr(cached_run(host, Profile.uniform(inexact, BLOCKS, DIM)), reference) < 60
    meta = profile.metadata
    assert meta["chosen_for"] == {"steps": STEPS, "shift": 1.0, "interval": INTERVAL, "warmup": WARMUP,
                                  "compute_last": True, "positions": "step"}
    assert meta["fingerprint"] == {"class": "Toy"} and meta["probe"]["frontend"] == "toy"
    assert meta["selection"]["branches"] == ["cond"] and "uncond" not in host.calls


def test_the_kept_candidate_is_the_best_of_its_trials_on_a_guided_input_dependent_model():
    host = ToyHost(ToyModel(coupling=0.6, seed=3), guidance_scale=2.5)
    profile = run_probe(host, guidance=2.5)
    meta = profile.metadata
    assert meta["selection"]["branches"] == ["cond", "uncond"]
    assert meta["chosen_for"]["guidance_scale"] == 2.5
    reference = host.sample(None)
    kept = psnr(cached_run(host, profile), reference)
    trials = meta["selection"]["closed_loop"]["trials"]
    names = [t["name"] for t in trials]
    assert {f"uniform:{name}" for name in SINGLES} <= set(names)
    best = max((t["fidelity_db"] if t["fidelity_db"] is not None else math.inf) for t in trials)
    assert kept == pytest.approx(best, abs=1e-3)  # the report rounds to 3 decimals
    # every single solver, run here on its own, lands no nearer than the kept profile
    for name in SINGLES:
        assert psnr(cached_run(host, Profile.uniform(name, BLOCKS, DIM)), reference) <= kept + 1e-6


def test_open_loop_selection_runs_no_candidate_and_bad_settings_are_refused():
    host = ToyHost(ToyModel())
    profile = run_probe(host, selection="eq5")
    assert "closed_loop" not in profile.metadata["selection"] and host.calls.count("cond") == STEPS
    with pytest.raises(ValueError, match="output head"):
        run_probe(ToyHost(ToyModel()), target="output")
    with pytest.raises(ValueError, match="steps"):
        probe_host(host, RunSettings(), Schedule(INTERVAL, WARMUP), progress=False)


def test_a_recording_that_misses_a_block_fails_loudly():
    class Lossy(ToyHost):
        def sample(self, engine):
            if isinstance(engine, SketchRecorder):
                engine.num_blocks = BLOCKS + 1  # the host records fewer blocks than it claims
            return super().sample(engine)

    with pytest.raises(RuntimeError, match="did not run"):
        run_probe(Lossy(ToyModel()))


def test_the_closed_loop_tries_alone_the_singles_it_is_given():
    """By default the short-history solvers (``SINGLES``); ``singles=`` names others; given
    ``candidates`` and no ``singles``, every candidate; a single that is not a candidate is
    refused before anything runs."""
    def tried(**options):
        trials = run_probe(ToyHost(ToyModel()), **options).metadata["selection"]["closed_loop"]["trials"]
        return {t["name"].split(":", 1)[1] for t in trials if t["name"].startswith("uniform:")}

    assert tried() == set(SINGLES)
    assert tried(singles=["taylor-3", "fora"]) == {"taylor-3", "reuse"}  # an alias names its solver
    assert tried(candidates=["reuse", "ab3", "lagrange-4"]) == {"reuse", "ab3", "lagrange-4"}
    host = ToyHost(ToyModel())
    with pytest.raises(ValueError, match="not among the candidates"):
        run_probe(host, candidates=["reuse", "taylor-1"], singles=["bdf2"])
    with pytest.raises(ValueError, match=r"singles must be a list of solver names, e.g. \['taylor-1'\]"):
        run_probe(host, singles="taylor-1")
    with pytest.raises(ValueError, match="candidates must be a list of solver names"):
        run_probe(host, candidates="taylor-2")
    assert host.calls == []
