"""The benchmark's wiring on a tiny random-weight reference pipeline: every method runs,
and what it reports is checked against independent expectations (hand-counted
schedules, FLOPs of a plain ``FlopCounterMode`` run, tensor sizes from the shapes)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from hyca.bench import methods as m
from hyca.bench.calibrate import search
from hyca.bench.flops import generation_flops
from hyca.bench.memory import PeakCacheBytes
from hyca.bench.metrics import psnr, ssim
from hyca.bench.runner import Settings, execute, run
from hyca.bench.workload import Case, cases, generate
from hyca.reference import tiny_components

STEPS, INTERVAL = 12, 3
# Schedule(interval=3, warmup=3, compute_last) over 12 steps, by hand: steps 0, 1, 2 (warm-up),
# then every third from step 2: 5, 8, 11 (11 is also the last step) -> 6 computed.
COMPUTED = 6
CASE = Case("a small red circle at the top left on a white background", 7)


@pytest.fixture(scope="module")
def pipe():
    return tiny_components(seed=0)


@pytest.fixture(scope="module")
def result(pipe):
    settings = Settings(model="tiny", prompts=2, steps=(STEPS,), intervals=(INTERVAL,), levels=(INTERVAL,),
                        sigma_interval=INTERVAL, overhead_interval=INTERVAL, flops_prompts=2, calibration_prompts=1, search_iterations=2)
    return run(settings, pipe=pipe)


def row(result, family):
    found = [r for r in result["rows"] if r["family"] == family]
    assert found, f"no row for {family}"
    return found[0]


def test_every_method_runs(result):
    families = {r["family"] for r in result["rows"]}
    expected = {m.FULL, m.HYCA, m.HYCA_SIGMA, m.STEPS, m.FORA, m.TAYLOR_1, m.TAYLOR_2, m.DIFFUSERS_TAYLOR,
                m.DIFFUSERS_FBCACHE, m.DIFFUSERS_MAGCACHE}
    if m.cache_dit_available() is None:
        expected |= {m.DBCACHE, m.DBCACHE_TAYLOR}
    assert expected <= families
    for r in result["rows"]:
        assert 0 < r["ssim"] <= 1, r
    info = result["runs"][str(STEPS)]
    assert {f"{m.HYCA} (step axis)", f"{m.HYCA} (sigma axis)"} <= set(info["axes_shifted"])
    assert info["overhead"]["computed"] == COMPUTED


def test_step_reduction_matches_hyca_schedule(result):
    fewer = row(result, m.STEPS)
    assert fewer["setting"] == f"{COMPUTED} steps"
    assert fewer["flops_speedup"] == pytest.approx(STEPS / COMPUTED, rel=1e-12)


def test_engine_methods_cost_computed_steps_plus_cheap_skips(pipe, result):
    """FORA/TaylorSeer/HyCa FLOPs: COMPUTED full calls + the rest as skip calls, a skip
    call being the transformer with its block lists emptied (measured on its own)."""
    t = pipe.transformer
    full_call, _ = generation_flops(t, lambda: generate(pipe, CASE, 1))
    saved = t.transformer_blocks, t.single_transformer_blocks
    t.transformer_blocks, t.single_transformer_blocks = torch.nn.ModuleList(), torch.nn.ModuleList()
    try:
        skip_call, _ = generation_flops(t, lambda: generate(pipe, CASE, 1))
    finally:
        t.transformer_blocks, t.single_transformer_blocks = saved
    expected = STEPS * full_call / (COMPUTED * full_call + (STEPS - COMPUTED) * skip_call)
    for family in (m.HYCA, m.FORA, m.TAYLOR_1, m.TAYLOR_2):
        assert row(result, family)["flops_speedup"] == pytest.approx(expected, rel=1e-9), family


def test_flops_counter_agrees_with_plain_flop_counter_mode(pipe):
    counted, image = generation_flops(pipe.transformer, lambda: generate(pipe, CASE, 4))
    with FlopCounterMode(display=False) as plain, torch.no_grad():
        one = generate(pipe, CASE, 1)
    encoder_only = FlopCounterMode(display=False)
    with encoder_only, torch.no_grad():
        pipe.encode_prompt([CASE.prompt])
    per_call = plain.get_total_flops() - encoder_only.get_total_flops()
    assert counted == 4 * per_call
    assert image.shape == one.shape


def test_fixed_schedules_cost_the_same_on_every_prompt(pipe):
    """Why the benchmark counts fixed-schedule methods on one prompt only."""
    first, second = cases(2)
    assert first.prompt != second.prompt
    for method in (m.taylor(2, INTERVAL), m.diffusers_taylorseer(INTERVAL), m.fewer_steps(COMPUTED)):
        flops = [execute(pipe, method, case, STEPS, counted=True).flops for case in (first, second)]
        assert flops[0] == flops[1], method.name


def test_cache_bytes_are_the_history_tensors(pipe):
    """taylor-2 keeps 3 aggregated residuals, FORA 1: (1, 64 image tokens, 32 dims) float32."""
    residual = 64 * 32 * 4
    for method, terms in ((m.fora(INTERVAL), 1), (m.taylor(2, INTERVAL), 3)):
        counted = execute(pipe, method, CASE, STEPS, counted=True)
        assert counted.cache_bytes == terms * residual, method.name
    assert execute(pipe, m.full(), CASE, STEPS, counted=True).cache_bytes == 0


def test_methods_leave_the_model_as_it_was(pipe, result):
    """After every method ran (cache-dit included) the plain model gives the same image."""
    before = generate(tiny_components(seed=0), CASE, STEPS)
    assert torch.equal(generate(pipe, CASE, STEPS), before)
    assert not getattr(pipe.transformer, "is_cache_enabled", False)


def test_metrics_of_identical_and_offset_images():
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert psnr(image, image) == math.inf
    assert ssim(image, image) == 1.0
    shifted = (image * 0.8 + 0.1)
    assert psnr(shifted + 0.1, shifted) == pytest.approx(20.0)  # MSE 0.01 -> 20 dB
    assert ssim(shifted + 0.1, shifted) < 1.0


def test_search_finds_a_threshold_for_the_target():
    def ratio_of(method: m.Method) -> float:  # a monotone stand-in for a threshold method's FLOPs ratio
        return 1 / (1 + 10 * method.knob)

    found = search(lambda t: m.Method("stand-in", "", knob=t), ratio_of, target=0.25, iterations=20)
    assert found.matched and found.reachable
    assert found.method.knob == pytest.approx(0.3, rel=0.1)
    unreachable = search(lambda t: m.Method("stand-in", "", knob=t), ratio_of, target=0.001)
    assert not unreachable.reachable and unreachable.evaluations == 1


def test_mag_cache_calibration_reads_diffusers_ratios(pipe):
    ratios = m.calibrate_mag_ratios(pipe, lambda: generate(pipe, CASE, 8), 8)
    assert len(ratios) == 8 and ratios[0] == 1.0 and all(r > 0 for r in ratios)
    assert not pipe.transformer.is_cache_enabled


def test_prompts_are_fixed_and_calibration_is_separate():
    assert cases(4) == cases(4) and len({c.prompt for c in cases(32)}) > 16
    assert not {c.seed for c in cases(32)} & {c.seed for c in cases(8, calibration=True)}


def test_report_writes_table_and_plot(result, tmp_path):
    from hyca.bench import report

    pytest.importorskip("matplotlib")
    paths = report.write(result, tmp_path, "peers-test", "python -m hyca.bench --model tiny")
    text = (tmp_path / "peers-test.md").read_text()
    assert "python -m hyca.bench --model tiny" in text and f"N={INTERVAL}" in text
    assert (tmp_path / "peers-test.png").stat().st_size > 1000
    grid = tmp_path / f"peers-test-samples-{STEPS}.png"
    assert grid in paths and f"peers-test-samples-{STEPS}.png" in text
    from PIL import Image

    with Image.open(grid) as image:  # full compute + one row per method at the level, 2 prompts
        rows = 1 + sum(r["level"] == INTERVAL and r["family"] != m.HYCA_SIGMA for r in result["rows"])
        assert image.height == rows * (32 * 3 + 2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this checks the refusal on a machine without CUDA")
def test_gpu_mode_refuses_without_cuda(capsys):
    from hyca.bench.__main__ import main

    with pytest.raises(SystemExit, match="CUDA"):
        main(["--gpu"])


def test_counting_hooks_detach(pipe):
    with PeakCacheBytes().attached(pipe.transformer):
        assert pipe.transformer._forward_hooks
    assert not pipe.transformer._forward_hooks and not pipe.transformer._forward_pre_hooks


def test_gpu_mode_methods_run_on_a_tiny_config():
    """The --gpu loop and methods, on CPU with a tiny FLUX config (the CUDA timing and
    memory around them cannot run here): every method samples, and switching each off
    gives the plain model back."""
    from hyca.bench import gpu
    from tests.tiny import TINY_FLUX, tiny_flux

    model = tiny_flux()
    loop = gpu.Loop(model, device="cpu", config=TINY_FLUX, side=4, text_tokens=5)
    plain = loop(8)
    names = []
    for name, enable, disable in gpu.methods(loop, 8):
        enable()
        try:
            out = loop(8)
        finally:
            disable()
        assert out.shape == plain.shape and torch.isfinite(out).all(), name
        names.append(name)
    assert torch.equal(loop(8), plain)
    assert names[0] == "full compute" and any(n.startswith("HyCa") for n in names)


def test_a_missing_matplotlib_is_said_before_the_run(monkeypatch):
    """Without the ``bench`` extra the benchmark stops at once with what to install, not after
    minutes of measuring (``--no-plot`` runs without it)."""
    import sys

    from hyca.bench import __main__ as bench_main
    from hyca.bench import runner

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    monkeypatch.setattr(runner, "run", lambda *a, **k: pytest.fail("the run started"))
    with pytest.raises(SystemExit, match="pip install .*--no-plot"):
        bench_main.main(["--quick", "--prompts", "1"])


@pytest.mark.parametrize("hyca_psnr, peer_psnr, marker", [(39.8599, 39.8601, "**=** "), (39.87, 39.86, "**+** "),
                                                          (39.85, 39.86, "**−** ")])
def test_the_marker_compares_what_the_table_shows(hyca_psnr, peer_psnr, marker):
    """Two PSNRs the table prints alike (39.86) are marked equal, not '−'."""
    from hyca.bench.report import _marker

    assert _marker(hyca_psnr, peer_psnr) == marker
