"""How well a closed-loop choice made on a few calibration samples carries over to others
(issue 21 items 3 and 6), read from the settings grid's recorded probe trials.

    python -m hyca.bench.selection_transfer bench/results/grid-plain.json [--k 2 4] [--out FILE]

Each grid cell's told probe scored every candidate on the same 8 calibration captions
(``closed_loop_trials``, per-sample fidelity in dB, no halving). For every subset of ``k``
of them, each rule below picks a candidate from its scores on the subset
(:func:`hyca.probing.selection.pick`, the probe's own code), and the pick is scored on the
other ``8 - k`` captions: the held-out fidelity a probe with ``k`` samples would have got,
over every way of drawing them. The plain call's probe has two samples; the told one eight.

Rules: ``best`` (the probe's default), ``se`` and fixed dB margins (the simplest candidate
level with the best), and the best over a restricted candidate set (the first track only:
the blocks' residuals on the plain schedule; single solvers only, any track; each track's
eq. 5 and the short-history singles :data:`hyca.probing.SINGLES`, the probe's default
candidates since they were measured here: the recorded trials approximate it, their other
tracks having tried the best three singles of the whole pool); the same without the output
head's tracks (``output...``: the default where the host offers the model output, of which
the head is a linear map), and without the short starts too.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..probing import SINGLES, selection

Rule = Callable[[list[selection.Scored]], selection.Scored]


def _track(name: str) -> int:
    """0 for the first track (``eq5``, ``uniform:...`` and their refinements), 1 otherwise."""
    return 0 if name.startswith(("eq5", "uniform:")) else 1


def _single(name: str) -> str | None:
    """The solver a ``...uniform:<solver>[,no-guard]`` candidate runs alone, else None."""
    return name.split("uniform:", 1)[1].removesuffix(",no-guard") if "uniform:" in name else None


def _default(scored: selection.Scored) -> bool:
    """Among the probe's default candidates: each track's eq. 5 and the singles of :data:`SINGLES`."""
    return scored.name.endswith("eq5") or _single(scored.name) in SINGLES


def _restricted(keep: Callable[[selection.Scored], bool]) -> Rule:
    return lambda scored: selection.pick([s for s in scored if keep(s)] or scored, selection.BEST)


RULES: dict[str, Rule] = {
    "best": lambda scored: selection.pick(scored, selection.BEST),
    "se": lambda scored: selection.pick(scored, selection.STANDARD_ERROR),
    **{f"within {m:g} dB": (lambda m: lambda scored: selection.pick(scored, m))(m) for m in (0.5, 1.0, 2.0)},
    "first track only": _restricted(lambda s: s.track == 0),
    "single solvers only": _restricted(lambda s: "uniform:" in s.name),
    "no refinements": _restricted(lambda s: "->" not in s.name),
    "eq. 5 and SINGLES": _restricted(_default),
    "eq. 5 and SINGLES, no output head": _restricted(lambda s: _default(s) and not s.name.startswith("output")),
    "eq. 5 and SINGLES, no output head, no short starts": _restricted(
        lambda s: _default(s) and not s.name.startswith(("output", "start", "model,start"))),
}


def cell_trials(cell: dict) -> tuple[list[str], torch.Tensor] | None:
    """Candidate names and their per-sample fidelities ``(candidates, samples)`` (dB), or
    None when the cell's trials carry no per-sample scores. Non-finite scores count at
    -100 dB (a run that blew up)."""
    trials = [t for t in cell["info"].get("closed_loop_trials", []) if t.get("per_sample_db")]
    if not trials:
        return None
    width = max(len(t["per_sample_db"]) for t in trials)
    trials = [t for t in trials if len(t["per_sample_db"]) == width]
    scores = torch.tensor([[-100.0 if v is None else v for v in t["per_sample_db"]] for t in trials],
                          dtype=torch.float64)
    return [t["name"] for t in trials], scores


def halving_pick(names: Sequence[str], scores: torch.Tensor, subset: tuple[int, ...], screened: int) -> str:
    """Successive halving as the probe runs it (:class:`hyca.probing.selection.Screen`): every
    candidate scored on the first ``screened`` samples of ``subset``, the finalists on all of
    it, the best mean kept."""
    first = [selection.Scored(n, _track(n), scores[i, list(subset[:screened])], subset[:screened])
             for i, n in enumerate(names)]
    screen = selection.Screen(tuple(range(screened)), len(subset))
    index = {n: i for i, n in enumerate(names)}
    finalists = [selection.Scored(s.name, s.track, scores[index[s.name], list(subset)], ())
                 for s in screen.finalists_of(first)]
    return selection.pick(finalists, selection.BEST).name


def transfer(names: Sequence[str], scores: torch.Tensor, k: int, rules: dict[str, Rule]) -> dict[str, list[float]]:
    """Per rule, the held-out mean fidelity (dB) of its pick for every ``k``-subset (and of
    successive halving screening on every smaller number of samples)."""
    samples = scores.shape[1]
    halvings = {f"halving, {s} of {k} screening": s for s in range(1, k)}
    out: dict[str, list[float]] = {name: [] for name in [*rules, *halvings, "oracle (held-out best)"]}
    for subset in itertools.combinations(range(samples), k):
        rest = [i for i in range(samples) if i not in subset]
        scored = [selection.Scored(n, _track(n), scores[i, list(subset)], subset) for i, n in enumerate(names)]
        held_out = {n: selection.mean_db(scores[i, rest]) for i, n in enumerate(names)}
        for rule_name, rule in rules.items():
            out[rule_name].append(held_out[rule(scored).name])
        for rule_name, screened in halvings.items():
            out[rule_name].append(held_out[halving_pick(names, scores, subset, screened)])
        out["oracle (held-out best)"].append(max(held_out.values()))
    return out


def report(cells: list[dict], ks: Sequence[int]) -> str:
    lines = []
    for k in ks:
        per_rule: dict[str, list[float]] = {}
        runs: dict[str, list[int]] = {"all": [], "single": [], "refined": []}
        for cell in cells:
            found = cell_trials(cell)
            if found is None:
                continue
            names, scores = found
            runs["all"].append(len(names))
            runs["single"].append(sum("uniform:" in n for n in names))
            runs["refined"].append(sum("->" in n for n in names))
            if k >= scores.shape[1]:
                continue
            results = transfer(names, scores, k, RULES)
            base = statistics.fmean(transfer(names, scores, ks[0], {"best": RULES["best"]})["best"])
            for rule_name, values in results.items():
                per_rule.setdefault(rule_name, []).append(statistics.fmean(values) - base)
        if not per_rule:
            continue
        count = len(per_rule["best"])
        lines += [f"### {k} calibration samples ({count} cells, every {k}-subset of each cell's 8)", "",
                  f"Held-out fidelity of the pick minus that of the default rule (`best`) on {ks[0]} "
                  "samples, dB: mean over cells, and the worst and best cell.", "",
                  f"Candidates per cell (mean): {statistics.fmean(runs['all']):.1f}; single solvers "
                  f"{statistics.fmean(runs['single']):.1f}; refinements {statistics.fmean(runs['refined']):.1f}.", "",
                  "| rule | mean | worst cell | best cell |", "|---|---|---|---|"]
        for rule_name, margins in per_rule.items():
            lines.append(f"| {rule_name} | {statistics.fmean(margins):+.2f} | {min(margins):+.2f} | "
                         f"{max(margins):+.2f} |")
        lines.append("")
    return "\n".join(lines)


def _cells(path: Path) -> list[dict]:
    """A grid's cells from its report JSON (``{"cells": [...]}``) or its JSON-lines results."""
    if path.suffix == ".json":
        return json.loads(path.read_text())["cells"]
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path, help="grid results: a report's .json or the .jsonl cells")
    parser.add_argument("--k", nargs="+", type=int, default=[2, 4], help="calibration samples a probe has")
    parser.add_argument("--out", type=Path, help="write the markdown here too")
    args = parser.parse_args()
    cells = [cell for path in args.results for cell in _cells(path)]
    text = report(cells, args.k)
    print(text)
    if args.out is not None:
        args.out.write_text(f"# Choosing on few calibration samples\n\nCommand: `python -m hyca.bench.selection_transfer "
                            f"{' '.join(str(p) for p in args.results)} --k {' '.join(map(str, args.k))}`\n\n{text}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
