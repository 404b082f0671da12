"""hyca.bench.selection_transfer: a pick made on k calibration samples, scored on the others,
checked on a hand-made cell."""

from __future__ import annotations

import itertools

import pytest

from hyca.bench.selection_transfer import RULES, cell_trials, transfer


def cell(trials: dict[str, list[float]]) -> dict:
    return {"info": {"closed_loop_trials": [{"name": n, "per_sample_db": v} for n, v in trials.items()]}}


def test_each_subset_picks_on_itself_and_scores_on_the_rest():
    # 'uniform:reuse' is better on samples 0 and 1, 'output:eq5' on 2 and 3
    names, scores = cell_trials(cell({"uniform:reuse": [30.0, 30.0, 10.0, 10.0],
                                      "output:eq5": [20.0, 20.0, 20.0, 20.0]}))
    results = transfer(names, scores, 2, {"best": RULES["best"], "first track only": RULES["first track only"]})
    expected_best = []
    for subset in itertools.combinations(range(4), 2):
        rest = [i for i in range(4) if i not in subset]
        reuse_here = sum(scores[0, list(subset)]) / 2
        pick = 0 if reuse_here >= 20.0 else 1  # ties keep the earlier candidate
        expected_best.append(float(scores[pick, rest].mean()))
    assert results["best"] == pytest.approx(expected_best)
    # restricted to the first track, reuse is always the pick
    assert results["first track only"] == pytest.approx(
        [float(scores[0, [i for i in range(4) if i not in s]].mean()) for s in itertools.combinations(range(4), 2)])
    assert results["oracle (held-out best)"] == pytest.approx(
        [max(float(scores[0, r].mean()), 20.0) for r in ([i for i in range(4) if i not in s]
                                                         for s in itertools.combinations(range(4), 2))])


def test_a_cell_without_per_sample_scores_is_left_out():
    assert cell_trials({"info": {"closed_loop_trials": [{"name": "eq5", "fidelity_db": 3.0}]}}) is None
