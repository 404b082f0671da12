"""What a profile looks like: a picture of the clusters and a table of the solvers.

The picture has one band of rows per block (top: first block) and one column per hidden
dimension, in the model's own dimension order; each pixel is coloured by the cluster
of that dimension in that block (or by the solver its cluster uses). Cluster numbers
are per block, so the same colour in two blocks means "cluster k of each", not the
same dimensions; the solver view is comparable across blocks.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..math.solvers import pool_names
from ..profiles.profile import Profile

# Tableau-like colours, distinct for up to ten clusters or solvers.
PALETTE = np.array([
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
], dtype=np.uint8)
TARGET_HEIGHT = 240
TARGET_WIDTH = 768  # narrow profiles (the reference model has 128 dims) get wider columns


def colour(index: int) -> tuple[int, int, int]:
    return tuple(int(v) for v in PALETTE[index % len(PALETTE)])


def cluster_image(profile: Profile, by: str = "cluster", row_height: int | None = None,
                  column_width: int | None = None) -> np.ndarray:
    """(blocks * row_height, dim * column_width, 3) uint8: every dimension of every block
    coloured by its cluster (``by="cluster"``) or by its solver's pool index (``by="solver"``)."""
    if by == "cluster":
        values = profile.labels.numpy()
    elif by == "solver":
        values = profile.dim_solvers().numpy()
    else:
        raise ValueError(f"by must be 'cluster' or 'solver', got {by!r}")
    rows = row_height or max(1, TARGET_HEIGHT // max(profile.num_blocks, 1))
    columns = column_width or max(1, TARGET_WIDTH // max(profile.dim, 1))
    picture = PALETTE[values % len(PALETTE)]  # (blocks, dim, 3)
    return np.repeat(np.repeat(picture, rows, axis=0), columns, axis=1)


def legend(profile: Profile, by: str = "cluster") -> str:
    """Markdown naming each colour of :func:`cluster_image`."""
    if by == "cluster":
        items = [(k, f"cluster {k}") for k in range(profile.num_clusters)]
    else:
        names = pool_names()
        items = [(i, names[i]) for i in sorted(set(profile.solvers.flatten().tolist()))]
    swatches = [f"<span style='color:rgb{colour(i)}'>■</span> {name}" for i, name in items]
    return "Colours: " + " · ".join(swatches) + f" — {profile.num_blocks} blocks (rows) × {profile.dim} dims (columns)"


def _replay_error(entry: dict, candidates: list[str], solver: str) -> float | None:
    """The relative replay error the probe recorded for ``solver`` on one cluster (every
    candidate's is in the report; the closed loop may keep another than eq. 5's)."""
    errors = entry.get("errors")
    if errors and solver in candidates and candidates.index(solver) < len(errors):
        return errors[candidates.index(solver)]
    return entry.get("error") if entry.get("solver") == solver else None


def solver_rows(profile: Profile) -> list[list[Any]]:
    """``[block, cluster, dims, solver, replay error]`` per cluster; the error (relative, from
    the probe's replay of the schedule) of the solver the profile uses there, when the
    profile's metadata records it."""
    names = pool_names()
    selection = profile.metadata.get("selection") or {}
    report, candidates = selection.get("blocks"), list(selection.get("candidates") or [])
    rows = []
    for b in range(profile.num_blocks):
        sizes = np.bincount(profile.labels[b].numpy(), minlength=profile.num_clusters)
        for c in range(profile.num_clusters):
            solver = names[int(profile.solvers[b, c])]
            error = None
            if report and b < len(report) and c < len(report[b]):
                error = _replay_error(report[b][c], candidates, solver)
            rows.append([b, c, int(sizes[c]), solver, "" if error is None else f"{error:.4g}"])
    return rows


def _profile_replay_error(profile: Profile, selection: dict) -> float | None:
    """The whole profile's relative replay error, when the probe recorded it for what was kept:
    eq. 5's own assignment, or one solver everywhere."""
    replay = selection.get("replay_error") or {}
    report = selection.get("blocks")
    eq5 = report and [[entry.get("solver") for entry in block] for block in report]
    names = pool_names()
    kept = [[names[int(i)] for i in block] for block in profile.solvers.tolist()]
    if eq5 == kept:
        return replay.get("profile")
    if len(profile.solver_names()) == 1:
        return (replay.get("uniform") or {}).get(profile.solver_names()[0])
    return None


def summary(profile: Profile) -> str:
    """One paragraph: shape, solvers in use, the schedule it was chosen for, replay errors."""
    meta = profile.metadata
    used = ", ".join(profile.solver_names())
    if meta.get("target") == "output":
        lines = [f"**Forecasts the output head's input: {profile.dim} dims, {profile.num_clusters} clusters**; "
                 f"solvers in use: {used}."]
    elif meta.get("target") == "model_output":
        lines = [f"**Forecasts the model output: {profile.dim} channels, {profile.num_clusters} clusters**; "
                 f"solvers in use: {used}."]
    else:
        lines = [f"**{profile.num_blocks} blocks × {profile.dim} dims, {profile.num_clusters} clusters per block**; "
                 f"solvers in use: {used}."]
    if meta.get("interval") is not None:
        start = f", first computed step {meta['first_interval']} after warm-up" if meta.get("first_interval") else ""
        lines.append(f"Chosen for N={meta['interval']}, warm-up {meta.get('warmup')}{start}.")
    closed = (meta.get("selection") or {}).get("closed_loop") or {}
    if closed.get("chosen"):
        lines.append(f"Closed-loop choice: {closed['chosen']} (of {len(closed.get('trials', []))} cached runs).")
    replay = (meta.get("selection") or {}).get("replay_error")
    if replay and replay.get("profile") is not None:
        uniform = ", ".join(f"{k} {v:.3g}" for k, v in replay.get("uniform", {}).items() if v is not None)
        kept = _profile_replay_error(profile, meta.get("selection") or {})
        where = " (replayed on the plain schedule)" if meta.get("first_interval") or meta.get("skip_last") else ""
        said = f"{kept:.3g}" if kept is not None else "not recorded for the closed loop's choice"
        lines.append(f"Relative replay error of the profile{where}: {said}; eq. 5's choice {replay['profile']:.3g} "
                     f"(one solver everywhere: {uniform}).")
    timing = {k: v for k, v in (meta.get("timing") or {}).items() if isinstance(v, (int, float))}
    if timing:  # every part the probe timed (hyca.probing.probe: recordings, analysis, the closed loop)
        closed = timing.get("closed_loop_s", 0.0)
        lines.append(f"Probe took {sum(timing.values()):.1f} s"
                     + (f" (closed-loop runs {closed:.1f} s)." if closed else "."))
    return " ".join(lines)
