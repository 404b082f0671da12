"""The probe's analysis: indicators and replay errors -> a profile and a report.

Pure computation on what :class:`~hyca.probing.recorder.SketchRecorder` collected
(torch, numpy, scikit-learn): no host is imported, so any adapter (diffusers, the WebUI
frontends) records a run its own way and hands the result here.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..math.clustering import cluster
from ..math.selection import Replay, Selection, overall_error, select
from ..math.solvers import Solver, get_solver, pool, pool_names
from ..profiles.profile import Profile


def candidate_solvers(names: Sequence[str] | None) -> tuple[Solver, ...]:
    """The solvers to choose from: the whole pool, or the named ones in pool order.
    Fewer candidates can mean fewer distinct solvers in a profile, hence fewer cached
    histories at run time (one per solver in use)."""
    if names is None:
        return pool()
    if isinstance(names, str):
        raise ValueError(f"candidates must be a list of solver names, e.g. [{names!r}], not a string")
    wanted = {get_solver(n).name for n in names}
    if not wanted:
        raise ValueError("candidates must name at least one solver (or be None for the whole pool)")
    return tuple(s for s in pool() if s.name in wanted)


def _rounded(value: float) -> float | None:
    """Four significant digits keep the metadata small; None stands for "no value" (JSON has no NaN)."""
    return None if value != value else float(f"{value:.4g}")


def selection_report(selection: Selection, replay: Replay, dim_choice: torch.Tensor) -> dict[str, Any]:
    """JSON-able errors for display: per block and cluster, the chosen solver, its size
    and every candidate's relative replay error; and the whole profile's error next to
    each candidate used alone."""
    names = [s.name for s in replay.solvers]
    blocks = []
    for b in range(selection.chosen.shape[0]):
        blocks.append([
            {"solver": names[int(selection.chosen[b, c])], "dims": int(selection.sizes[b, c]),
             "error": _rounded(float(selection.relative_errors[b, c, selection.chosen[b, c]])),
             "errors": [_rounded(float(e)) for e in selection.relative_errors[b, c]]}
            for c in range(selection.chosen.shape[1])
        ])
    uniform = {name: _rounded(overall_error(replay, torch.full_like(dim_choice, s)))
               for s, name in enumerate(names)}
    return {
        "candidates": names,
        "targets": replay.targets,
        "blocks": blocks,
        "replay_error": {"profile": _rounded(overall_error(replay, dim_choice)), "uniform": uniform},
    }


def assign(labels: torch.Tensor, replay: Replay, clusters: int, shared: bool = False) -> Profile:
    """Eq. 5 on another replay (another schedule) for an existing clustering ``labels``."""
    selection = select(replay, labels, clusters, shared=shared)
    to_pool = torch.tensor([pool_names().index(s.name) for s in replay.solvers])
    return Profile(labels=labels, solvers=to_pool[selection.chosen])


def analyse(indicator_values: torch.Tensor, replay: Replay, clusters: int = 4, shared: bool = False,
            seed: int = 0, n_init: int = 1) -> tuple[Profile, dict[str, Any]]:
    """Indicators and replay errors -> (profile without metadata, selection report)."""
    labels = cluster(indicator_values, clusters, seed=seed, shared=shared, n_init=n_init)
    selection = select(replay, labels, clusters, shared=shared)
    to_pool = torch.tensor([pool_names().index(s.name) for s in replay.solvers])
    profile = Profile(labels=labels, solvers=to_pool[selection.chosen])
    dim_choice = torch.gather(selection.chosen, 1, labels)  # candidate index of every dimension
    return profile, selection_report(selection, replay, dim_choice)
