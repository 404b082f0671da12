"""What a profile was chosen for, and how far a run is from it.

A profile's solvers are chosen by replaying one schedule (interval N, warm-up, last step)
on one sampling run (step count, guidance, sigma schedule). At other settings the same
choice can be much worse than plain reuse (measured on the reference model: docs/profiles.md
and the settings grid, bench/results/grid.md). So a profile records the settings it was chosen for (:class:`RunSettings`, the ``chosen_for``
field of its file), profile lookup prefers the closest one (:func:`mismatch_cost`), and
a run on other settings is told what differs (:func:`differences`).

Every field may be ``None`` (not known); unknown fields never count as a difference.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Mapping

#: Relative tolerance when comparing float settings (guidance, shift, sigmas).
_RTOL = 1e-3
#: How much each differing field weighs when ranking profiles: the interval changes every
#: forecast's reach; guidance on/off changes which branch errors matter; the rest shift
#: the same dynamics by degrees.
_COST = {"interval": 16.0, "guidance": 8.0, "steps": 4.0, "shift": 2.0, "sigmas": 2.0, "warmup": 1.0,
         "compute_last": 0.5, "positions": 1.0}


@dataclass(frozen=True)
class RunSettings:
    """Sampling settings a profile is chosen for, or a run uses.

    ``steps``: transformer calls per guidance branch in the run. ``guidance_scale``:
    classifier-free guidance scale, 1.0 for none (distilled guidance embedded in the
    model, e.g. FLUX.1-dev's, is not this). ``shift``: the flow-matching scheduler's
    sigma shift. ``sigmas``: the sigma schedule itself, first to last (when known, it
    is compared instead of ``shift``). ``interval`` / ``warmup`` / ``compute_last`` /
    ``positions``: HyCa's schedule (:class:`hyca.engine.Schedule`) and positions axis.
    """

    steps: int | None = None
    guidance_scale: float | None = None
    shift: float | None = None
    sigmas: tuple[float, ...] | None = None
    interval: int | None = None
    warmup: int | None = None
    compute_last: bool | None = None
    positions: str | None = None

    def __post_init__(self) -> None:
        if self.sigmas is not None:
            object.__setattr__(self, "sigmas", tuple(float(f"{float(s):.6g}") for s in self.sigmas))

    @property
    def guided(self) -> bool | None:
        """Whether the run applies classifier-free guidance (``None``: not known)."""
        return None if self.guidance_scale is None else not math.isclose(self.guidance_scale, 1.0)

    def merged(self, other: "RunSettings") -> "RunSettings":
        """These settings with the unknown fields filled from ``other``."""
        return replace(self, **{f.name: getattr(other, f.name) for f in fields(self)
                                if getattr(self, f.name) is None and getattr(other, f.name) is not None})

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if v is not None}
        if "sigmas" in out:
            out["sigmas"] = list(out["sigmas"])
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "RunSettings":
        """Inverse of :meth:`to_json`; unknown keys are ignored (newer writers), wrong types
        raise ``ValueError`` naming the field."""
        if not isinstance(data, Mapping):
            raise ValueError(f"settings must be a JSON object, got {type(data).__name__}")
        kinds = {"steps": int, "guidance_scale": float, "shift": float, "sigmas": list, "interval": int,
                 "warmup": int, "compute_last": bool, "positions": str}
        values: dict[str, Any] = {}
        for name, kind in kinds.items():
            value = data.get(name)
            if value is None:
                continue
            ok = isinstance(value, (int, float)) if kind is float else isinstance(value, kind)
            if (kind is int and isinstance(value, bool)) or (kind is float and isinstance(value, bool)) or not ok:
                raise ValueError(f"settings field {name!r} is {value!r:.60}, expected {kind.__name__}")
            if kind is list:
                if not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in value):
                    raise ValueError(f"settings field 'sigmas' must be a list of numbers, got {value!r:.60}")
                value = tuple(float(s) for s in value)
            values[name] = float(value) if kind is float else value
        least = {"steps": 1, "interval": 1, "warmup": 1}  # as Schedule: the first step has no history
        for name, low in least.items():  # a count out of range is as corrupt as a wrong type
            if name in values and values[name] < low:
                raise ValueError(f"settings field {name!r} is {values[name]}, expected at least {low}")
        return cls(**values)

    @classmethod
    def of_profile(cls, metadata: Mapping[str, Any]) -> "RunSettings":
        """What a profile's metadata says it was chosen for: its ``chosen_for`` entry, with
        gaps filled from the older keys (``interval``, ``warmup``, ``compute_last``,
        ``positions``, the probe's ``steps`` and ``guidance_scale``)."""
        stated = metadata.get("chosen_for")
        chosen = cls.from_json(stated) if isinstance(stated, Mapping) else cls()
        probe = metadata.get("probe") if isinstance(metadata.get("probe"), Mapping) else {}
        legacy = {"interval": metadata.get("interval"), "warmup": metadata.get("warmup"),
                  "compute_last": metadata.get("compute_last"), "positions": metadata.get("positions"),
                  "steps": probe.get("steps"), "guidance_scale": probe.get("guidance_scale")}
        try:
            older = cls.from_json({k: v for k, v in legacy.items() if v is not None})
        except ValueError:
            older = cls()
        return chosen.merged(older)

    def tag(self) -> str:
        """A file-name part naming the run settings: ``w3-s28-g2.5-sh3`` (known fields only;
        the interval has its own ``-n<N>`` part), with ``-sg<hash>`` for a sigma schedule of
        its own (:meth:`sigmas_hash`), so that a custom schedule and the default one at the
        same step count never share a file; likewise ``-sigma`` for the sigma axis and
        ``-nolast`` for a schedule whose last step is forecast."""
        parts = []
        for prefix, value in (("w", self.warmup), ("s", self.steps), ("g", self.guidance_scale), ("sh", self.shift)):
            if value is not None:
                parts.append(f"{prefix}{value:g}" if isinstance(value, float) else f"{prefix}{value}")
        if self.sigmas is not None:
            parts.append(f"sg{self.sigmas_hash()}")
        if self.positions not in (None, "step"):
            parts.append(self.positions)
        if self.compute_last is False:  # a schedule that forecasts the last step: another profile
            parts.append("nolast")
        return "-".join(parts)

    def sigmas_hash(self) -> str:
        """8 hex digits naming the sigma schedule, rounded to 3 significant digits (the
        tolerance :func:`differences` compares at); ``""`` when no schedule is known."""
        if self.sigmas is None:
            return ""
        text = ",".join(f"{s:.3g}" for s in self.sigmas)
        return hashlib.sha256(text.encode()).hexdigest()[:8]

    def describe(self) -> str:
        """``28 steps, guidance 2.5, shift 3, N=6, warm-up 3`` (known fields only)."""
        parts = []
        if self.steps is not None:
            parts.append(f"{self.steps} steps")
        if self.guidance_scale is not None:
            parts.append("no guidance" if not self.guided else f"guidance {self.guidance_scale:g}")
        if self.sigmas is not None:
            # the ends alone read alike for two schedules (simple and karras both run 1..0): the hash tells them apart
            parts.append(f"sigmas {self.sigmas[0]:.3g}..{self.sigmas[-1]:.3g} (#{self.sigmas_hash()})")
        elif self.shift is not None:
            parts.append(f"shift {self.shift:g}")
        if self.interval is not None:
            parts.append(f"N={self.interval}")
        if self.warmup is not None:
            parts.append(f"warm-up {self.warmup}")
        if self.compute_last is False:
            parts.append("last step forecast")
        if self.positions not in (None, "step"):
            parts.append(f"{self.positions} axis")
        return ", ".join(parts) or "unknown settings"


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=_RTOL, abs_tol=1e-6)


def _sigmas_differ(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return len(a) != len(b) or not all(_close(x, y) for x, y in zip(a, b))


def _differing(chosen: RunSettings, run: RunSettings, own_sigmas: bool = False) -> dict[str, str]:
    """Field -> ``"<chosen> vs <run>"`` for every field known on both sides that differs;
    with ``own_sigmas`` also a sigma schedule on one side only (see :func:`differences`)."""
    out: dict[str, str] = {}

    def both(name: str) -> bool:
        return getattr(chosen, name) is not None and getattr(run, name) is not None

    for name in ("interval", "warmup", "steps", "compute_last", "positions"):
        if both(name) and getattr(chosen, name) != getattr(run, name):
            out[name] = f"{getattr(chosen, name)} vs {getattr(run, name)}"
    if both("guidance_scale") and not _close(chosen.guidance_scale, run.guidance_scale):
        out["guidance"] = f"{chosen.guidance_scale:g} vs {run.guidance_scale:g}"
    if both("sigmas"):
        if _sigmas_differ(chosen.sigmas, run.sigmas):
            out["sigmas"] = "differ"
    elif own_sigmas and (chosen.sigmas is None) != (run.sigmas is None):
        out["sigmas"] = "the scheduler's own vs given" if run.sigmas is not None else "given vs the scheduler's own"
    elif both("shift") and not _close(chosen.shift, run.shift):
        out["shift"] = f"{chosen.shift:g} vs {run.shift:g}"
    return out


_LABELS = {"interval": "N", "warmup": "warm-up", "steps": "steps", "compute_last": "compute-last",
           "positions": "positions axis", "guidance": "guidance", "sigmas": "sigmas", "shift": "shift"}


def differences(chosen: RunSettings, run: RunSettings, own_sigmas: bool = False) -> list[str]:
    """What differs between the settings a profile was chosen for and a run's, as short
    phrases (``"steps 50 vs 28"``); empty when nothing known differs.

    ``own_sigmas``: the host says that a run without ``sigmas`` samples on its scheduler's
    own schedule (a diffusers call given no ``sigmas``), so a profile chosen for a sigma
    schedule of its own differs from it, and the other way round."""
    return [f"{_LABELS[k]} {v}" for k, v in _differing(chosen, run, own_sigmas).items()]


def mismatch_cost(chosen: RunSettings, run: RunSettings, own_sigmas: bool = False) -> float:
    """How far apart two settings are, for ranking profiles (0 = nothing known differs).
    Guidance counts fully when one side is guided and the other is not, half when both are
    guided at different scales; steps count by their relative difference. ``own_sigmas``:
    as in :func:`differences`."""
    cost = 0.0
    for name in _differing(chosen, run, own_sigmas):
        weight = _COST[name]
        if name == "guidance" and chosen.guided == run.guided:
            weight /= 2
        if name == "steps":
            weight *= min(1.0, abs(chosen.steps - run.steps) / max(chosen.steps, run.steps) * 2)
        cost += weight
    return cost
