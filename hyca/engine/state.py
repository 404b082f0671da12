"""The state a host keeps per guidance branch, and what a branch reports: see
:mod:`hyca.engine.contract` for who owns it and when it is reset."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from ..math.solvers import pool
from ..profiles.off_settings import OffSettings
from .guard import Switch, describe_switches

#: The note of a run in which some forecast came out NaN or Inf (and was computed instead).
NON_FINITE = "a forecast was not finite (NaN or Inf); those steps were computed instead"
#: The note of a run at its profile's settings whose profile the closed loop chose guard-off.
UNGUARDED = "guard off: the probe chose this profile without the guard at these settings (metadata guard: false)"
#: The note of a run that asked for its last step computed, on a profile the probe chose with
#: it forecast (TaylorSeer lite's end).
LAST_FORECAST = "last step forecast: the probe chose this profile so (metadata skip_last)"


class NonFiniteForecast(RuntimeError):
    """A forecast asked for outside :meth:`HybridCache.begin_step` came out NaN or Inf."""


@dataclass
class RunStats:
    """What one guidance branch of the latest run did: steps computed and forecast,
    solver groups the guard switched (:mod:`hyca.engine.guard`), and anything else the user must
    hear (``notes``: a fallback, a profile made for other settings, ...; ``off_settings``: the
    latter as data)."""

    computed: int = 0
    forecast: int = 0
    #: skip steps whose forecast was not finite, computed instead
    non_finite: int = 0
    switches: list[Switch] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: the run differs from the settings its profile was chosen for: what differs and which
    #: path it took (:mod:`hyca.profiles.off_settings`; its sentence is among ``notes``)
    off_settings: OffSettings | None = None
    #: the profile the run used, where it came from in words (a file path, the shipped or Hub
    #: one, "probed on first use, saved to ..."; :attr:`hyca.profiles.Profile.source`), as the
    #: host knows it; None when the host does not say
    profile: str | None = None
    #: the guidance branch these are of ("cond", "uncond"; "default": a call outside any
    #: named branch), as the host names it; None when the host does not say
    branch: str | None = None

    @property
    def total(self) -> int:
        return self.computed + self.forecast

    def note(self, message: str) -> None:
        if message not in self.notes:
            self.notes.append(message)

    def describe(self, branch: bool = True) -> str:
        """One line for a user; ``branch``: begin with the guidance branch's name, when known
        (a host whose own line names the branch leaves it out)."""
        text = f"[{self.branch}] " if branch and self.branch not in (None, "default") else ""
        if not self.total:
            text += "no steps"
        else:
            text += (f"{self.computed} of {self.total} steps computed, {self.forecast} forecast "
                     f"(~{self.forecast / self.total:.0%} fewer transformer FLOPs)")
        if self.profile is not None:
            text += f"; profile: {self.profile}"
        if self.switches:
            text += "; guard: " + describe_switches([(None, d) for d in self.switches])
        if self.notes:
            text += "; " + "; ".join(self.notes)
        return text


@dataclass
class BranchState:
    """Everything one guidance branch (cond or uncond) of one generation accumulates."""

    step: int = 0
    total_steps: int | None = None
    first_position: float | None = None
    signature: tuple | None = None
    current_position: float = 0.0
    computing: bool = True
    failed: bool = False
    #: this skip step's forecast, made (and checked finite) by begin_step, and its position
    forecast: torch.Tensor | None = None
    forecast_position: float | None = None
    positions: deque = field(default_factory=deque)
    computed_steps: deque = field(default_factory=deque)  # step index of each history entry
    histories: list[deque] = field(default_factory=list)
    #: per slot, the largest |element| of each history value (same order; NaN or Inf for a
    #: value that is not finite): a skip step's forecast is known finite from these
    magnitudes: list[deque] = field(default_factory=list)
    #: this computed step's per-slot sums of the recorded residuals (None: no block fed it yet)
    accumulators: list[torch.Tensor | None] = field(default_factory=list)
    #: small residuals: the step's per-slot sums as one (slots, ...) tensor (``accumulators``
    #: are its rows once fed)
    stacked: torch.Tensor | None = None
    #: batch items, known from the first recorded residual (None before: one entry per slot)
    items: int | None = None
    #: pool index of the solver each (history slot, batch item) forecasts with now, slot-major:
    #: ``active[slot * items + item]`` (the guard lowers them, per item)
    active: list[int] = field(default_factory=list)
    #: per (slot, item), judged checks lost in a row (the guard switches at ``guard.STRIKES``)
    strikes: list[int] = field(default_factory=list)
    stats: RunStats = field(default_factory=RunStats)

    def reset(self) -> None:
        self.__init__()

    def switch(self, row: int, to: int, step: int, by: str = "guard") -> None:
        """Row ``row`` of :attr:`active` switches to pool index ``to`` at ``step``; the
        switch shows in the stats (``by``: the guard, or the robust start)."""
        item = row % self.items if self.items is not None and self.items > 1 else None
        self.stats.switches.append(Switch(step, pool()[self.active[row]].name, pool()[to].name, item, by))
        self.active[row], self.strikes[row] = to, 0
