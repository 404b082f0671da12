"""Per-request state (issue 18 item 2): requests running at once on one transformer each
get their own run state, equal to running alone; what cannot be separated is refused.

diffusers' server pattern: one transformer, a pipeline and scheduler per request, requests
in threads. The expectation is each request run alone, one after another, on the same
pipelines."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from diffusers import FluxPipeline

import hyca
from hyca.adapters.diffusers import hooks
from hyca.adapters.diffusers.scopes import ScopeBusy

from tiny import Inputs, euler_sample, tiny_flux
from tiny_families import CASES

INTERVAL, WARMUP = 2, 1
ROUNDS = 6
#: per request: steps, prompt seed, noise seed, guided (true CFG: two branches per step)
REQUESTS = [(6, 3, 1, False), (8, 4, 2, True), (7, 5, 3, False), (9, 6, 4, True)]


def request(pipe, steps: int, prompt_seed: int, noise_seed: int, guided: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(prompt_seed)
    prompt = dict(prompt_embeds=torch.randn(1, 5, 32, generator=g), pooled_prompt_embeds=torch.randn(1, 24, generator=g))
    negative = dict(negative_prompt_embeds=torch.randn(1, 5, 32, generator=g),
                    negative_pooled_prompt_embeds=torch.randn(1, 24, generator=g), true_cfg_scale=3.0) if guided else {}
    return pipe(**prompt, **negative, height=64, width=64, num_inference_steps=steps, output_type="latent",
                generator=torch.Generator().manual_seed(noise_seed)).images


def server():
    """One transformer with HyCa on; one pipeline per request (the first is the one HyCa was
    enabled on, the others are built from its components, as a server makes them)."""
    enabled = CASES["flux"].build()
    hyca.enable(enabled, profile="taylor-2", interval=INTERVAL, warmup=WARMUP)
    others = [FluxPipeline(**enabled.components) for _ in REQUESTS[1:]]
    for pipe in others:
        pipe.scheduler = type(enabled.scheduler).from_config(enabled.scheduler.config)  # its own scheduler
        pipe.set_progress_bar_config(disable=True)
    enabled.set_progress_bar_config(disable=True)
    return [enabled, *others]


def test_concurrent_requests_on_one_transformer_equal_each_alone():
    pipes = server()
    alone = [request(pipe, *spec) for pipe, spec in zip(pipes, REQUESTS)]
    plain = CASES["flux"].build()
    plain_out = request(plain, *REQUESTS[0])
    assert (alone[0] - plain_out).abs().max() > 1e-3  # HyCa forecast: a mixed run would show

    for _ in range(ROUNDS):
        results: list = [None] * len(REQUESTS)
        barrier = threading.Barrier(len(REQUESTS))

        def serve(i: int) -> None:
            barrier.wait()
            try:
                results[i] = request(pipes[i], *REQUESTS[i])
            except BaseException as error:  # reported below, with the request it failed
                results[i] = error

        threads = [threading.Thread(target=serve, args=(i,)) for i in range(len(REQUESTS))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for i, (got, want) in enumerate(zip(results, alone)):
            assert isinstance(got, torch.Tensor), (i, got)
            assert (got - want).abs().max() < 1e-5, (i, float((got - want).abs().max()))


def test_stats_report_the_calling_threads_latest_request():
    pipes = server()
    seen: dict[int, tuple[int, int]] = {}
    barrier = threading.Barrier(2)

    def serve(i: int) -> None:
        barrier.wait()
        request(pipes[i], *REQUESTS[i])
        stats = hyca.stats(pipes[i])[0]
        seen[i] = (stats.computed, stats.forecast)

    threads = [threading.Thread(target=serve, args=(i,)) for i in (0, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(seen[0]) == REQUESTS[0][0] and sum(seen[2]) == REQUESTS[2][0]


def test_asyncio_tasks_in_threads_each_get_their_own_state():
    pipes = server()
    alone = [request(pipe, *spec) for pipe, spec in zip(pipes, REQUESTS)]

    async def serve_all():
        return await asyncio.gather(*(asyncio.to_thread(request, pipe, *spec) for pipe, spec in zip(pipes, REQUESTS)))

    for got, want in zip(asyncio.run(serve_all()), alone):
        assert (got - want).abs().max() < 1e-5


def test_two_threads_in_the_default_scope_at_once_are_refused_never_mixed():
    """Hand-written loops (no pipeline call) share the transformer's default scope: the
    second thread to start while the first's run is unfinished is refused with a clear
    error, and the first run is not disturbed."""
    model, alone = tiny_flux(), tiny_flux()
    for m in (model, alone):
        hyca.enable(m, profile="taylor-2", interval=INTERVAL, warmup=WARMUP)
    inputs = Inputs()
    with torch.no_grad():
        expected, _ = euler_sample(alone, inputs, 8)
    first_step_done, refused = threading.Event(), threading.Event()
    outcome: dict = {}

    def first() -> None:
        def velocity(m, x, sigma, i):
            out = inputs.call(m, x, sigma)
            if i == 0:
                first_step_done.set()
                refused.wait(timeout=60)
            return out

        with torch.no_grad():
            outcome["first"] = euler_sample(model, inputs, 8, velocity)[0]

    def second() -> None:
        first_step_done.wait(timeout=60)
        try:
            with torch.no_grad():
                euler_sample(model, inputs, 8)
        except ScopeBusy as error:
            outcome["error"] = str(error)
        finally:
            refused.set()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert "two threads are sampling" in outcome["error"] and "pipeline call" in outcome["error"]
    torch.testing.assert_close(outcome["first"], expected, rtol=0, atol=0)
    with torch.no_grad():  # one after another is fine, from any thread
        torch.testing.assert_close(euler_sample(model, inputs, 8)[0], expected, rtol=0, atol=0)


def test_two_threads_calling_one_enabled_pipeline_object_take_turns(caplog):
    """One pipeline object called from two threads at once (docs/requests.md: its scheduler
    holds the call's timesteps and step index, so diffusers alone gives one call an
    IndexError and the other a wrong image): with HyCa on, the second call waits for the
    first, says so once, and each equals its request run alone."""
    pipe = server()[0]
    first, second = REQUESTS[0], REQUESTS[1]
    alone = [request(pipe, *first), request(pipe, *second)]
    started, out = threading.Event(), {}

    def hold(p, step, timestep, kwargs):
        if step == 1:
            started.set()
            second_thread.join(timeout=0.5)  # time for the second call to get going, if nothing stops it
        return kwargs

    def run_first():
        g = torch.Generator().manual_seed(first[1])
        try:
            out["first"] = pipe(prompt_embeds=torch.randn(1, 5, 32, generator=g),
                                pooled_prompt_embeds=torch.randn(1, 24, generator=g), height=64, width=64,
                                num_inference_steps=first[0], output_type="latent", callback_on_step_end=hold,
                                generator=torch.Generator().manual_seed(first[2])).images
        except Exception as error:  # reported by the assertion below
            out["first"] = error

    def run_second():
        started.wait(timeout=30)
        try:
            out["second"] = request(pipe, *second)
        except Exception as error:  # reported by the assertion below
            out["second"] = error

    second_thread = threading.Thread(target=run_second)
    first_thread = threading.Thread(target=run_first)
    with caplog.at_level("WARNING", logger="hyca"):
        second_thread.start()
        first_thread.start()
        first_thread.join(timeout=120)
        second_thread.join(timeout=120)
    assert isinstance(out["first"], torch.Tensor) and isinstance(out["second"], torch.Tensor), out
    torch.testing.assert_close(out["first"], alone[0], rtol=0, atol=0)
    torch.testing.assert_close(out["second"], alone[1], rtol=0, atol=0)
    assert sum("sampling in another thread" in r.getMessage() for r in caplog.records) == 1


def test_a_deep_copy_of_an_enabled_pipeline_runs_uncached_and_says_so(caplog):
    """copy.deepcopy of an enabled pipeline: the copy's hooks still serve the original (a
    fresh helper saw 'only 0 of 6 block hooks ran' on every call, a message that explains
    nothing). The copy runs uncached, equal to the plain model, says why once; hyca.enable on
    the copy caches it like the original; the original is unaffected."""
    import copy

    pipe = server()[0]
    cached = request(pipe, *REQUESTS[0])
    twin = copy.deepcopy(pipe)
    assert hyca.is_enabled(pipe) and not hyca.is_enabled(twin)  # (a helper saw True on the copy)
    plain = CASES["flux"].build()
    plain.set_progress_bar_config(disable=True)
    with caplog.at_level("WARNING", logger="hyca"):
        first, second = request(twin, *REQUESTS[0]), request(twin, *REQUESTS[0])
    torch.testing.assert_close(first, request(plain, *REQUESTS[0]), rtol=0, atol=0)
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    said = [r.getMessage() for r in caplog.records if "copy (copy.deepcopy)" in r.getMessage()]
    assert len(said) == 1 and "hyca.enable on the copy" in said[0]
    assert not [r for r in caplog.records if "block hooks ran" in r.getMessage()]
    hyca.enable(twin, profile="taylor-2", interval=INTERVAL, warmup=WARMUP)
    assert hyca.is_enabled(twin)
    torch.testing.assert_close(request(twin, *REQUESTS[0]), cached, rtol=0, atol=0)
    torch.testing.assert_close(request(pipe, *REQUESTS[0]), cached, rtol=0, atol=0)


def enabled_and_full():
    """An enabled server pipeline that has run cached, its transformer, an unpatched twin and
    the twin's full-compute image of the first request."""
    pipe = server()[0]
    plain = CASES["flux"].build()
    plain.set_progress_bar_config(disable=True)
    full = request(plain, *REQUESTS[0])
    assert not torch.equal(request(pipe, *REQUESTS[0]), full)  # cached: the comparison can tell
    return pipe, pipe.transformer, plain, full


def test_a_transformer_set_to_none_after_enable_leaves_stats_disable_and_reset_working():
    """``pipe.transformer = None`` (to free memory) after hyca.enable: stats, is_enabled,
    reset and disable raised TypeError and the old transformer kept HyCa's hooks, so putting
    it back ran cached after "disable"."""
    pipe, old, plain, full = enabled_and_full()
    pipe.transformer = None
    (said,) = hyca.stats(pipe)
    assert said.total == 0 and "was replaced after hyca.enable" in said.describe()
    assert not hyca.is_enabled(pipe)
    hyca.reset(pipe)
    hyca.disable(pipe)
    assert hooks.root_hook(old) is None
    pipe.transformer = old
    torch.testing.assert_close(request(pipe, *REQUESTS[0]), full, rtol=0, atol=0)
    assert hyca.stats(pipe) == [] and not hyca.is_enabled(pipe)
    with pytest.raises(TypeError, match="neither a transformer nor a pipeline with one"):
        hyca.stats(object())
    never = CASES["flux"].build()  # a pipeline never enabled, its transformer set to None: False, not a crash
    never.transformer = None
    assert not hyca.is_enabled(never) and hyca.stats(never) == []
    hyca.reset(never)
    hyca.disable(never)
    with pytest.raises(TypeError, match=r"transformer is None"):
        hyca.enable(never, interval=INTERVAL)


def test_a_transformer_replaced_after_enable_is_said_and_disable_removes_hyca_from_both(caplog):
    """``pipe.transformer = other`` after hyca.enable: the new one runs uncached (said once);
    hyca.disable(pipe) also takes HyCa off the transformer it was enabled on (a helper put it
    back after disable and still got cached images)."""
    import copy

    pipe, old, plain, full = enabled_and_full()
    pipe.transformer = copy.deepcopy(plain.transformer)
    with caplog.at_level("WARNING", logger="hyca"):
        torch.testing.assert_close(request(pipe, *REQUESTS[0]), full, rtol=0, atol=0)
        request(pipe, *REQUESTS[0])
    said = [r.getMessage() for r in caplog.records if "was replaced after hyca.enable" in r.getMessage()]
    assert len(said) == 1
    (uncached,) = hyca.stats(pipe)  # the stats say it too (they were [] before)
    assert uncached.computed == uncached.forecast == 0
    assert "uncached" in uncached.describe() and "was replaced after hyca.enable" in uncached.describe()
    hyca.disable(pipe)
    assert hyca.stats(pipe) == []
    assert hooks.root_hook(old) is None and not hyca.is_enabled(old)
    pipe.transformer = old
    torch.testing.assert_close(request(pipe, *REQUESTS[0]), full, rtol=0, atol=0)

