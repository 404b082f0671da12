"""Closed-loop choosing: keep the assignment whose *cached run* lands nearest full compute.

Eq. 5 scores each solver by its forecast error on a fully computed trajectory (open
loop). At run time forecasts feed back: a forecast error moves the sample, the next
computed step sees another input, and guidance amplifies the error of ``cond - uncond``.
On guided runs an eq. 5 profile chosen at the run's own settings can land far below plain
reuse (measured in bench/results/grid.md and docs/bench.md). So the probe runs the cached schedule itself, on its own prompt and seed, for each candidate
assignment, measures how far the final output lands from the fully computed one it
recorded, and keeps the best:

* the eq. 5 assignment (the paper's choice, per block and cluster);
* every solver of the pool alone (FORA, TaylorSeer 1-3, ...): so the choice is never
  worse, on the probe's own run, than the best single solver;
* refinements of the mixed assignment: each solver group in turn (largest first) handed
  to the best single solver, kept when the run gets closer (:func:`handed_over`);
* the same on other *tracks* the adapter offers (:class:`Track`): the schedule with a
  short first interval after warm-up (eq. 5 replayed on it; which start is better depends
  on the sigma schedule, :class:`~hyca.engine.schedule.Schedule`), and the output head's
  input as the forecast target instead of the blocks' residuals (eq. 5 on a recording of
  it), and the model output itself (the target of diffusers' TaylorSeer lite and of
  whole-output reuse; :mod:`hyca.engine.targets`), each with the best single solvers of the
  first round and the solvers the track names (``always``).

Each trial is one cached generation at probe resolution, about ``1/N`` of a full one.
This module only decides; the adapter that can run the pipeline supplies ``generate``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Sequence

import torch

from ..math.solvers import Solver, pool, pool_names
from ..profiles.profile import Profile
from . import selection


@dataclass(frozen=True)
class Candidate:
    """A named assignment to try: ``eq5``, ``uniform:<solver>``, ``refined:<...>``."""

    name: str
    profile: Profile


@dataclass(frozen=True)
class Trial:
    """What one cached run gave: its fidelity to full compute in dB (higher is nearer), the
    mean over the calibration ``samples`` it ran (empty: all), and per sample."""

    name: str
    fidelity_db: float
    per_sample_db: tuple[float, ...] = ()
    samples: tuple[int, ...] = ()
    #: the earlier candidate whose run this one's is (the same run: not run again)
    same_as: str | None = None

    def to_json(self) -> dict[str, Any]:
        def rounded(db: float) -> float | None:
            return round(db, 3) if math.isfinite(db) else None

        out: dict[str, Any] = {"name": self.name, "fidelity_db": rounded(self.fidelity_db)}
        if len(self.per_sample_db) > 1:
            out["per_sample_db"] = [rounded(db) for db in self.per_sample_db]
        if self.samples:
            out["samples"] = list(self.samples)
        if self.same_as is not None:
            out["same_as"] = self.same_as
        return out


def fidelity_db(output: torch.Tensor, reference: torch.Tensor) -> float:
    """How near a cached run's final output (latents or images, batch first) lands to the
    fully computed one: per sample ``10 log10(||reference||^2 / ||output - reference||^2)``
    in dB, averaged over the batch, as benchmarks average PSNR over images (one sample's
    large error must not hide the rest). ``inf`` when they are equal. Raises
    ``ValueError`` on a shape mismatch. Per sample: :func:`hyca.probing.selection.fidelities_db`."""
    return selection.mean_db(selection.fidelities_db(output, reference))


def with_solvers(base: Profile, cluster_solvers: torch.Tensor) -> Profile:
    """``base``'s clustering (and metadata, e.g. its schedule start) with other per-cluster
    solvers ``(blocks, clusters)`` (pool indices)."""
    return Profile(labels=base.labels.clone(), solvers=cluster_solvers.clone(), metadata=dict(base.metadata))


def uniform_candidates(base: Profile, solvers: Iterable[Solver] | None = None) -> list[Candidate]:
    """One candidate per solver: every cluster of ``base`` forecast by it (the clustering is
    kept, so the profile still shows it; the engine sees one solver)."""
    out = []
    for solver in (solvers if solvers is not None else pool()):
        index = pool_names().index(solver.name)
        out.append(Candidate(f"uniform:{solver.name}", with_solvers(base, torch.full_like(base.solvers, index))))
    return out


def groups_by_size(profile: Profile) -> list[int]:
    """Pool indices of the solvers ``profile`` uses, the one forecasting most dimensions first."""
    used, counts = torch.unique(profile.dim_solvers(), return_counts=True)
    return [int(s) for _, s in sorted(zip(counts.tolist(), used.tolist()), key=lambda pair: (-pair[0], pair[1]))]


def handed_over(profile: Profile, solver: int, to: int) -> Profile:
    """``profile`` with the clusters of ``solver`` forecast by ``to`` instead."""
    return with_solvers(profile, torch.where(profile.solvers == solver, torch.full_like(profile.solvers, to),
                                             profile.solvers))


def _is_uniform(profile: Profile) -> bool:
    return len(torch.unique(profile.solvers)) == 1


@dataclass(frozen=True)
class Track:
    """One family of candidates: eq. 5's assignment for one schedule start or forecast
    target (``eq5`` carries them in its metadata: ``first_interval``, ``target``), the
    single solvers on the same, and refinements. ``singles``: None for every solver of the
    pool, ``k`` for the ``k`` best single solvers of the first track. ``always``: pool
    names tried on this track besides those (a peer's strategy it must not lose to);
    ``unguarded``: pool names also tried with the guard off (metadata ``guard: false``), as a
    peer that has no guard runs them."""

    prefix: str
    eq5: Profile
    singles: int | None = None
    always: tuple[str, ...] = ()
    unguarded: tuple[str, ...] = ()


#: Single solvers tried on the tracks after the first: the best few of the first.
OTHER_TRACK_SINGLES = 3


def _run_track(track: Track, singles: Sequence[Solver], run: Callable[[Candidate], float],
               refine: bool) -> list[tuple[float, Candidate]]:
    """eq. 5, each single solver, then greedy refinements of the mixed assignment, all run;
    returns ``(fidelity, candidate)`` of every candidate tried."""
    eq5, prefix = track.eq5, track.prefix
    scored = [(run(c), c) for c in [Candidate(f"{prefix}eq5", eq5),
                                    *(Candidate(prefix + c.name, c.profile) for c in uniform_candidates(eq5, singles))]]
    if refine and not _is_uniform(eq5) and len(scored) > 1:
        _, single = max(scored[1:], key=lambda pair: pair[0])
        target = int(single.profile.solvers.flatten()[0])
        mixed_db, mixed = scored[0]
        for solver in groups_by_size(eq5):
            if solver == target:
                continue
            candidate = Candidate(f"{mixed.name}+{pool()[solver].name}->{pool()[target].name}",
                                  handed_over(mixed.profile, solver, target))
            db = run(candidate)
            scored.append((db, candidate))
            if db > mixed_db:
                mixed_db, mixed = db, candidate
    for single in uniform_candidates(eq5, [s for s in pool() if s.name in track.unguarded]):
        candidate = Candidate(f"{prefix}{single.name},no-guard", with_metadata(single.profile, guard=False))
        scored.append((run(candidate), candidate))
    return scored


def choose(tracks: Profile | Sequence[Track], generate: Callable[..., torch.Tensor], reference: torch.Tensor,
           solvers: Sequence[Solver] | None = None, refine: bool = True,
           on_trial: Callable[[Trial], None] | None = None, tolerance: str | float = selection.BEST,
           screen: selection.Screen | None = None,
           on_plan: Callable[[int], None] | None = None) -> tuple[Profile, list[Trial], str]:
    """Run every candidate through ``generate(profile) -> final output`` and keep the one
    nearest ``reference`` (the fully computed run's output, same prompt and seed).

    ``tracks``: eq. 5's profile (one track), or :class:`Track` s: the first tries every
    single solver of ``solvers`` (default: the pool), the others the best few of those; a
    track's ``always`` and ``unguarded`` solvers are tried only where ``solvers`` has them.
    Per track, in order: eq. 5, the single solvers, then, with ``refine``, greedy
    refinements of the mixed assignment (each kept only when it improves the run).
    ``generate`` must apply what a candidate's metadata says (``first_interval``,
    ``target``).

    ``tolerance``: ``"best"`` keeps the best mean fidelity (ties: the earlier candidate);
    ``"se"`` or a margin in dB keeps the simplest candidate level with it
    (:func:`hyca.probing.selection.pick`). ``screen``: successive halving
    (:class:`~hyca.probing.selection.Screen`): every candidate runs on the screen's samples
    only, ``generate(profile, samples)`` with ``samples`` a tuple of indices into
    ``reference``'s batch, and the finalists on the rest; the greedy steps compare screened
    scores. ``on_plan(trials)``: once the first track has run, how many trials the choice
    makes in all (exact without refinements or screening, else at most), for a progress bar.
    Returns the chosen profile, every trial (the finalists' again, on all samples), and the
    winner's name.
    """
    tracks = [Track("", tracks)] if isinstance(tracks, Profile) else list(tracks)
    trials: list[Trial] = []
    scored_by_name: dict[str, selection.Scored] = {}
    profiles: dict[str, Profile] = {}
    track_index = 0
    runs: dict[tuple, tuple[str, torch.Tensor]] = {}  # each distinct run: its first candidate, its scores

    def measure(candidate: Candidate, samples: tuple[int, ...] | None) -> selection.Scored:
        key = (runs_as(candidate.profile), samples)
        same_as = runs[key][0] if key in runs else None
        if same_as is None:  # a candidate that runs exactly as one already run takes its scores
            if samples is None:
                scores = selection.fidelities_db(generate(candidate.profile), reference)
            else:
                scores = selection.fidelities_db(generate(candidate.profile, samples), reference[list(samples)])
            runs[key] = candidate.name, scores
        per_sample = runs[key][1]
        trial = Trial(candidate.name, selection.mean_db(per_sample), tuple(per_sample.tolist()), samples or (),
                      same_as)
        trials.append(trial)
        if on_trial is not None:
            on_trial(trial)
        return selection.Scored(candidate.name, track_index, per_sample, samples or ())

    def run(candidate: Candidate) -> float:
        scored = measure(candidate, screen.first if screen is not None else None)
        scored_by_name[candidate.name], profiles[candidate.name] = scored, candidate.profile
        return scored.mean

    everything = list(solvers) if solvers is not None else list(pool())
    allowed = {s.name for s in everything}  # a track's peer strategies too: nothing outside ``solvers`` runs
    tracks = [replace(t, unguarded=tuple(n for n in t.unguarded if n in allowed)) for t in tracks]
    scored = _run_track(tracks[0], everything, run, refine)
    ranked = sorted((pair for pair in scored if "uniform:" in pair[1].name), key=lambda pair: -pair[0])
    best_singles = [pool()[int(c.profile.solvers.flatten()[0])] for _, c in ranked]

    def singles_of(track: Track) -> list[Solver]:
        singles = everything if track.singles is None else best_singles[:track.singles]
        return [*singles, *(s for s in everything if s.name in track.always and s not in singles)]

    if on_plan is not None:  # the trials still to come are known now (refinements and finalists: at most)
        on_plan(len(trials) + sum(1 + len(singles_of(t)) + len(t.unguarded)
                                  + (len(torch.unique(t.eq5.solvers)) if refine else 0) for t in tracks[1:])
                + (screen.finalists + 1 if screen is not None and screen.rest else 0))
    for track_index, track in enumerate(tracks[1:], start=1):
        _run_track(track, singles_of(track), run, refine)
    finalists = list(scored_by_name.values())
    if screen is not None and screen.rest:
        finalists = []
        for screened in screen.finalists_of(list(scored_by_name.values())):
            track_index = screened.track
            rest = measure(Candidate(screened.name, profiles[screened.name]), screen.rest)
            order = torch.tensor(screened.samples + rest.samples).argsort()
            per_sample = torch.cat([screened.per_sample, rest.per_sample])[order]
            finalists.append(selection.Scored(screened.name, screened.track, per_sample, ()))
            trials[-1] = Trial(screened.name, selection.mean_db(per_sample), tuple(per_sample.tolist()))
    best = selection.pick(finalists, tolerance)
    return profiles[best.name], trials, best.name


def runs_as(profile: Profile) -> tuple:
    """What a cached run with ``profile`` depends on: the solver of every dimension and the
    metadata the engine reads (target, schedule start, last step, guard); two profiles with
    the same key give the same run (the clustering alone, e.g. eq. 5's choice of one solver
    for every cluster against that solver's uniform candidate, changes nothing)."""
    metadata = profile.metadata
    return (profile.dim_solvers().numpy().tobytes(), tuple(profile.labels.shape),
            *(repr(metadata.get(k)) for k in ("target", "first_interval", "skip_last", "guard")))


def with_metadata(profile: Profile, **updates: Any) -> Profile:
    """A copy of ``profile`` whose metadata also holds ``updates`` (a track's start or target)."""
    copy = with_solvers(profile, profile.solvers)
    copy.metadata.update(updates)
    return copy
