"""``hyca.enable`` / ``hyca.disable`` for diffusers pipelines and transformers."""

from __future__ import annotations

from typing import Any

import torch

from ...engine.cache import HybridCache, RunStats
from ...engine.schedule import Schedule
from ...profiles.profile import Profile
from . import hooks
from .families import blocks_of, family_of, hidden_size

TRANSFORMER_ATTRIBUTES = ("transformer", "transformer_2")


def transformers_of(target: Any) -> list[torch.nn.Module]:
    """The transformer itself, or every transformer a pipeline holds (Wan 2.2 has two)."""
    if isinstance(target, torch.nn.Module):
        return [target]
    found = [getattr(target, a) for a in TRANSFORMER_ATTRIBUTES if getattr(target, a, None) is not None]
    if not found:
        raise TypeError(f"{type(target).__name__} is neither a transformer nor a pipeline with one")
    return found


def _steps_from(scheduler: Any):
    """Model calls per branch in the current run, read from the scheduler when it is set."""

    def total_steps() -> int | None:
        timesteps = getattr(scheduler, "timesteps", None)
        if timesteps is None:
            return None
        return len(timesteps) - (getattr(scheduler, "begin_index", None) or 0)

    return total_steps


def _profile_for(profile: Profile | str, transformer: torch.nn.Module, num_blocks: int, dim: int) -> Profile:
    if isinstance(profile, Profile):
        profile.check_fits(num_blocks, dim, type(transformer).__name__)
        return profile
    if isinstance(profile, str):
        return Profile.uniform(profile, num_blocks, dim)
    raise TypeError(f"profile must be a Profile or a solver name such as 'fora' or 'taylor-2', got {profile!r}")


def enable(
    target: Any,
    profile: Profile | str,
    interval: int = 5,
    warmup: int = 3,
    compute_last: bool = True,
    positions: str = "step",
    cache_dtype: torch.dtype | None = None,
    scheduler: Any = None,
) -> list[HybridCache]:
    """Accelerate ``target`` (a pipeline or a transformer) with hybrid feature caching.

    ``profile``: a :class:`Profile`, or a solver name for the one-cluster methods
    (``"fora"``, ``"taylor-1"``, ``"taylor-2"``, ...). ``interval``: one computed step in
    every N after ``warmup`` computed steps. ``positions``: ``"step"`` (step index) or
    ``"sigma"`` (the model's timestep input) as the axis the solvers extrapolate along.
    ``scheduler``: where to read the step count in a hand-written loop (a pipeline's own
    scheduler is used automatically); it lets ``compute_last`` find the last step.
    Enabling again replaces the previous settings. Returns the engine of each transformer.
    """
    schedule = Schedule(interval=interval, warmup=warmup, compute_last=compute_last)
    scheduler = scheduler if scheduler is not None else getattr(target, "scheduler", None)
    engines = []
    for transformer in transformers_of(target):
        family = family_of(transformer)
        if getattr(transformer, "is_cache_enabled", False):
            raise RuntimeError(
                f"{type(transformer).__name__} already has a diffusers cache enabled "
                f"({type(transformer._cache_config).__name__}); call transformer.disable_cache() first"
            )
        blocks = blocks_of(transformer, family)
        engine = HybridCache(_profile_for(profile, transformer, len(blocks), hidden_size(transformer)),
                             schedule, positions, cache_dtype)
        hooks.unregister(transformer)
        hooks.register(transformer, blocks, engine, family, _steps_from(scheduler))
        engines.append(engine)
    return engines


def disable(target: Any) -> None:
    """Remove HyCa: the model computes every step again, bit-identical to an unpatched one."""
    for transformer in transformers_of(target):
        hooks.unregister(transformer)


def reset(target: Any) -> None:
    """Drop all cached state (pipelines do this themselves at the end of each call)."""
    for transformer in transformers_of(target):
        hook = hooks.root_hook(transformer)
        if hook is not None:
            hook.reset_state(transformer)


def stats(target: Any) -> list[RunStats]:
    """Computed and forecast step counts of the latest run, per transformer."""
    return [hook.engine.last_stats for t in transformers_of(target) if (hook := hooks.root_hook(t)) is not None]


def is_enabled(target: Any) -> bool:
    return any(hooks.root_hook(t) is not None for t in transformers_of(target))
