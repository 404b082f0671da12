"""Settings of :func:`hyca.enable` for a run of a given length (``hyca.recommended_settings``)."""

from __future__ import annotations

import logging
import math
import numbers
from typing import Any

from ...engine.schedule import interval_for_speedup
from .api import _has_experts

logger = logging.getLogger("hyca")

FEW_STEPS = 10  # distilled models: FLUX.1-schnell (4 steps), Qwen-Image-Lightning (8)
MEDIUM_STEPS = 30


def _warmup_for(calls: int) -> int:
    return 1 if calls <= FEW_STEPS else 2 if calls <= 15 else 3


def recommended_settings(target: Any, num_inference_steps: int, speedup: float | None = None) -> dict[str, Any]:
    """Keyword arguments of :func:`enable` for a run of ``num_inference_steps``.

    Without ``speedup``: few-step distilled models (up to 10 steps) get ``interval=2,
    warmup=1`` (with 4 or 8 steps a longer interval leaves too few computed steps for any
    history); 11-30 steps, the settings people run most, ``interval=4`` with warm-up 2 (up
    to 15 steps) or 3; longer runs ``interval=5, warmup=3``. With ``speedup`` (e.g. 3.0):
    the smallest interval whose schedule skips enough steps for that many times fewer
    block FLOPs, with the same warm-up (a speed-up beyond reach gets the interval that comes
    closest among those that fit the run, at least one computed step between the warm-up and
    the last: :func:`hyca.engine.schedule.interval_for_speedup`, and a warning naming what it
    reaches). The step count is included, so :func:`enable` knows the run it is for (profile
    choice and first-use probe); the last step is left to the profile, as a plain
    :func:`enable` leaves it (``compute_last=True`` added by hand always computes it). A
    pipeline with two experts (Wan 2.2 A14B) is judged by the calls one expert sees, about half.
    """
    if (not isinstance(num_inference_steps, numbers.Integral) or isinstance(num_inference_steps, bool)
            or num_inference_steps < 1):
        raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
    num_inference_steps = int(num_inference_steps)
    if speedup is not None and (isinstance(speedup, bool) or not isinstance(speedup, numbers.Real)
                                or not math.isfinite(speedup) or speedup < 1):
        raise ValueError(f"speedup must be a number >= 1 (times fewer block FLOPs), got {speedup!r}")
    experts = _has_experts(target)
    calls = num_inference_steps // 2 if experts else num_inference_steps
    warmup = _warmup_for(calls)
    if speedup is not None:
        interval, reached = interval_for_speedup(calls, warmup, float(speedup))
        if reached < speedup:
            logger.warning("HyCa: %g x is out of reach at %d steps with warm-up %d; interval=%d, the closest of the "
                           "intervals that fit the run (a computed step between the warm-up and the last), reaches "
                           "%.2f x", speedup, calls, warmup, interval, reached)
    else:
        interval = 2 if calls <= FEW_STEPS else 4 if calls <= MEDIUM_STEPS else 5
    settings: dict[str, Any] = dict(interval=interval, warmup=warmup)
    if not experts:  # each expert sees part of the run: its own step count is read at run time
        settings["num_inference_steps"] = num_inference_steps
    return settings
