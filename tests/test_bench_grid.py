"""The settings grid's wiring (``python -m hyca.bench --grid --quick``) on a tiny random-weight
reference pipeline: every method runs, FLOPs and fidelity are what independent
computations give, and the report's margins follow from the rows."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

import hyca
from hyca.bench import grid, grid_report
from hyca.bench.__main__ import main
from hyca.math.solvers import pool_names
from hyca.reference import tiny_components

SETTINGS = replace(grid.QUICK, model="tiny", prompts=4, calibration_prompts=2, search_iterations=2)


@pytest.fixture(scope="module")
def cell(tmp_path_factory):
    out = tmp_path_factory.mktemp("grid") / "grid.jsonl"
    (result,) = grid.run(SETTINGS, out, pipe=tiny_components(seed=0), log=lambda _: None)
    assert grid.read(out) == [json.loads(json.dumps(result))]  # what was appended is what the report reads
    return result


def test_every_method_runs_in_the_cell(cell):
    names = {r["method"] for r in cell["rows"]}
    assert {grid.HYCA, grid.HYCA_TOLD, grid.HYCA_NO_GUARD, grid.HYCA_EQ5, grid.STEPS, grid.MAGCACHE, *grid.PEERS} <= names
    assert {grid.SINGLE + n for n in pool_names()} <= names
    # 20 steps, W=3, N=4 compute steps 0, 1, 2, 6, 10, 14, 18, 19 (8); a first interval of 2
    # computes 0, 1, 2, 4, 8, 12, 16, 19, no more, so the short-start rows run too
    assert SETTINGS.warmup == 3 and {grid.SINGLE_SHORT + n for n in pool_names()} <= names
    assert {grid.SINGLE_OUTPUT + n for n in pool_names()} <= names  # the FLUX-layout model has an output head
    assert cell["info"]["closed_loop_choice"] and cell["info"]["closed_loop_trials"]


def test_fixed_schedules_save_what_their_plan_skips(cell):
    """Fewer steps runs exactly the computed-step count of HyCa's schedule: its FLOPs
    speed-up is steps / computed, counted independently of the schedule code."""
    rows = {r["method"]: r for r in cell["rows"]}
    computed = len([0, 1, 2, 6, 10, 14, 18, 19])  # 20 steps, W=3, N=4, last step computed
    assert rows[grid.STEPS]["flops_speedup"] == pytest.approx(20 / computed, rel=1e-9)
    # every single solver on the paper's schedule costs the same
    assert len({rows[grid.SINGLE + n]["flops_speedup"] for n in pool_names()}) == 1
    # the plain call probes on its first call, before the counted held-out batch: its FLOPs are
    # a cached run's, not the probe's (counted with the probe, the row read 0.15x)
    assert rows[grid.HYCA]["flops_speedup"] > 1.5


def test_a_row_is_psnr_against_full_compute_of_the_same_captions(cell):
    """The reuse row, redone with the plain pipeline: the cell's captions and noise (its
    inputs) at 20 steps, guidance 2.5, shift 3, PSNR = 10 log10(1 / MSE) capped at 100 dB."""
    pipe = tiny_components(seed=0)
    work = grid.Workload(pipe, SETTINGS)
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, shift=3.0)

    def images():
        return pipe(work.prompts, num_inference_steps=20, guidance_scale=2.5, latents=work.latents.clone(),
                    output_type="pt").images.double()

    full = images()
    hyca.enable(pipe, profile="reuse", interval=4, warmup=3, guard=False)
    try:
        fora = images()
    finally:
        hyca.disable(pipe)
    mse = ((fora - full) ** 2).mean(dim=(1, 2, 3))
    expected = [min(10 * math.log10(1 / e), 100.0) if e > 0 else 100.0 for e in mse.tolist()]
    rows = {r["method"]: r for r in cell["rows"]}
    assert rows[grid.SINGLE + "reuse"]["psnr_per_prompt"] == pytest.approx(expected, abs=1e-3)


def test_margins_and_report_follow_from_the_rows(cell, tmp_path):
    rows = {r["method"]: r for r in cell["rows"]}
    # every single solver: on the paper's schedule, with a short start, on the output head
    singles = [rows[prefix + n]["psnr"] for n in pool_names()
               for prefix in ("single: ", "single, short start: ", "single, output head: ")]
    margin = rows[grid.HYCA]["psnr"] - max(singles)
    assert grid.margins(cell)["single"] == pytest.approx(margin)
    assert grid_report.split_half(cell) <= 1e-9  # a pick on other captions never beats the best on these
    paths = grid_report.write([cell], tmp_path, "grid", "python -m hyca.bench --grid --quick --model tiny")
    text = paths[0].read_text()
    assert f"{margin:+.2f}" in text and "Done-means checks" in text
    assert paths[1].suffix == ".png" and paths[1].stat().st_size > 0


def test_the_command_line_runs_and_resumes(tmp_path, capsys):
    argv = ["--grid", "--quick", "--model", "tiny", "--prompts", "2", "--out", str(tmp_path)]
    assert main(argv) == 0
    assert main([*argv, "--resume"]) == 0  # the cell is there: nothing runs again
    out = capsys.readouterr().out
    assert out.count("cell steps=20") == 1 and (tmp_path / "grid-quick-tiny.md").is_file()
    assert np.isfinite(grid.read(tmp_path / "grid-quick-tiny.jsonl")[0]["rows"][0]["psnr"])
    torch.manual_seed(0)


def test_remeasure_replaces_only_the_named_rows(cell, tmp_path):
    """Measured again with the same code, a row comes back the same (the grid is
    deterministic); the other rows are left as they were, and the cell says what changed."""
    out = tmp_path / "grid.jsonl"
    out.write_text(json.dumps(cell) + "\n")
    name = grid.SINGLE + "taylor-1"
    (again,) = grid.remeasure(SETTINGS, out, [name], pipe=tiny_components(seed=0), log=lambda _: None)
    before, after = ({r["method"]: r for r in c["rows"]} for c in (cell, again))
    assert after[name]["psnr_per_prompt"] == pytest.approx(before[name]["psnr_per_prompt"], abs=1e-3)
    assert {k: v for k, v in after.items() if k != name} == {k: v for k, v in before.items() if k != name}
    assert again["remeasured"] == [name] and grid.read(out) == [again]
    assert "Measured again in 1 cell with" in grid_report.markdown([again], "python -m hyca.bench --grid")
    with pytest.raises(ValueError, match="cannot measure"):
        grid.remeasure(SETTINGS, out, [grid.HYCA_TOLD], pipe=tiny_components(seed=0), log=lambda _: None)


def test_the_plain_call_is_measured_again_as_it_was_and_names_its_choice(cell, tmp_path):
    """The default row probes on first use; measured again it probes again (a cache of its
    own) and lands on the same images, now with what its probe chose."""
    out = tmp_path / "grid.jsonl"
    out.write_text(json.dumps(cell) + "\n")
    (again,) = grid.remeasure(SETTINGS, out, [grid.HYCA], pipe=tiny_components(seed=0), log=lambda _: None)
    before, after = ({r["method"]: r for r in c["rows"]}[grid.HYCA] for c in (cell, again))
    assert after["psnr_per_prompt"] == pytest.approx(before["psnr_per_prompt"], abs=1e-3)
    trials = after["info"]["closed_loop_trials"]
    assert after["info"]["closed_loop_choice"] in {t["name"] for t in trials} and len(trials) > 10


def test_report_only_without_results_says_what_is_there(tmp_path, capsys):
    (tmp_path / "grid-quick-tiny.jsonl").write_text("")
    assert main(["--grid", "--report-only", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"no grid results named grid in {tmp_path}" in err and "grid-quick-tiny.jsonl" in err


def test_the_calibration_pick_is_a_single_solver_with_a_grid_row():
    """Candidates without a grid row (the model output, the head with a short start, a
    guard-off candidate) are passed over, however well they scored on calibration."""
    trials = [{"name": "model,lite:uniform:taylor-1,no-guard", "fidelity_db": 40.0},
              {"name": "output,start2:uniform:reuse", "fidelity_db": 39.0},
              {"name": "model:uniform:reuse", "fidelity_db": 38.0},
              {"name": "start2:uniform:am2", "fidelity_db": 31.0},
              {"name": "output:uniform:ab3", "fidelity_db": 30.0},
              {"name": "uniform:reuse", "fidelity_db": 20.0}]
    rows = [{"method": grid.SINGLE_SHORT + "am2", "psnr": 33.0}, {"method": grid.SINGLE_OUTPUT + "ab3", "psnr": 35.0},
            {"method": grid.SINGLE + "reuse", "psnr": 30.0}]
    cell = {"info": {"closed_loop_trials": trials}, "rows": rows}
    assert grid_report.picked_on_calibration(cell) == ("short: am2", pytest.approx(-2.0))
