"""``hyca.enable`` / ``hyca.disable`` for diffusers pipelines and transformers."""

from __future__ import annotations

import logging
import math
import numbers
import os
from typing import Any, Callable, Mapping

import torch

from ...engine.cache import POSITION_AXES, HybridCache, RunStats
from ...engine.schedule import Schedule
from ...profiles.io import ProfileError
from ...profiles.profile import Profile
from ...profiles.settings import RunSettings
from . import hooks, parallel, requests
from .families import blocks_of, family_of, head_of, hidden_size
from .fingerprint import fingerprint
from .settings import schedule_shift

TRANSFORMER_ATTRIBUTES = ("transformer", "transformer_2")
#: ``profile=AUTO``: find the model's profile (shipped, cache, Hub) or probe it on first use.
AUTO = "auto"
#: The step count :func:`hyca.probe` samples when none is given.
PROBE_STEPS = 28

logger = logging.getLogger("hyca")


def named_transformers(target: Any, holding: bool = False) -> list[tuple[str, torch.nn.Module]]:
    """``(attribute, transformer)`` for a transformer itself (named ``"transformer"``) or
    for every transformer a pipeline holds (Wan 2.2 A14B has two): none for a pipeline whose
    transformer is set to None (to free memory), unless ``holding`` (``hyca.enable``: it
    needs one). ``TypeError`` for anything else."""
    if isinstance(target, torch.nn.Module):
        return [(TRANSFORMER_ATTRIBUTES[0], target)]
    found = [(a, getattr(target, a)) for a in TRANSFORMER_ATTRIBUTES if getattr(target, a, None) is not None]
    if found:
        return found
    if not holding and (requests.enabled_through(target) or hasattr(target, TRANSFORMER_ATTRIBUTES[0])):
        return []
    held = f" ({type(target).__name__}.transformer is None)" if hasattr(target, TRANSFORMER_ATTRIBUTES[0]) else ""
    raise TypeError(f"{type(target).__name__} is neither a transformer nor a pipeline with one{held}")


def transformers_of(target: Any) -> list[torch.nn.Module]:
    """The transformer itself, or every transformer a pipeline holds (Wan 2.2 has two)."""
    return [t for _, t in named_transformers(target)]


def _has_experts(target: Any) -> bool:
    config = getattr(target, "config", None)
    return (not isinstance(target, torch.nn.Module) and getattr(target, "transformer_2", None) is not None
            and config is not None and config.get("boundary_ratio") is not None)


def _profile_for(profile: Profile | str, transformer: torch.nn.Module, num_blocks: int, dim: int) -> Profile:
    if isinstance(profile, Profile):
        if profile.metadata.get("target") == "output":  # one "block": the output head's input
            head = head_of(transformer, family_of(transformer))
            if head is None:
                raise ValueError(f"this profile forecasts the output head, which {type(transformer).__name__} does "
                                 "not offer to HyCa; use a residual profile (python -m hyca probe)")
            profile.check_fits(1, head.in_features, type(transformer).__name__)
        elif profile.metadata.get("target") == "model_output":  # one "block": the output channels, checked
            profile.check_fits(1, profile.dim, type(transformer).__name__)  # against the output at step 0
        else:
            profile.check_fits(num_blocks, dim, type(transformer).__name__)
        return profile
    if isinstance(profile, str):
        try:
            return Profile.uniform(profile, num_blocks, dim)
        except ValueError as err:  # neither 'auto' nor a file (those were taken earlier): a solver name, misspelt
            raise ValueError(f"profile={profile!r} is not 'auto', an existing profile file or a solver name: "
                             f"{err}") from None
    raise TypeError(f"profile must be a Profile, 'auto', a profile file, a solver name such as 'fora' or "
                    f"'taylor-2', or a dict of those per transformer attribute ('transformer', "
                    f"'transformer_2'); got {profile!r}")


def _is_profile_file(spec: Any) -> bool:
    return isinstance(spec, os.PathLike) or (isinstance(spec, str) and (
        spec.endswith(".safetensors") or os.path.isfile(spec)))


def _resolve(spec: Any, transformer: torch.nn.Module, make: Callable[[], Profile] | None, run: RunSettings,
             told_settings: bool, per_call: bool = False, pipeline: bool = False) -> Any:
    """Turn ``"auto"`` or a file path into a :class:`Profile`; leave anything else as given.
    ``told_settings``: the caller said what it will run (steps, guidance), so a profile made
    for other settings is replaced by a probe for these. ``per_call``: a pipeline call's
    choice, which its chooser logs (only when it differs from the one ``hyca.enable`` named).
    ``pipeline``: the transformer is a pipeline's, whose calls choose for their own settings."""
    from ...profiles.sources import resolve_profile

    if _is_profile_file(spec):
        return resolve_profile(fingerprint(transformer), path=spec, interval=run.interval).profile
    if spec != AUTO:
        return spec
    nothing = make is not None and _forecasts_nothing(run)
    if nothing:
        make = None  # a probe would have nothing to compare; the engine says every step is computed
    # a diffusers call given no sigmas samples on its scheduler's own schedule
    try:
        resolved = resolve_profile(fingerprint(transformer), run=run, probe=make, probe_if_mismatched=told_settings,
                                   own_sigmas=True)
    except ProfileError:
        if not nothing:
            raise
        # never used to forecast; its chosen_for lets a later call at other settings take or probe its own
        profile = Profile.uniform("reuse", len(blocks_of(transformer, family_of(transformer))), hidden_size(transformer))
        profile.metadata["chosen_for"] = run.to_json()
        profile.source = "none (the schedule forecasts none of the run's steps)"
        return profile
    if not per_call:
        _say_chosen(transformer, resolved.profile, may_change=pipeline)
    if resolved.differences and not nothing:  # (nothing forecast: the profile plays no part; the engine says so)
        # what differs and the path a run takes are said by the engine at the run (RunStats.off_settings)
        path = ("; each pipeline call takes or probes one for its own settings when it runs (docs/requests.md): "
                "pass num_inference_steps= and guidance_scale= to hyca.enable to prepare it now" if make else
                ": a run at these settings takes the off-settings path and says which in hyca.stats; a bare "
                "transformer cannot be probed here: enable HyCa on its pipeline with those settings, or make one "
                "with `python -m hyca probe` (--steps, --guidance-scale, --shift) and pass the file")
        logger.warning("HyCa: the closest profile (%s) was made for other settings (%s)%s",
                       resolved.path or resolved.source, "; ".join(resolved.differences), path)
    return resolved.profile


def _say_chosen(transformer: torch.nn.Module, profile: Profile, may_change: bool) -> None:
    """The enable-time line: which profile, made for which settings, and (``may_change``:
    a pipeline whose calls choose for their own settings) that a call at other settings
    may use another, which its chooser then logs (:mod:`.requests`)."""
    made_for = RunSettings.of_profile(profile.metadata).describe()
    logger.info("HyCa: %s: profile %s, made for %s%s", type(transformer).__name__, profile.source, made_for,
                "; a pipeline call at other settings takes or probes the profile for its own and says so"
                if may_change else "")


def _forecasts_nothing(run: RunSettings) -> bool:
    """Whether HyCa's schedule computes every one of the run's steps (few steps, a long
    warm-up, ``interval=1``); steps not known: the probe's default count."""
    schedule = Schedule(interval=run.interval or 5, warmup=run.warmup or 3,
                        compute_last=run.compute_last is not False)
    return all(schedule.plan(run.steps or PROBE_STEPS))


def _first_use_probe(target: Any, attribute: str, run: RunSettings, probe_kwargs: Mapping[str, Any] | None,
                     from_call: bool = False) -> Callable[[], Profile] | None:
    """A probe for ``profile="auto"`` at the run's settings: only a pipeline can generate,
    and the probe drives the pipeline's main transformer (a bare transformer or Wan 2.2's
    second expert needs a profile from a file or the Hub). ``from_call``: the settings were
    read from a pipeline call, and its steps, guidance and sigmas win over ``probe_kwargs``."""
    if isinstance(target, torch.nn.Module) or attribute != TRANSFORMER_ATTRIBUTES[0]:
        return None

    def make() -> Profile:
        from .probe import probe
        from .settings import guidance_argument

        if parallel.context_parallel(getattr(target, attribute)) is not None:
            raise RuntimeError(
                f"no HyCa profile for {type(getattr(target, attribute)).__name__} yet, and probing one under context "
                "parallelism is not supported (each rank sees a shard). Probe once on one GPU (python -m hyca probe, or "
                "hyca.enable before enable_parallelism) and pass the profile file, or use a solver name "
                "(docs/multi-gpu.md)")
        options: dict[str, Any] = dict(interval=run.interval, warmup=run.warmup, compute_last=run.compute_last,
                                       positions=run.positions)
        told: dict[str, Any] = {}
        if run.steps is not None:
            told["steps"] = run.steps
        if run.guidance_scale is not None:
            told.update(guidance_argument(target, run.guidance_scale))
        if run.sigmas is not None:  # the call's own sigma schedule
            told["sigmas"] = list(run.sigmas)
        options.update({**told, **(probe_kwargs or {}), **(told if from_call else {})})
        if "negative_prompt_embeds" in options:  # given as embeddings: no negative prompt text as well
            options.pop("negative_prompt", None)
        logger.warning("HyCa: no profile for %s at %s yet; probing one (saved to the local cache)",
                       type(getattr(target, attribute)).__name__, run.describe())
        return probe(target, **options)

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
    compute_last: bool | None = None,
    positions: str = "step",
    cache_dtype: torch.dtype | None = None,
    scheduler: Any = None,
    probe_kwargs: Mapping[str, Any] | None = None,
    guard: bool | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
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
    before the switch): ``None`` (the default) computes it unless the profile was chosen
    forecasting it (TaylorSeer lite's end, which the probe may choose: said in :func:`stats`
    as "last step forecast"); ``True`` always computes it; ``False`` computes it only where
    the interval falls on it. ``interval``: one computed step in every N after ``warmup``
    computed steps (:func:`recommended_settings` picks both from the step count).
    ``positions``: ``"step"`` (step index) or ``"sigma"`` (the pipeline's sigma when its
    cache context gives one, else the model's timestep input) as the axis the solvers
    extrapolate along.
    ``scheduler``: where to read the step count for calls made outside any pipeline (a
    hand-written loop); it lets ``compute_last`` find the last step. Inside a pipeline call
    the calling pipeline's current scheduler is read, whichever pipeline shares the
    transformer and whatever scheduler it has now.
    ``guard``: every computed step checks what each solver group would have forecast for
    it; a group that forecast worse than a lower order (``taylor-1``, ``reuse``) at two
    steady checks in a row is switched to it (and back when its own solver wins again),
    and with two guidance branches their difference is checked too; no extra model call
    (:mod:`hyca.engine.guard`). ``None`` (the default): on, except where the probe kept a
    candidate without it (profile metadata ``guard: false``) and the run is at that profile's
    settings; ``True``: on whatever the profile says; ``False``: off, the paper's behaviour.
    Switches show in :func:`stats` (``switches``).
    ``num_inference_steps`` / ``guidance_scale``: the settings you will sample with (the
    classifier-free guidance scale: ``true_cfg_scale`` for FLUX and Qwen-Image, 1 for none;
    as in diffusers' pipelines, a scale up to 1 is no guidance), to prepare their profile now.
    A profile is chosen for one setting; ``"auto"`` prefers one made for yours and, when
    you give them and only profiles for other settings exist, probes one for yours (once;
    cached). On a pipeline every call does the same for its own settings, read from the
    call (steps, guidance, sigmas, the scheduler's shift), and runs with its own state, so
    requests in threads sharing the transformer never mix (``docs/requests.md``); the
    pipeline gets a request subclass of its class, undone by :func:`disable`. Calls with
    gradients enabled or the model in training mode run uncached (inference only). A run that differs from its profile's settings is told so once (log and
    :func:`stats` notes and ``off_settings``) and takes the robust path: every solver group
    starts from a low order and the guard moves it (:mod:`hyca.profiles.off_settings`).
    Enabling again replaces the previous settings. Returns the engine of each transformer.
    """
    if compute_last not in (None, True, False):
        raise ValueError(f"compute_last must be None, True or False, got {compute_last!r}")
    schedule = Schedule(interval=interval, warmup=warmup, compute_last=compute_last is not False,
                        keep_last=compute_last is True)
    cache_dtype = _cache_dtype(cache_dtype)
    _check_run(guard, num_inference_steps, guidance_scale, profile, target)
    if positions not in POSITION_AXES:  # before any profile is looked up or probed
        raise ValueError(f"positions must be one of {POSITION_AXES}, got {positions!r}")
    if scheduler is not None and not hasattr(scheduler, "timesteps"):
        raise ValueError(f"scheduler must be the diffusers scheduler that drives your sampling loop, got {scheduler!r}")
    if probe_kwargs is not None and not isinstance(probe_kwargs, Mapping):
        raise ValueError(f"probe_kwargs must be a dict of hyca.probe arguments, got {probe_kwargs!r}")
    if probe_kwargs and isinstance(target, torch.nn.Module):
        logger.warning("HyCa: probe_kwargs are not used: a bare transformer is never probed (no pipeline to sample "
                       "with); pass a profile file, or enable HyCa on the pipeline")
    elif probe_kwargs:  # its probe may run much later, in a pipeline call
        from .probe import check_probe_kwargs

        check_probe_kwargs(target, dict(probe_kwargs), owned=_OWNED_BY_ENABLE)
        told_steps = probe_kwargs.get("steps")
        if num_inference_steps is not None and told_steps is not None and told_steps != num_inference_steps:
            raise ValueError(f"probe_kwargs steps={told_steps!r} and num_inference_steps={num_inference_steps!r} "
                             "differ: give the steps you sample with once (num_inference_steps=)")
    guidance = None if guidance_scale is None else max(float(guidance_scale), 1.0)  # diffusers guides above 1 only
    steps = None if num_inference_steps is None else int(num_inference_steps)  # numpy integers too
    run = RunSettings(steps=steps, guidance_scale=guidance, interval=interval, warmup=warmup,
                      compute_last=compute_last is not False, positions=positions,
                      shift=schedule_shift(scheduler if scheduler is not None else getattr(target, "scheduler", None)))
    told_settings = num_inference_steps is not None or guidance_scale is not None
    pipeline = None if isinstance(target, torch.nn.Module) else target
    # before any first-use probe: an interval that spans the whole run (each expert sees part of it)
    beyond = schedule.interval_beyond(steps) if steps is not None and not _has_experts(target) else None
    if beyond is not None:
        logger.warning("HyCa: %s (hyca.recommended_settings(pipe, %d) picks one)", beyond, steps)
    engines, choosers = [], []
    for attribute, transformer in named_transformers(target, holding=True):
        _check_not_compiled(transformer, attribute)
        family = family_of(transformer)
        found = hooks.other_cache(transformer)
        if found is not None:
            raise hooks.CacheConflict(hooks.conflict_message(transformer, found, hyca_first=False))
        blocks = blocks_of(transformer, family)
        make = _first_use_probe(target, attribute, run, probe_kwargs)
        # under context parallelism: resolved on the first rank, the same profile on every rank
        spec = _profile_of(profile, attribute)
        chosen = parallel.agree_profile(transformer, lambda: _profile_for(
            _resolve(spec, transformer, make, run, told_settings, pipeline=pipeline is not None), transformer,
            len(blocks), hidden_size(transformer)))
        engine = HybridCache(chosen, schedule, positions, cache_dtype, guard=guard)
        hooks.unregister(transformer)  # enabling again replaces the settings
        with parallel.split_hooks_outside([block for _, block in blocks]):  # HyCa's hooks see the shard
            root = hooks.register(transformer, blocks, engine, family, hooks.Steps(scheduler, pipeline))
        if beyond is not None:
            root.say_once(beyond, said=True)  # its runs note it in their stats, the log has it
        engines.append(engine)
        if pipeline is not None:
            choosers.append(_chooser(pipeline, attribute, spec, engine, schedule, run, probe_kwargs, len(blocks)))
    if pipeline is not None:
        requests.intercept(pipeline, choosers)
    return engines


def _chooser(pipeline: Any, attribute: str, spec: Any, engine: HybridCache, schedule: Schedule, run: RunSettings,
             probe_kwargs: Mapping[str, Any] | None, num_blocks: int) -> requests.Chooser:
    """How each call of ``pipeline`` picks this transformer's profile for its own settings
    (:mod:`.requests`): the told-settings path of :func:`enable`, at the call's settings."""
    options = RunSettings(interval=run.interval, warmup=run.warmup, compute_last=run.compute_last,
                          positions=run.positions)

    def probe_for(call: RunSettings, calling: Any = None) -> Callable[[], Profile] | None:
        sampler = calling if calling is not None else pipeline  # the probe samples with the calling pipeline
        return None if _has_experts(sampler) else _first_use_probe(sampler, attribute, call, probe_kwargs, True)

    def resolve(transformer: torch.nn.Module, make: Callable[[], Profile] | None, call: RunSettings) -> Profile:
        return _profile_for(_resolve(AUTO, transformer, make, call, True, per_call=True), transformer, num_blocks,
                            hidden_size(transformer))

    return requests.Chooser(attribute, spec, engine, schedule, options, probe_for, resolve)


def _cache_dtype(value: Any) -> torch.dtype | None:
    """None (the model's dtype) or a floating dtype; ``"bfloat16"`` and the like are accepted."""
    if isinstance(value, str):
        value = getattr(torch, value.strip(), value)
    if value is None or (isinstance(value, torch.dtype) and value.is_floating_point):
        return value
    raise ValueError(f"cache_dtype must be None (the model's dtype) or a floating dtype such as torch.bfloat16, "
                     f"got {value!r}")


#: probe_kwargs that hyca.enable sets for its probes itself (from its own arguments or the call).
_OWNED_BY_ENABLE = {"interval": "hyca.enable's interval=", "warmup": "hyca.enable's warmup=",
                    "compute_last": "hyca.enable's compute_last=", "positions": "hyca.enable's positions="}


def _check_run(guard: Any, steps: Any, guidance: Any, profile: Any, target: Any) -> None:
    """Settings that would otherwise be taken silently for something else."""
    if guard is not None and not isinstance(guard, bool):
        raise ValueError(f"guard must be True or False (or None: as the profile was chosen), got {guard!r}")
    if steps is not None and (not isinstance(steps, numbers.Integral) or isinstance(steps, bool) or steps < 1):
        raise ValueError(f"num_inference_steps must be a positive integer or None, got {steps!r}")
    if guidance is not None and (isinstance(guidance, bool) or not isinstance(guidance, numbers.Real)
                                 or not math.isfinite(guidance) or guidance < 0):
        raise ValueError(f"guidance_scale must be a number >= 0 (1 = no guidance) or None, got {guidance!r}")
    if isinstance(profile, Mapping):
        names = {attribute for attribute, _ in named_transformers(target, holding=True)}
        unknown = sorted(set(profile) - names)
        if unknown:
            raise KeyError(f"profile has entries for {unknown}, which this target does not have; its transformers "
                           f"are {sorted(names)}")


def _check_not_compiled(transformer: torch.nn.Module, attribute: str) -> None:
    """``torch.compile(model)`` returns a wrapper whose compiled graph would never run
    HyCa's hooks: HyCa has to be enabled on the model itself, before that compile
    (in-place ``model.compile()`` and ``compile_repeated_blocks`` work in either order)."""
    if not isinstance(transformer, torch._dynamo.eval_frame.OptimizedModule):
        return
    model = type(transformer._orig_mod).__name__
    raise RuntimeError(
        f"pipe.{attribute} ({model}) is a torch.compile wrapper (pipe.{attribute} = torch.compile(...)), and its "
        f"compiled graph would not run the hooks hyca.enable adds now. Undo it "
        f"(pipe.{attribute} = pipe.{attribute}._orig_mod), call "
        f"hyca.enable(pipe, ...), then compile: pipe.{attribute}.compile_repeated_blocks() (regional "
        f"compilation, recommended) or pipe.{attribute}.compile() (see docs/compile.md)"
    )


def disable(target: Any) -> None:
    """Remove HyCa: the model computes every step again, bit-identical to an unpatched one,
    and a pipeline has its own class back. Hooks added after HyCa's (offloading) stay in place."""
    for transformer in transformers_of(target):
        hooks.unregister(transformer)
    if not isinstance(target, torch.nn.Module):
        for transformer in requests.replaced(target).values():  # pipe.transformer replaced since hyca.enable
            hooks.unregister(transformer)
            logger.info("HyCa: removed from the %s this pipeline was enabled with (replaced on it since)",
                        type(transformer).__name__)
        requests.release(target)


def reset(target: Any) -> None:
    """Drop the cached state of the calling thread's run and of the transformer's default
    scope (calls outside any pipeline call; also a run another thread left unfinished).
    Rarely needed: a run frees its cache after its last step, every pipeline's
    ``maybe_free_model_hooks`` resets its request's state, and a call that starts another
    generation (new schedule, timestep back up, other input shape) starts clean."""
    for transformer in transformers_of(target):
        hook = hooks.root_hook(transformer)
        if hook is not None:
            hook.reset(default=True)


def stats(target: Any) -> list[RunStats]:
    """Computed and forecast step counts of the calling thread's latest run, per
    transformer (requests running in other threads at the same time have their own; each
    thread sees its own latest); ``notes`` say where HyCa fell back to computing (and why)
    or stayed out of a call (training, gradients). With guidance in separate calls it is
    the stats of the branch that ran last (``branch`` names it, ``describe()`` begins with it):
    both branches compute the same steps, while the guard's switches listed are that
    branch's (the other's are in the log, a line per branch). A transformer put on the
    pipeline after ``hyca.enable`` (``pipe.transformer = other``) runs uncached: its entry
    has no steps and a note that says so."""
    out = []
    swapped = requests.replaced(target) if not isinstance(target, torch.nn.Module) else {}
    held = dict(named_transformers(target))
    for attribute in [*held, *(a for a in swapped if a not in held)]:  # (set to None: in swapped only)
        hook = hooks.root_hook(held[attribute]) if attribute in held else None
        if hook is not None:
            out.append(hook.latest_stats())
        elif attribute in swapped:
            out.append(RunStats(notes=[requests.replaced_note(target, attribute, swapped[attribute])]))
    return out


def is_enabled(target: Any) -> bool:
    """Whether HyCa will cache the next run: its hooks are in every block's forward chain
    (any that another library unwrapped are put back first), they serve this transformer (not
    the original of a ``copy.deepcopy``, which runs uncached) and no other cache is on. False
    for a pipeline that holds no transformer now."""
    transformers = transformers_of(target)
    if not transformers:
        return False
    for transformer in transformers:
        hook = hooks.root_hook(transformer)
        if (hook is None or not hook.serves(hooks._uncompiled(transformer)) or not hook.live(transformer)
                or hooks.other_cache(transformer) is not None):
            return False
    return True
