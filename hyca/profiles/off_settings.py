"""What a run does with a profile chosen for other settings, and the one note that says so.

A profile's solvers are chosen for one setting (:class:`~hyca.profiles.settings.RunSettings`:
steps, guidance, sigma shift, N, ...). Used away from it (a shipped or Hub profile, a WebUI
or ComfyUI session whose probe is off or that took the closest cached profile, a
``hyca.enable(pipe, profile=...)``), a high order chosen on one trajectory can extrapolate
another one's noise and land below plain reuse (issue 21, item 4). The *robust path* keeps
the profile's clustering and starts each solver group from a low order, with the guard on:
the guard's checks (:mod:`hyca.engine.guard`) then demote a group to plain reuse, or give it
the profile's own solver back where that solver wins on this run's trajectory. Why not
trust the profile and let the guard demote it: the guard needs two steady checks (the third
computed step after warm-up, at the earliest) before it may switch; at 20-28 steps with
N >= 4 that comes after most of the forecasts, or never. A profile the closed loop chose
with the guard off (metadata ``guard: false``) gets the guard back on this path.

Which low order (:func:`robust_start`): plain reuse on guided runs and even sigma schedules,
taylor-1 on unguided runs on shifted ones, measured on the reference model at off-settings
cells (``python -m hyca.bench.off_settings``; bench/results/off_settings.md).

This module decides (:func:`decide`) and words the decision (:meth:`OffSettings.describe`);
the engine applies it (:meth:`hyca.engine.cache.HybridCache.start_from`) and carries it in
its stats (``RunStats.off_settings``), and every host renders that same object: the
diffusers log, the WebUI console and infotext, the ComfyUI console, the app's status.
No host imports here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .settings import RunSettings, differences

#: The ways a run can use a profile chosen for other settings:
#: ``"robust"``: every solver group starts from :func:`robust_start`'s solver, the guard on
#: (the default); ``"profile"``: the profile's solvers as chosen (the robust path off; the
#: guard, when on, may still demote them); ``"reuse"`` / ``"taylor-1"``: every group starts
#: from that solver (for measuring the choice).
PATHS = ("robust", "profile", "reuse", "taylor-1")

#: The solver the robust path starts every solver group from on an unguided run on a shifted
#: sigma schedule (FLUX's, SD3's: shift > :data:`SHIFTED`), where taylor-1 beat plain reuse
#: on the reference model; on guided runs (guidance multiplies a forecast's error on
#: ``cond - uncond``) and on even schedules (shift 1) plain reuse won. Measured:
#: bench/results/off_settings.md, summed up in docs/engine.md.
ROBUST_START_SHIFTED = "taylor-1"
#: ... and on every other run (guided, or an even schedule).
ROBUST_START = "reuse"
#: A schedule counts as shifted from this flow-matching shift on: its middle sigma is then
#: above ``SHIFTED / (1 + SHIFTED)`` (0.6; 0.5 unshifted, 0.75 at shift 3).
SHIFTED = 1.5


@dataclass(frozen=True)
class OffSettings:
    """A run that differs from the settings its profile was chosen for, and what it does.

    ``chosen_for``: the profile's settings; ``differences``: what differs, as short phrases
    (:func:`~hyca.profiles.settings.differences`, e.g. ``"steps 50 vs 28"``); ``path``: one
    of :data:`PATHS` as applied (``"robust"`` never appears without the guard: a run with
    the guard off uses the profile as chosen, ``"profile"``); ``start``: the solver every
    group starts from (``None``: the profile's own); ``guard``: whether the guard
    checks the run."""

    chosen_for: RunSettings
    differences: tuple[str, ...]
    path: str
    start: str | None
    guard: bool

    def short(self) -> str:
        """A few words for an infotext or a table: ``robust (taylor-1 start, guard)``."""
        if self.start is None:
            return "profile as chosen" + (" (guard)" if self.guard else " (no guard)")
        return f"{self.path} ({self.start} start{', guard' if self.guard else ''})"

    def describe(self) -> str:
        """The note every host shows (one sentence, no host's remedy: each host adds its own)."""
        head = (f"the profile was chosen for other settings ({self.chosen_for.describe()}; this run differs: "
                f"{'; '.join(self.differences)})" if self.chosen_for != RunSettings() else  # a solver named by the user
                f"this run differs from what the profile assumes ({'; '.join(self.differences)})")
        if self.start is None:
            return head + ("; the profile's solvers run as chosen, and the guard checks them" if self.guard else
                           "; the guard is off, so the profile's solvers run as chosen (turn the guard on for "
                           "the robust path)")
        start = "plain reuse" if self.start == "reuse" else self.start
        down = "" if self.start == "reuse" else "moves a group down to plain reuse or "
        return (f"{head}; robust path: the run starts every solver group from {start}, and the guard {down}gives a group "
                "the profile's own solver back where that solver wins its checks")


def shifted(run: RunSettings) -> bool | None:
    """Whether the run samples on a shifted sigma schedule (:data:`SHIFTED`), from its sigmas
    when known (the middle one, of a schedule running from 1 towards 0), else its shift;
    ``None``: neither is known."""
    if run.sigmas is not None and len(run.sigmas) > 2 and run.sigmas[0] > 0:
        middle = run.sigmas[(len(run.sigmas) - 1) // 2] / run.sigmas[0]
        return middle > SHIFTED / (1 + SHIFTED)
    return None if run.shift is None else run.shift > SHIFTED


def robust_start(run: RunSettings, guided_branches: bool | None = None) -> str:
    """The solver the robust path starts every group from: :data:`ROBUST_START_SHIFTED` on an
    unguided run on a shifted schedule (or one whose schedule is not known: most models
    sample on a shifted one), :data:`ROBUST_START` on a guided run (``run.guided``, or
    ``guided_branches``: the engine saw two guidance branches) or an even schedule."""
    guided = run.guided if run.guided is not None else guided_branches
    if guided:
        return ROBUST_START
    return ROBUST_START if shifted(run) is False else ROBUST_START_SHIFTED


def decide(chosen_for: RunSettings, run: RunSettings, guard: bool, path: str = "robust",
           extra: Sequence[str] = (), own_sigmas: bool = False,
           guided_branches: bool | None = None, start: str | None = None) -> OffSettings | None:
    """What a run at ``run`` does with a profile chosen for ``chosen_for``; ``None`` when
    nothing known differs (the run uses the profile as it is, no note).

    ``guard``: whether the run's guard is on (without it the profile runs as chosen: the
    robust path needs the guard to give a group its solver back). ``path``: one of
    :data:`PATHS`. ``extra``: differences the host or engine saw beyond the settings (two
    guidance branches on a run of unknown scale). ``own_sigmas``: as in
    :func:`~hyca.profiles.settings.differences`. ``start``: the robust path's first solver when
    the host knows better than :func:`robust_start` (a sampler that re-noises every step:
    plain reuse). Raises ``ValueError`` for an unknown path."""
    if path not in PATHS:
        raise ValueError(f"off-settings path must be one of {PATHS}, got {path!r}")
    found = tuple(differences(chosen_for, run, own_sigmas)) + tuple(extra)
    if not found:
        return None
    if path == "profile" or not guard:
        return OffSettings(chosen_for, found, "profile", None, guard)
    first = (start or robust_start(run, guided_branches)) if path == "robust" else path
    return OffSettings(chosen_for, found, path, first, guard)
