"""``hyca.enable`` / ``hyca.disable`` for diffusers pipelines and transformers."""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Mapping

import torch

from ...engine.cache import HybridCache, RunStats
from ...engine.schedule import Schedule
from ...profiles.profile import Profile
from . import hooks
from .families import blocks_of, family_of, hidden_size
from .fingerprint import fingerprint

TRANSFORMER_ATTRIBUTES = ("transformer", "transformer_2")
#: ``profile=AUTO``: find the model's profile (shipped, cache, Hub) or probe it on first use.
AUTO = "auto"

logger = logging.getLogger("hyca")


def named_transformers(target: Any) -> list[tuple[str, torch.nn.Module]]:
    """``(attribute, transformer)`` for a transformer itself (named ``"transformer"``) or
    for every transformer a pipeline holds (Wan 2.2 A14B has two)."""
    if isinstance(target, torch.nn.Module):
        return [(TRANSFORMER_ATTRIBUTES[0], target)]
    found = [(a, getattr(target, a)) for a in TRANSFORMER_ATTRIBUTES if getattr(target, a, None) is not None]
    if not found:
        raise TypeError(f"{type(target).__name__} is neither a transformer nor a pipeline with one")
    return found


def transformers_of(target: Any) -> list[torch.nn.Module]:
    """The transformer itself, or every transformer a pipeline holds (Wan 2.2 has two)."""
    return [t for _, t in named_transformers(target)]


def _remaining_timesteps(scheduler: Any) -> torch.Tensor | None:
    timesteps = getattr(scheduler, "timesteps", None)
    if timesteps is None:
        return None
    return timesteps[getattr(scheduler, "begin_index", None) or 0:]


def _steps_from(scheduler: Any) -> Callable[[int | None], int | None]:
    """Model calls per branch in the current run: the count the pipeline gives in its
    cache context, else the scheduler's."""

    def total_steps(from_context: int | None) -> int | None:
        if from_context:
            return from_context
        timesteps = _remaining_timesteps(scheduler)
        return None if timesteps is None else len(timesteps)

    return total_steps


def _expert_steps(pipe: Any, attribute: str) -> Callable[[int | None], int | None]:
    """Calls one expert of a two-transformer pipeline (Wan 2.2 A14B) receives: the
    high-noise ``transformer`` runs while ``t >= boundary_ratio * num_train_timesteps``,
    ``transformer_2`` after. The pipeline's cache context gives the whole run's count,
    which neither expert sees, so the count comes from the scheduler."""
    scheduler = pipe.scheduler

    def total_steps(from_context: int | None) -> int | None:
        timesteps = _remaining_timesteps(scheduler)
        if timesteps is None:
            return None
        boundary = pipe.config.boundary_ratio * scheduler.config.num_train_timesteps
        high_noise = int((timesteps >= boundary).sum())
        return high_noise if attribute == "transformer" else len(timesteps) - high_noise

    return total_steps


def _has_experts(target: Any) -> bool:
    config = getattr(target, "config", None)
    return (not isinstance(target, torch.nn.Module) and getattr(target, "transformer_2", None) is not None
            and config is not None and config.get("boundary_ratio") is not None)


def _profile_for(profile: Profile | str, transformer: torch.nn.Module, num_blocks: int, dim: int) -> Profile:
    if isinstance(profile, Profile):
        profile.check_fits(num_blocks, dim, type(transformer).__name__)
        return profile
    if isinstance(profile, str):
        return Profile.uniform(profile, num_blocks, dim)
    raise TypeError(f"profile must be a Profile, 'auto', a profile file, a solver name such as 'fora' or "
                    f"'taylor-2', or a dict of those per transformer attribute ('transformer', "
                    f"'transformer_2'); got {profile!r}")


def _is_profile_file(spec: Any) -> bool:
    return isinstance(spec, os.PathLike) or (isinstance(spec, str) and (
        spec.endswith(".safetensors") or os.path.isfile(spec)))


def _resolve(spec: Any, transformer: torch.nn.Module, make: Callable[[], Profile] | None, interval: int) -> Any:
    """Turn ``"auto"`` or a file path into a :class:`Profile`; leave anything else as given."""
    from ...profiles.sources import resolve_profile

    if _is_profile_file(spec):
        return resolve_profile(fingerprint(transformer), path=spec, interval=interval).profile
    if spec != AUTO:
        return spec
    resolved = resolve_profile(fingerprint(transformer), interval=interval, probe=make)
    logger.info("HyCa: %s profile from %s", type(transformer).__name__, resolved.path or resolved.source)
    return resolved.profile


def _first_use_probe(target: Any, attribute: str, interval: int, warmup: int, positions: str,
                     probe_kwargs: Mapping[str, Any] | None) -> Callable[[], Profile] | None:
    """A probe for ``profile="auto"``: only a pipeline can generate, and the probe drives
    the pipeline's main transformer (a bare transformer or Wan 2.2's second expert needs
    a profile from a file or the Hub)."""
    if isinstance(target, torch.nn.Module) or attribute != TRANSFORMER_ATTRIBUTES[0]:
        return None

    def make() -> Profile:
        from .probe import probe

        logger.warning("HyCa: no profile for %s yet; probing it once (saved to the local cache)",
                       type(getattr(target, attribute)).__name__)
        return probe(target, interval=interval, warmup=warmup, positions=positions, **dict(probe_kwargs or {}))

    return make


def _profile_of(profile: Any, attribute: str) -> Profile | str:
    if isinstance(profile, Mapping):
        if attribute not in profile:
            raise KeyError(f"profile has no entry for {attribute!r}; give one per transformer, "
                           f"e.g. {{'transformer': p1, 'transformer_2': p2}} (got keys {sorted(profile)})")
        return profile[attribute]
    return profile


def enable(
    target: Any,
    profile: Profile | str | os.PathLike | Mapping[str, Profile | str] = AUTO,
    interval: int = 5,
    warmup: int = 3,
    compute_last: bool = True,
    positions: str = "step",
    cache_dtype: torch.dtype | None = None,
    scheduler: Any = None,
    probe_kwargs: Mapping[str, Any] | None = None,
    guard: bool = True,
) -> list[HybridCache]:
    """Accelerate ``target`` (a pipeline or a transformer) with hybrid feature caching.

    ``profile``: ``"auto"`` (the default: the model's profile from ``$HYCA_PROFILES``, the
    shipped ``profiles/``, the local cache or the Hub, else a probe on first use, saved to
    the cache; ``probe_kwargs`` go to :func:`hyca.probe`, e.g. ``prompt``, ``height``), a
    profile file, a :class:`Profile`, or a solver name for the one-cluster methods
    (``"fora"``, ``"taylor-1"``, ``"taylor-2"``, ...), or for a pipeline with two
    transformers (Wan 2.2 A14B) a dict ``{"transformer": p1, "transformer_2": p2}``.
    Each transformer counts its own calls: warm-up is its first ``warmup`` calls and
    ``compute_last`` computes its last one (for Wan 2.2's high-noise expert, the step
    before the switch). ``interval``: one computed step in every N after ``warmup``
    computed steps (:func:`recommended_settings` picks both from the step count).
    ``positions``: ``"step"`` (step index) or ``"sigma"`` (the pipeline's sigma when its
    cache context gives one, else the model's timestep input) as the axis the solvers
    extrapolate along.
    ``scheduler``: where to read the step count in a hand-written loop (a pipeline's own
    scheduler is used automatically); it lets ``compute_last`` find the last step.
    ``guard``: every computed step checks what each solver group would have forecast for
    it and demotes a group that did worse than a lower order (``taylor-1``, ``reuse``) for
    the rest of the generation; no extra model call (:mod:`hyca.engine.guard`).
    ``False`` is the paper's behaviour. Demotions show in :func:`stats`.
    Enabling again replaces the previous settings. Returns the engine of each transformer.
    """
    schedule = Schedule(interval=interval, warmup=warmup, compute_last=compute_last)
    scheduler = scheduler if scheduler is not None else getattr(target, "scheduler", None)
    engines = []
    experts = _has_experts(target)
    for attribute, transformer in named_transformers(target):
        family = family_of(transformer)
        if getattr(transformer, "is_cache_enabled", False):
            raise RuntimeError(
                f"{type(transformer).__name__} already has a diffusers cache enabled "
                f"({type(transformer._cache_config).__name__}); call transformer.disable_cache() first"
            )
        blocks = blocks_of(transformer, family)
        make = _first_use_probe(target, attribute, interval, warmup, positions, probe_kwargs)
        spec = _resolve(_profile_of(profile, attribute), transformer, make, interval)
        chosen = _profile_for(spec, transformer, len(blocks), hidden_size(transformer))
        engine = HybridCache(chosen, schedule, positions, cache_dtype, guard=guard)
        total_steps = _expert_steps(target, attribute) if experts else _steps_from(scheduler)
        hooks.unregister(transformer)
        hooks.register(transformer, blocks, engine, family, total_steps)
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


FEW_STEPS = 10  # distilled models: FLUX.1-schnell (4 steps), Qwen-Image-Lightning (8)
MEDIUM_STEPS = 30


def recommended_settings(target: Any, num_inference_steps: int) -> dict[str, Any]:
    """Schedule settings for a run of ``num_inference_steps``, as keyword arguments of
    :func:`enable`. Few-step distilled models get ``interval=2, warmup=1``: with 4 or 8
    steps a longer interval leaves too few computed steps for any history. A pipeline
    with two experts (Wan 2.2 A14B) is judged by the calls one expert sees, about half.
    """
    if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
    calls = num_inference_steps // 2 if _has_experts(target) else num_inference_steps
    if calls <= FEW_STEPS:
        return dict(interval=2, warmup=1, compute_last=True)
    if calls <= MEDIUM_STEPS:
        return dict(interval=3, warmup=2, compute_last=True)
    return dict(interval=5, warmup=3, compute_last=True)
