"""Which sampling steps run the transformer and which are forecast."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, replace

from ..profiles.profile import Profile
from ..profiles.settings import RunSettings


@dataclass(frozen=True)
class Schedule:
    """Warm-up steps ``0 .. warmup-1`` are computed; after them one step in every
    ``interval`` is computed, counting the last warm-up step as the first of a cycle:
    computed steps are ``{0 .. W-1} U {W-1 + k*N}``. With ``compute_last`` the final
    step is computed too, because structure errors on it cannot be corrected later.

    ``first_interval`` (default: ``interval``): steps from the last warm-up step to the
    first computed step after it; the later ones follow every ``interval``:
    ``{0 .. W-1} U {W-1 + F + k*N}``. Right after warm-up the history is one step apart,
    and extrapolating it ``N-1`` steps ahead is the least accurate forecast of a run; a
    short first interval (diffusers' TaylorSeer computes two steps after warm-up) spaces
    the history ``N`` apart sooner. On the reference model it helps on an even sigma
    schedule and hurts on a shifted one (docs/engine.md), so the probe chooses it closed
    loop (:mod:`hyca.probing.closed_loop`) and a profile carries it.

    ``interval=1`` computes every step (caching off, a useful baseline). ``keep_last``: the
    last step stays computed whatever a profile's end (:func:`with_profiles_start`): the user
    asked for it explicitly.
    """

    interval: int = 5
    warmup: int = 3
    compute_last: bool = True
    first_interval: int | None = None
    keep_last: bool = False

    def __post_init__(self) -> None:
        for name in ("interval", "warmup", "first_interval"):  # numpy's integers (a sweep over np.arange) too
            value = getattr(self, name)
            if isinstance(value, numbers.Integral) and not isinstance(value, (bool, int)):
                object.__setattr__(self, name, int(value))
        if not isinstance(self.interval, int) or isinstance(self.interval, bool) or self.interval < 1:
            raise ValueError(f"interval must be an integer >= 1 (1 = compute every step), got {self.interval!r}")
        if not isinstance(self.warmup, int) or isinstance(self.warmup, bool) or self.warmup < 1:
            raise ValueError(
                f"warmup must be an integer >= 1: the first step has no history to forecast from, got {self.warmup!r}"
            )
        if not isinstance(self.compute_last, bool):
            raise ValueError(f"compute_last must be True or False, got {self.compute_last!r}")
        if not isinstance(self.keep_last, bool) or (self.keep_last and not self.compute_last):
            raise ValueError(f"keep_last must be True or False, and True only with compute_last, got {self.keep_last!r}")
        if self.first_interval is not None and (not isinstance(self.first_interval, int)
                                                 or not 1 <= self.first_interval <= self.interval):
            raise ValueError(f"first_interval must be an integer from 1 to interval={self.interval}, "
                             f"got {self.first_interval!r}")

    @property
    def first(self) -> int:
        return self.interval if self.first_interval is None else self.first_interval

    def computes(self, step: int, total_steps: int | None = None) -> bool:
        if step < self.warmup:
            return True
        if self.compute_last and total_steps is not None and step >= total_steps - 1:
            return True
        after = step - (self.warmup - 1) - self.first
        return after >= 0 and after % self.interval == 0

    def with_first_interval(self, first_interval: int | None) -> "Schedule":
        return replace(self, first_interval=None if first_interval in (None, self.interval) else first_interval)

    def with_start(self, first_interval: int | None, skip_last: bool = False) -> "Schedule":
        """:meth:`with_first_interval`, and with ``skip_last`` the last step forecast (what a
        profile chosen on :meth:`lite_start` carries as metadata ``skip_last``)."""
        started = self.with_first_interval(first_interval)
        return replace(started, compute_last=False) if skip_last else started

    def lite_start(self, total_steps: int) -> "Schedule | None":
        """diffusers TaylorSeer's schedule at this interval and warm-up (``cache_interval=N``,
        ``disable_cache_before_step=W``: steps ``0 .. W-1`` and ``W+1 + kN``, the last step
        not computed unless it falls there): a first interval of 2 without ``compute_last``.
        None when it computes more steps in a run of ``total_steps`` than this schedule."""
        if self.interval < 2:
            return None
        lite = replace(self, first_interval=2, compute_last=False)
        return lite if sum(lite.plan(total_steps)) <= sum(self.plan(total_steps)) else None

    def short_start(self, total_steps: int) -> "Schedule | None":
        """The same schedule with the shortest first interval (at least 2) that computes no
        more steps in a run of ``total_steps`` than this one; None when there is none."""
        budget = sum(self.plan(total_steps))
        for first in range(2, self.interval):
            candidate = replace(self, first_interval=first)
            if sum(candidate.plan(total_steps)) <= budget:
                return candidate
        return None

    def interval_beyond(self, total_steps: int) -> str | None:
        """Why the interval does not fit a run of ``total_steps``: one interval after the
        last warm-up step reaches the run's last step or beyond (e.g. N=20 in a 12-step
        run), so after the warm-up the run computes at most the last step (and a profile's
        short first interval) and forecasts the rest. None when it fits, or when the
        schedule forecasts none of the steps (a case of its own)."""
        plan = self.plan(total_steps)
        if all(plan) or self.warmup - 1 + self.interval < total_steps - 1:
            return None
        remaining = total_steps - self.warmup
        computed = sum(plan[self.warmup:])
        advice = (f"use an N below {remaining}" if remaining > 2 else  # N=1 computes every step: no caching at all
                  "use more steps or a shorter warm-up")
        return (f"N={self.interval} does not fit in this run ({total_steps} steps, warm-up {self.warmup}): of the "
                f"{remaining} step{'s' if remaining != 1 else ''} after the warm-up it computes {computed} and "
                f"forecasts {remaining - computed}; for caching that follows the run, {advice}")

    def plan(self, total_steps: int) -> list[bool]:
        """``True`` for each computed step of a run of ``total_steps``."""
        return [self.computes(step, total_steps) for step in range(total_steps)]

    def computed_fraction(self, total_steps: int) -> float:
        """Fraction of transformer passes that run: the FLOPs ratio, up to the cheap
        embedding and output layers that run on every step."""
        return sum(self.plan(total_steps)) / total_steps


def interval_for_speedup(steps: int, warmup: int, speedup: float, compute_last: bool = True) -> tuple[int, float]:
    """The smallest interval whose schedule over ``steps`` computes few enough steps for
    ``speedup`` times fewer block passes, and the speed-up it reaches; when no interval
    reaches it, the one that comes closest. Only intervals that fit the run are considered
    (:meth:`Schedule.interval_beyond`: at least one computed step between the warm-up and the
    last one). Raises ``ValueError`` for a speed-up below 1."""
    if not speedup >= 1:
        raise ValueError(f"speedup must be >= 1 (times fewer block passes), got {speedup!r}")
    best = (1, 1.0)
    for interval in range(1, steps + 1):
        schedule = Schedule(interval, warmup, compute_last)
        if interval > 1 and schedule.interval_beyond(steps) is not None:
            break  # longer intervals do not fit either
        reached = 1 / schedule.computed_fraction(steps)
        if reached >= speedup:
            return interval, reached
        if reached > best[1]:
            best = (interval, reached)
    return best


def with_profiles_start(schedule: Schedule, profile: Profile) -> Schedule:
    """The schedule with the first interval after warm-up the profile was chosen with
    (:class:`Schedule`), when the profile was chosen for this interval and warm-up and the
    schedule does not set one itself."""
    first = profile.metadata.get("first_interval")
    chosen = RunSettings.of_profile(profile.metadata)
    if (first is None or schedule.first_interval is not None or chosen.interval != schedule.interval
            or chosen.warmup not in (None, schedule.warmup) or not isinstance(first, int)
            or not 1 <= first <= schedule.interval):
        return schedule
    return schedule.with_start(first, profile.metadata.get("skip_last") is True and not schedule.keep_last)
