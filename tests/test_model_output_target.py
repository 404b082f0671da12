"""Profiles that forecast the transformer's output itself (``target="model_output"``, the
strategy of diffusers' TaylorSeer lite): checked against forecasts written out by hand on an
unpatched model, against diffusers' own ``TaylorSeerCacheConfig(use_lite_mode=True)``, and
through the closed-loop probe."""

from __future__ import annotations

import pytest
import torch
from diffusers import TaylorSeerCacheConfig

import hyca
from hyca.engine.cache import LAST_FORECAST
from hyca.adapters.diffusers.fingerprint import fingerprint
from hyca.adapters.diffusers.hooks import root_hook
from hyca.adapters.diffusers.probe import probe_transformer
from hyca.engine.schedule import Schedule
from hyca.engine.targets import as_tokens, from_tokens, require_target
from hyca.probing.closed_loop import fidelity_db
from hyca.profiles import Profile, load_profile, save_profile

from tiny import Inputs, conditioning, euler_sample, fresh_copy, sigmas, tiny_flux, tiny_pipeline
from test_output_target import _known_length  # the steps told through a cache context, as there
from tiny_families import CASES

STEPS, INTERVAL, WARMUP = 10, 3, 2
CHANNELS = 16  # tiny_flux's out_channels (= in_channels): the last axis of its output


def model_output_profile(solver: str, dim: int = CHANNELS, **metadata) -> Profile:
    profile = Profile.uniform(solver, 1, dim)
    profile.metadata.update(target="model_output", **metadata)
    return profile


def by_hand(solver: str, history: list[tuple[int, torch.Tensor]], k: int) -> torch.Tensor:
    """The forecast at step ``k`` from ``history`` (newest first, (step, output)), written out:
    reuse is the last computed output; taylor-1 extends the line through the last two."""
    (t1, o1), *rest = history
    if solver == "reuse":
        return o1
    (t2, o2) = rest[0]
    return o1 + (o1 - o2) * (k - t1) / (t1 - t2)


def reference_run(model, inputs, solver: str, plan: list[bool]) -> torch.Tensor:
    """Euler sampling of the unpatched model where each step the plan skips takes the
    hand-written forecast of the model outputs of the computed steps as its velocity."""
    history: list[tuple[int, torch.Tensor]] = []

    def velocity(m, x, sigma, k):
        if plan[k]:
            out = inputs.call(m, x, sigma)
            history.insert(0, (k, out))
            return out
        return by_hand(solver, history, k)

    return euler_sample(model, inputs, STEPS, velocity)[0]


def cached_run(model, inputs, profile: Profile, **options) -> tuple[torch.Tensor, object]:
    """Euler sampling with ``profile`` enabled (steps known from the cache context), then
    disabled: the final sample and the run's stats."""
    hyca.enable(model, profile=profile, interval=INTERVAL, warmup=WARMUP, scheduler=None, **options)
    try:
        with torch.no_grad():
            result = euler_sample(model, inputs, STEPS, lambda m, x, s, i: _known_length(m, inputs, x, s))[0]
        return result, hyca.stats(model)[0]
    finally:
        hyca.disable(model)


@pytest.mark.parametrize("solver", ["reuse", "taylor-1"])
def test_model_output_profiles_forecast_the_output_by_the_formula(solver):
    model, inputs = tiny_flux(), Inputs()
    plan = Schedule(INTERVAL, WARMUP).plan(STEPS)
    expected = reference_run(fresh_copy(model), inputs, solver, plan)
    result, stats = cached_run(model, inputs, model_output_profile(solver), guard=False)
    torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-5)
    assert (stats.computed, stats.forecast) == (sum(plan), STEPS - sum(plan))
    # disabled means gone: bit-identical to a model never patched
    assert torch.equal(euler_sample(model, inputs, STEPS)[0], euler_sample(fresh_copy(model), inputs, STEPS)[0])


def test_a_skip_step_runs_no_block():
    model, inputs = tiny_flux(), Inputs()
    calls = []
    for block in list(model.transformer_blocks) + list(model.single_transformer_blocks):
        block.attn.register_forward_hook(lambda *_: calls.append(1))  # inside the block: counts real runs
    blocks = len(model.transformer_blocks) + len(model.single_transformer_blocks)
    plan = Schedule(INTERVAL, WARMUP).plan(STEPS)
    cached_run(model, inputs, model_output_profile("taylor-1"))
    assert len(calls) == blocks * sum(plan)


class ChildCalls:
    """Per transformer call (a hook registered after HyCa's), whether any direct child module
    ran inside it: False for a call whose forward was skipped (not only its blocks).
    ``skipped_args``: calls given any of these arguments (not None) are not counted (a
    family's ``bypass_args``: SD3's skip-layer guidance pass, which HyCa stays out of)."""

    def __init__(self, transformer: torch.nn.Module, skipped_args: tuple[str, ...] = ()) -> None:
        self.ran: list[bool] = []
        self._now, self._counted = False, True
        self._skipped_args = skipped_args
        for child in transformer.children():
            child.register_forward_pre_hook(self._child)
        transformer.register_forward_pre_hook(self._begin, with_kwargs=True)
        transformer.register_forward_hook(self._end)

    def _child(self, *_) -> None:
        self._now = True

    def _begin(self, module, args, kwargs) -> None:
        self._now = False
        self._counted = all(kwargs.get(name) is None for name in self._skipped_args)

    def _end(self, *_) -> None:
        if self._counted:
            self.ran.append(self._now)


def test_a_skip_step_runs_no_transformer_and_gives_the_same_bits():
    """A model-output skip call returns its forecast without entering the transformer
    (hyca/adapters/diffusers/outputs.py); with that hook out of the chain the call runs and
    its blocks pass their inputs on, and the run gives the same bits."""
    model, inputs = tiny_flux(), Inputs()
    plan = Schedule(INTERVAL, WARMUP).plan(STEPS)
    runs = {}
    for inert in (False, True):
        copy = fresh_copy(model)
        calls = ChildCalls(copy)
        hyca.enable(copy, profile=model_output_profile("taylor-1"), interval=INTERVAL, warmup=WARMUP, scheduler=None)
        root_hook(copy).skip_hook.inert = inert  # the hook left in a chain HyCa cannot rewire: plain forward
        with torch.no_grad():
            runs[inert] = euler_sample(copy, inputs, STEPS, lambda m, x, s, i: _known_length(m, inputs, x, s))[0]
        assert calls.ran == (list(plan) if not inert else [True] * STEPS)
        assert hyca.stats(copy)[0].forecast == STEPS - sum(plan)
        hyca.disable(copy)
    assert torch.equal(runs[False], runs[True])


def test_a_skip_call_with_another_return_dict_runs_the_transformer():
    """The skipped call's output takes the form of the branch's latest computed one: a call
    asking for another form (``return_dict``) runs, and gets its own type."""
    model, inputs = tiny_flux(), Inputs()
    calls = ChildCalls(model)
    hyca.enable(model, profile=model_output_profile("reuse"), interval=INTERVAL, warmup=WARMUP, scheduler=None)
    x, outputs = inputs.noise, []
    with torch.no_grad():
        for k, sigma in enumerate(sigmas(STEPS)[:STEPS]):
            with model.cache_context("cond", num_inference_steps=STEPS):
                outputs.append(model(hidden_states=x, encoder_hidden_states=inputs.text,
                                     pooled_projections=inputs.pooled, timestep=sigma.expand(1), img_ids=inputs.img_ids,
                                     txt_ids=inputs.txt_ids, return_dict=k >= WARMUP))
    hyca.disable(model)
    plan = Schedule(INTERVAL, WARMUP).plan(STEPS)
    # the calls asking for a dataclass run until one of them is computed; then they skip again
    computed = next(k for k in range(WARMUP, STEPS) if plan[k])
    assert WARMUP < computed < STEPS - 1 and not all(plan[computed + 1:])
    assert calls.ran == [plan[k] or WARMUP <= k < computed for k in range(STEPS)]
    assert all(isinstance(o, tuple) for o in outputs[:WARMUP])
    assert all(type(o).__name__ == "Transformer2DModelOutput" for o in outputs[WARMUP:])
    assert torch.equal(outputs[WARMUP].sample, outputs[WARMUP - 1][0])  # reuse: the last computed output


def test_taylorseer_lite_order_1_is_the_same_forecast():
    """diffusers' lite mode (``diffusers/hooks/taylorseer_cache.py``, 0.42.1) computes steps
    ``0 .. B-1`` and ``B+1 + k*N`` (``B = disable_cache_before_step``) and forecasts proj_out's
    output, FLUX's model output, by ``o(t1) + (o(t1) - o(t0)) / (t1 - t0) * (k - t1)`` in call
    counts. HyCa's schedule with warm-up B and a first interval of 2 computes the same steps
    (``{0..W-1} U {W-1+F+kN}``), without its last one, and taylor-1 on the step axis is the same
    line: the two runs agree up to float rounding (factors kept in float32 on both sides)."""
    model = tiny_flux()

    def run(pipe):
        return pipe(num_inference_steps=12, height=32, width=32, output_type="latent",
                    generator=torch.Generator().manual_seed(0), **conditioning()).images

    lite = tiny_pipeline(fresh_copy(model))
    lite.transformer.enable_cache(TaylorSeerCacheConfig(
        cache_interval=INTERVAL, disable_cache_before_step=WARMUP, max_order=1, taylor_factors_dtype=torch.float32,
        use_lite_mode=True))
    pipe = tiny_pipeline(fresh_copy(model))
    # as the probe's lite track writes it: the start, and the last step forecast
    profile = model_output_profile("taylor-1", first_interval=2, skip_last=True, interval=INTERVAL, warmup=WARMUP,
                                   compute_last=True)  # chosen for the default schedule, whose end it changes
    hyca.enable(pipe, profile=profile, interval=INTERVAL, warmup=WARMUP, guard=False)
    ours, theirs, full = run(pipe), run(lite), run(tiny_pipeline(fresh_copy(model)))
    stats = hyca.stats(pipe)[0]
    # the profile's own schedule: nothing to say but that its end forecasts the last step the
    # run asked computed (the first helper found it said nowhere but in `hyca show`)
    assert stats.notes == [LAST_FORECAST]
    assert (stats.computed, stats.forecast) == (5, 7)  # steps 0, 1, 3, 6, 9 of 12
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert (ours - full).abs().max() > 1e-2  # forecasting did change the run: the agreement is not vacuous


def test_model_output_profiles_round_trip_and_name_their_target(tmp_path):
    model = tiny_flux()
    fp = fingerprint(model)
    path = save_profile(model_output_profile("taylor-2"), tmp_path / "mo.safetensors", fp)
    loaded = load_profile(path, fp)
    assert (loaded.num_blocks, loaded.dim, loaded.metadata["target"]) == (1, CHANNELS, "model_output")
    (engine,) = hyca.enable(model, profile=loaded, interval=INTERVAL, warmup=WARMUP)
    assert engine.target == "model_output"
    hyca.disable(model)


def test_a_profile_for_other_output_channels_computes_and_says_so():
    model, inputs = tiny_flux(), Inputs()
    result, stats = cached_run(model, inputs, model_output_profile("reuse", dim=CHANNELS + 1))
    assert stats.forecast == 0 and any("output channels" in n for n in stats.notes)
    assert torch.equal(result, euler_sample(fresh_copy(model), inputs, STEPS)[0])


def test_token_view_of_channel_first_outputs():
    image = torch.randn(2, 5, 3, 4)  # (batch, channels, height, width)
    tokens = as_tokens(image)
    assert tokens.shape == (2, 12, 5)
    assert torch.equal(tokens[1, 2 * 4 + 3], image[1, :, 2, 3])  # token h*W + w holds pixel (h, w)
    assert torch.equal(from_tokens(tokens, image), image)
    video = torch.randn(1, 3, 2, 2, 2)
    assert torch.equal(from_tokens(as_tokens(video), video), video)
    flat = torch.randn(2, 7, 4)
    assert as_tokens(flat) is flat


def _channels(output: torch.Tensor) -> int:
    return output.shape[-1] if output.dim() == 3 else output.shape[1]


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_family_reuses_its_model_output(name):
    """With reuse, every forecast call's output is exactly one the same run computed before,
    in the family's own output type; the run computes the planned steps."""
    case = CASES[name]
    pipe = case.build()
    outputs: dict[str, list] = {}
    channels = {}
    for expert in case.experts:
        seen = []
        handle = getattr(pipe, expert).register_forward_hook(lambda m, a, o, seen=seen: seen.append(o))
        case.run(pipe, 2)
        handle.remove()
        sample = seen[0][0] if isinstance(seen[0], tuple) else getattr(seen[0], "sample", seen[0])
        channels[expert] = _channels(sample) if isinstance(sample, torch.Tensor) else len(sample)
    profiles = {e: model_output_profile("reuse", channels[e]) for e in case.experts}
    hyca.enable(pipe, profile=profiles if len(case.experts) > 1 else profiles["transformer"], interval=INTERVAL,
                warmup=WARMUP)
    children = {}
    for expert in case.experts:  # registered after HyCa's hook: sees what the pipeline gets
        seen = outputs.setdefault(expert, [])
        getattr(pipe, expert).register_forward_hook(lambda m, a, o, seen=seen: seen.append(o))
        children[expert] = ChildCalls(getattr(pipe, expert), root_hook(getattr(pipe, expert)).family.bypass_args)
    try:
        out = case.run(pipe, 8)
        stats = hyca.stats(pipe)
    finally:
        hyca.disable(pipe)
    assert torch.isfinite(out).all()
    if not isinstance(sample, torch.Tensor):  # Z-Image returns one tensor per image: computed, and said
        assert sum(s.forecast for s in stats) == 0 and any("not one tensor" in n for s in stats for n in s.notes)
        return
    assert sum(s.forecast for s in stats) > 0
    repeats = 0
    for seen in outputs.values():
        samples = [o[0] if isinstance(o, tuple) else getattr(o, "sample", o) for o in seen]
        assert all(type(o) is type(seen[0]) for o in seen)  # the family's own output type throughout
        repeats += sum(any(torch.equal(s, e) for e in samples[:i]) for i, s in enumerate(samples))
    assert repeats == sum(s.forecast for s in stats)
    # a forecast call ran no transformer at all: only computed calls entered a child module
    assert sum(sum(c.ran) for c in children.values()) == sum(s.computed for s in stats)


def test_a_model_whose_output_is_no_one_tensor_is_probed_without_that_track(caplog, tmp_path, monkeypatch):
    """Z-Image returns one tensor per image: the model output's recording failed, and with it
    every first-use probe of a Z-Image pipeline. Its candidates are left out, said once; the
    probe keeps a residual profile; asking for that target still fails, naming why."""
    from tiny_families import _embeds

    monkeypatch.setenv("HYCA_CACHE", str(tmp_path))
    pipe = CASES["zimage"].build()
    call = dict(steps=8, interval=3, warmup=2, progress=False, height=64, width=64, guidance_scale=1.0,
                prompt_embeds=[_embeds(16, 3)[0]], negative_prompt_embeds=[_embeds(16, 7)[0]])
    with caplog.at_level("WARNING", logger="hyca"):
        profile = hyca.probe(pipe, **call)
    names = [t["name"] for t in profile.metadata["selection"]["closed_loop"]["trials"]]
    assert names and not any(n.startswith("model") for n in names) and "eq5" in names
    assert profile.metadata.get("target", "residual") == "residual"
    assert "model_output" in profile.metadata["selection"]["left_out"]
    assert [r for r in caplog.records if "leaving out the candidates that forecast the model output" in r.getMessage()]
    with pytest.raises(RuntimeError, match="not one tensor"):
        hyca.probe(pipe, target="model_output", **call)


def test_probe_offers_the_model_output_track_and_keeps_to_it_when_asked():
    model, inputs = tiny_flux(), Inputs()
    loop = lambda: euler_sample(model, inputs, STEPS)  # noqa: E731
    profile = probe_transformer(model, loop, STEPS, interval=INTERVAL, warmup=WARMUP, progress=False,
                                candidates=("reuse", "taylor-1", "taylor-2"))
    names = [t["name"] for t in profile.metadata["selection"]["closed_loop"]["trials"]]
    # the lite-equivalent candidates are run: model output, short start, reuse / taylor-1 / taylor-2
    for solver in ("reuse", "taylor-1", "taylor-2"):
        assert f"model:uniform:{solver}" in names
        assert f"model,lite:uniform:{solver}" in names  # TaylorSeer lite's own schedule
    for solver in ("taylor-1", "taylor-2"):  # and lite's strategy exactly: no guard
        assert f"model,lite:uniform:{solver},no-guard" in names
    forced = probe_transformer(model, loop, STEPS, interval=INTERVAL, warmup=WARMUP, progress=False,
                               target="model_output", candidates=("reuse", "taylor-1"))
    assert forced.metadata["target"] == "model_output" and (forced.num_blocks, forced.dim) == (1, CHANNELS)
    trials = forced.metadata["selection"]["closed_loop"]["trials"]
    assert all(t["name"].startswith("model") for t in trials)
    # the chosen profile, enabled as a user would, lands where its trial did
    best = max(t["fidelity_db"] for t in trials)
    reference = loop()[0]
    cached, _ = cached_run(model, inputs, forced)
    assert fidelity_db(cached, reference) == pytest.approx(best, abs=0.05)


def test_a_probe_that_keeps_a_guard_off_candidate_says_so_in_its_profile(monkeypatch):
    """The chosen candidate's ``guard: false`` reaches the profile's metadata (the engine reads
    it there), and the profile enabled with the guard on runs as the guard-off engine does
    (that the flag keeps a guard out that would act: tests/test_guard.py)."""
    from hyca.probing import closed_loop

    original = closed_loop.choose

    def keep_lite_unguarded(tracks, generate, reference, *args, **kwargs):
        _, trials, _ = original(tracks, generate, reference, *args, **kwargs)
        lite = next(t for t in tracks if t.prefix == "model,lite:")
        candidate = closed_loop.with_metadata(closed_loop.uniform_candidates(lite.eq5, [pool_solver("taylor-1")])[0]
                                              .profile, guard=False)
        return candidate, trials, "model,lite:uniform:taylor-1,no-guard"

    monkeypatch.setattr(closed_loop, "choose", keep_lite_unguarded)
    model, inputs = tiny_flux(), Inputs()
    profile = probe_transformer(model, lambda: euler_sample(model, inputs, STEPS), STEPS, interval=INTERVAL,
                                warmup=WARMUP, progress=False, candidates=("reuse", "taylor-1", "taylor-2"))
    assert profile.metadata["guard"] is False and profile.metadata["skip_last"] is True
    guarded, _ = cached_run(model, inputs, profile)
    plain = Profile(profile.labels, profile.solvers, {k: v for k, v in profile.metadata.items() if k != "guard"})
    unguarded, _ = cached_run(model, inputs, plain, guard=False)
    assert torch.equal(guarded, unguarded)


def pool_solver(name: str):
    from hyca.math.solvers import pool, pool_names

    return pool()[pool_names().index(name)]


def test_hosts_that_hook_blocks_only_refuse_model_output_profiles():
    with pytest.raises(ValueError, match="model output, which the ComfyUI node cannot apply"):
        require_target({"target": "model_output"}, ("residual",), "the ComfyUI node")
    require_target({}, ("residual",), "the ComfyUI node")  # old profiles (no target) are residual profiles


@pytest.mark.parametrize("steps, interval, warmup", [(50, 4, 3), (12, 3, 2), (28, 6, 3), (20, 5, 1)])
def test_lite_start_computes_taylorseers_steps(steps, interval, warmup):
    """diffusers' rule (``TaylorSeerCacheHook._measure_should_compute``, 0.42.1): a step computes
    when ``step < before`` or ``(step - before - 1) % interval == 0``."""
    theirs = [s < warmup or (s - warmup - 1) % interval == 0 for s in range(steps)]
    ours = Schedule(interval, warmup).lite_start(steps)
    if sum(theirs) > sum(Schedule(interval, warmup).plan(steps)):
        assert ours is None
    else:
        assert ours.plan(steps) == theirs


@pytest.mark.parametrize("stochastic", [True, False], ids=["stochastic_sampling", "deterministic"])
def test_a_scheduler_that_replaces_the_noise_every_step_computes_every_step(stochastic, caplog):
    """FlowMatchEulerDiscreteScheduler(stochastic_sampling=True) draws the whole noise anew at
    every step (``x = (1 - s) x0 + s * noise``): no forecast follows it (plain reuse at N=4:
    12.7 dB against the full image, where a run with other noise is 22.4 dB from it;
    bench/results/renoising.md). With the shipped profile or FORA asked by name, such a run
    computes every step, gives the uncached image bit for bit and says why once; the
    deterministic scheduler keeps the profile and forecasts."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from hyca.profiles.sources import shipped_dir
    from hyca.reference import load_pipeline

    pipe = load_pipeline()
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, stochastic_sampling=stochastic)
    shipped = str(next(shipped_dir().glob("*-n4.safetensors")))
    assert load_profile(shipped).metadata["target"] == "model_output"

    def image(profile):
        if profile is not None:
            hyca.enable(pipe, profile=profile, interval=4, warmup=3)
        torch.manual_seed(0)  # the scheduler draws its noise from the global generator
        out = pipe("a large red circle at the center on a white background", num_inference_steps=20,
                   generator=torch.Generator().manual_seed(1), output_type="pt").images
        stats = hyca.stats(pipe)[0] if profile is not None else None
        hyca.disable(pipe)
        return out, stats

    full, _ = image(None)
    with caplog.at_level("WARNING", logger="hyca"):
        results = {name: image(profile) for name, profile in (("shipped", shipped), ("fora", "fora"))}
    said = [r for r in caplog.records if "replaces the sample's noise at every step" in r.getMessage()]
    assert len(said) == (2 if stochastic else 0)  # once per enabled model, enabled twice here
    for name, (out, stats) in results.items():
        assert torch.equal(out, full) == stochastic, name
        assert (stats.forecast == 0) == stochastic
        assert any("replaces the sample's noise" in n for n in stats.notes) == stochastic
        if stochastic:  # nothing forecast: no word of a profile's settings, guard or last step (a helper's finding)
            assert stats.off_settings is None and not any("guard off" in n or "last step" in n for n in stats.notes)


def test_a_run_that_forecasts_nothing_says_nothing_of_its_profiles_guard_or_last_step():
    """The shipped 50-step profile (chosen guard-off, its last step forecast) on a 3-step run
    at N=4, warm-up 3: every step computes, and the run's notes say that, not "guard off ...
    at these settings" or "last step forecast" (a README-only helper's finding)."""
    from hyca.reference import load_pipeline

    pipe = load_pipeline()
    hyca.enable(pipe, interval=4, warmup=3)
    pipe("a red circle", num_inference_steps=3, output_type="pt")
    stats = hyca.stats(pipe)[0]
    assert stats.forecast == 0 and any("forecasts none of this run's 3 steps" in n for n in stats.notes)
    assert not any("guard off" in n or "last step forecast" in n for n in stats.notes), stats.notes


@pytest.mark.parametrize("compute_last, last_computed", [(None, False), (True, True), (False, False)])
def test_compute_last_true_computes_the_last_step_of_a_lite_end_profile(compute_last, last_computed):
    """A profile chosen on TaylorSeer lite's schedule forecasts the last step (metadata
    skip_last). hyca.enable's default lets it and says so; compute_last=True always computes
    the last step (a helper found no way to have it with profile="auto"); False leaves it to
    the interval."""
    pipe = tiny_pipeline(tiny_flux())
    profile = model_output_profile("taylor-1", first_interval=2, skip_last=True, interval=INTERVAL, warmup=WARMUP,
                                   compute_last=True)
    hyca.enable(pipe, profile=profile, interval=INTERVAL, warmup=WARMUP, compute_last=compute_last, guard=False)
    calls = ChildCalls(pipe.transformer)
    pipe(num_inference_steps=12, height=32, width=32, output_type="latent",
         generator=torch.Generator().manual_seed(0), **conditioning())
    stats = hyca.stats(pipe)[0]
    hyca.disable(pipe)
    assert calls.ran[-1] == last_computed and sum(calls.ran) == stats.computed
    assert (LAST_FORECAST in stats.notes) == (compute_last is None)


def test_recommended_settings_leave_the_last_step_to_the_profile_as_a_plain_enable_does():
    """recommended_settings returned compute_last=True, so the README's path computed the last
    step of a profile chosen with it forecast, where a plain enable (and the app) did not, with
    no word (a helper: 10 of 28 steps computed against 9)."""
    counts = []
    for extra in (dict(interval=INTERVAL, warmup=WARMUP), None):
        pipe = tiny_pipeline(tiny_flux())
        profile = model_output_profile("taylor-1", first_interval=2, skip_last=True, interval=INTERVAL,
                                       warmup=WARMUP, compute_last=True)
        settings = extra if extra is not None else hyca.recommended_settings(pipe, 12)
        settings = {**settings, "interval": INTERVAL, "warmup": WARMUP}  # the profile's N and warm-up
        hyca.enable(pipe, profile=profile, guard=False, **settings)
        pipe(num_inference_steps=12, height=32, width=32, output_type="latent",
             generator=torch.Generator().manual_seed(0), **conditioning())
        counts.append((hyca.stats(pipe)[0].computed, LAST_FORECAST in hyca.stats(pipe)[0].notes))
        hyca.disable(pipe)
    assert counts[0] == counts[1] and counts[0][1]


def test_a_noise_replacing_scheduler_at_new_settings_probes_nothing(tmp_path, monkeypatch):
    """profile="auto" at settings without a profile: such a run computes every step, so no
    probe runs (a second README-only helper saw one run for 39 s and draw from the global
    generator the scheduler's noise comes from, so the image differed from the uncached one
    while the note said it was the uncached one)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from hyca.reference import load_pipeline
    from profile_helpers import no_profiles_but_a_cache

    no_profiles_but_a_cache(tmp_path, monkeypatch)

    def no_probe(*args, **kwargs):
        raise AssertionError("probed a run that computes every step")

    monkeypatch.setattr("hyca.adapters.diffusers.probe.probe", no_probe)
    pipe = load_pipeline()
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, stochastic_sampling=True)

    def image():
        torch.manual_seed(0)  # the scheduler draws its noise from the global generator
        return pipe("a red circle", num_inference_steps=20, generator=torch.Generator().manual_seed(1),
                    output_type="pt").images

    full = image()
    hyca.enable(pipe, interval=4, warmup=3)
    cached = image()
    stats = hyca.stats(pipe)[0]
    hyca.disable(pipe)
    assert torch.equal(cached, full) and stats.forecast == 0
    assert any("replaces the sample's noise" in n for n in stats.notes)

