"""The probe on a diffusers pipeline: a host of the core's closed-loop probe
(:func:`hyca.probing.probe_host`), which records one fully computed low-resolution run and
chooses a :class:`~hyca.profiles.Profile` by running its candidates.

This module only runs the pipeline (or a caller's sampling loop) with an engine hooked
in: the recorder, then each candidate's cache. HyCa's caching hooks, if enabled on the
transformer, are set aside for each run and put back afterwards; the probe's hooks are
removed whatever happens, so the model computes exactly as before.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import threading
import numbers
import operator
from typing import Any, Callable, Iterator, Mapping, Unpack

import torch

from ...engine.schedule import Schedule
from ...probing.probe import CALIBRATION_SAMPLES, CLOSED_LOOP, EQ5, SELECTIONS, ProbeOptions, check_options, probe_host
from ...probing.recorder import SketchRecorder
from ...profiles.profile import Profile
from ...profiles.settings import RunSettings
from . import hooks, sharing
from .families import blocks_of, family_of, head_of, hidden_size
from .fingerprint import fingerprint
from .settings import guidance_of, schedule_shift

#: Two captions, two samples: one sample lets one image's noise decide the profile
#: (bench/results/webui_path.md measured what that costs).
#: The probe's captions unless told (as many as ``hyca.probing.CALIBRATION_SAMPLES``): varied
#: subjects and styles, so that no one image's dynamics decide the choice.
logger = logging.getLogger("hyca")

DEFAULT_PROMPT = ["a photo of a cat", "a watercolor painting of a lighthouse on a cliff at sunset",
                  "a portrait of an old man with a grey beard, studio lighting",
                  "a red sports car on a mountain road in the morning"]
# CLOSED_LOOP / EQ5 / SELECTIONS (how the probe chooses) live in hyca.probing.probe; re-exported
__all__ = ["CLOSED_LOOP", "DEFAULT_PROMPT", "EQ5", "SELECTIONS", "TransformerHost", "output_tensor", "probe",
           "probe_transformer", "recording"]



@contextlib.contextmanager
def _hooked(transformer: torch.nn.Module, engine: Any, steps: int) -> Iterator[Any]:
    """Hook ``engine`` (a :class:`SketchRecorder` or a :class:`HybridCache`) in place of
    HyCa's own for the duration; HyCa's hooks, if enabled, are restored afterwards with the
    same engine and settings. The transformer is the probe's alone meanwhile: it waits for
    the pipeline calls sampling on it, and new ones wait for it (:mod:`.sharing`)."""
    if getattr(transformer, "is_cache_enabled", False):
        raise RuntimeError(f"{type(transformer).__name__} has a diffusers cache enabled; the probe needs "
                           "every step computed: call transformer.disable_cache() first")
    if transformer.training:  # HyCa stays out of training-mode calls: the probe would record none
        raise RuntimeError(f"{type(transformer).__name__} is in training mode, and HyCa (its probe too) runs "
                           "inference only: call .eval() on it before probing or sampling with HyCa")
    family = family_of(transformer)
    blocks = blocks_of(transformer, family)
    with sharing.use_of(transformer).exclusive(type(transformer).__name__):
        previous = hooks.root_hook(transformer)
        if previous is not None and isinstance(previous.engine, SketchRecorder):
            previous = None  # left over from a probe that could not clean up: do not restore it
        hooks.unregister(transformer)
        try:
            # a line per candidate run at DEBUG: the probe logs one summary of them all
            root = hooks.register(transformer, blocks, engine, family, lambda *_: steps, run_log_level=logging.DEBUG)
            root.probing = threading.get_ident()  # calls from other threads meanwhile are refused (HyCaRoot._pre)
            yield root
        finally:
            hooks.unregister(transformer)
            if previous is not None:
                restored = hooks.register(transformer, blocks, previous.engine, previous.family, previous.total_steps)
                restored.told_notes |= previous.told_notes  # what the enabled model said once stays said


@contextlib.contextmanager
def recording(transformer: torch.nn.Module, recorder: SketchRecorder) -> Iterator[None]:
    """Hook ``recorder`` in place of HyCa's engine for the duration (see :func:`_hooked`)."""
    with _hooked(transformer, recorder, recorder.steps) as hook:
        recorder.states = hook.states
        yield


def output_tensor(output: Any) -> torch.Tensor | None:
    """The final sample a run returned, as a float tensor: a tensor; a diffusers output's
    ``images`` / ``frames`` (tensor, array, or list of PIL images / arrays); the first item
    of a tuple. ``None`` when there is nothing to compare (a run that returns nothing)."""
    if output is None:
        return None
    if isinstance(output, torch.Tensor):
        return output.detach().float().cpu()
    for name in ("images", "frames"):
        if hasattr(output, name):
            return output_tensor(getattr(output, name))
    if isinstance(output, tuple) and output:
        return output_tensor(output[0])
    if isinstance(output, list) and output:
        return torch.stack([output_tensor(item) for item in output])
    try:
        import numpy as np

        return torch.from_numpy(np.asarray(output, dtype=np.float32))
    except (TypeError, ValueError):
        return None


def probe_transformer(
    transformer: torch.nn.Module,
    run: Callable[[], Any],
    steps: int,
    interval: int = 5,
    warmup: int = 3,
    compute_last: bool = True,
    settings: dict[str, Any] | None = None,
    guidance_scale: float | None = None,
    chosen_for: RunSettings | None = None,
    target: str | None = None,
    samples: int | None = None,
    **options: Unpack[ProbeOptions],
) -> Profile:
    """Probe ``transformer`` while ``run()`` makes one fully computed generation of
    ``steps`` transformer calls per branch (a hand-written sampling loop, a frontend's
    sampler): :func:`hyca.probing.probe_host` with this transformer as the host
    (:class:`TransformerHost`: each generation is ``run()`` with the engine hooked in).
    The profile is chosen for ``interval``/``warmup``/``compute_last`` and the
    ``positions`` axis, as :func:`hyca.enable` will use them. ``settings``: extra facts for
    the metadata's ``probe`` entry (prompt, resolution, ...). ``guidance_scale``: the run's
    classifier-free guidance scale; above 1 both branches are recorded
    (:mod:`hyca.probing.recorder`). ``selection``: ``"closed-loop"`` (default; ``run``
    must return the final output, the same on every call, e.g. from a fixed seed) or
    ``"eq5"``. ``chosen_for``: the run settings the profile is for (stored as its
    ``chosen_for``; steps and guidance come from the arguments). ``target``: None (the
    closed loop chooses), ``"residual"``, ``"output"`` (the output head's input; needs
    a family with an output head) or ``"model_output"`` (the transformer's output). ``samples``: the number of calibration samples when
    ``run(indices)`` also runs those samples alone, each exactly as in the whole batch (the
    probe then screens candidates on a few; :func:`hyca.probing.selection.screen_for`). ``options``: the other settings, :func:`~hyca.probing.probe_host`'s
    (:class:`~hyca.probing.probe.ProbeOptions`), with its defaults.
    Profiles to be compared by their clustering (a LoRA's against its base model's) must
    share a target."""
    family = family_of(transformer)
    host = TransformerHost(transformer, run, steps, samples)
    if target == "output" and not host.output_head:
        raise ValueError("target='output' needs selection='closed-loop' and a model whose family offers an output "
                         "head (hyca.adapters.diffusers.families)")
    run_settings = RunSettings(steps=steps, guidance_scale=guidance_scale).merged(chosen_for or RunSettings())
    return probe_host(host, run_settings, Schedule(interval=interval, warmup=warmup, compute_last=compute_last),
                      target=target, batched_guidance=family.batched_guidance, fingerprint=fingerprint(transformer),
                      facts=settings, **options)


class TransformerHost:
    """A diffusers transformer as a :class:`~hyca.probing.ProbeHost`: ``sample(engine)``
    is ``run()`` with ``engine`` hooked in place of HyCa's own (:func:`_hooked`)."""

    def __init__(self, transformer: torch.nn.Module, run: Callable[..., Any], steps: int,
                 samples: int | None = None) -> None:
        family = family_of(transformer)
        self.transformer, self.run, self.steps, self.samples = transformer, run, steps, samples
        self.num_blocks = len(blocks_of(transformer, family))
        self.hidden_size = int(hidden_size(transformer))
        self.output_head = head_of(transformer, family) is not None
        self.model_output = True  # the root hook records and replaces any transformer's output

    def sample(self, engine: Any, samples: tuple[int, ...] | None = None) -> torch.Tensor | None:
        """``run()``, or ``run(samples)`` (those calibration samples only; a host made with
        ``samples``) with ``engine`` hooked in."""
        call = self.run if samples is None else (lambda: self.run(samples))
        if engine is None:
            return output_tensor(call())
        with _hooked(self.transformer, engine, self.steps) as hook:
            if isinstance(engine, SketchRecorder):
                engine.states = hook.states
            return output_tensor(call())


@contextlib.contextmanager
def _quiet(pipe: Any) -> Iterator[None]:
    """The pipeline's own progress bar off (the probe shows one), as it was afterwards."""
    missing = object()
    saved = getattr(pipe, "_progress_bar_config", missing)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    try:
        yield
    finally:
        if saved is missing:
            pipe.__dict__.pop("_progress_bar_config", None)
        else:
            pipe._progress_bar_config = saved


def _pixels(name: str, value: Any) -> int:
    """A positive whole number of pixels (numpy integers too), else ``ValueError``."""
    try:
        pixels = operator.index(value) if not isinstance(value, bool) else 0
    except TypeError:
        pixels = 0
    if pixels < 1:
        raise ValueError(f"{name} must be a positive number of pixels, got {value!r}")
    return pixels


#: :func:`probe`'s own settings besides its named ones (:class:`ProbeOptions`); everything
#: else it is given goes to the pipeline call.
PROBE_KEYS = ("compute_last", "rows", "spectral_rows", "n_init", "candidates", "singles", "branch", "accumulate_on",
              "selection", "guard", "on_progress", "target", "tolerance", "halving", "refine")
_NAMED = ("prompt", "height", "width", "steps", "interval", "warmup", "positions", "clusters", "shared", "seed",
          "progress")


def _check_prompt(prompt: Any) -> None:
    if isinstance(prompt, str) and prompt.strip():
        return
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) and p.strip() for p in prompt):
        return
    raise ValueError(f"prompt must be a caption or a non-empty list of captions, got {prompt!r:.80}")


#: Pipeline-call arguments the probe sets itself, and what to give instead.
_SET_BY_PROBE = {"num_inference_steps": "steps=", "generator": "seed="}


def check_probe_kwargs(pipe: Any, kwargs: dict[str, Any], owned: Mapping[str, str] | None = None) -> None:
    """``probe(pipe, **kwargs)``'s arguments checked without running it (``hyca.enable``'s
    ``probe_kwargs``, whose probe may run hours later inside a pipeline call): ``ValueError``
    for one that is neither a probe setting nor an argument of the pipeline's ``__call__``,
    one the probe sets itself, one of ``owned`` (name -> where the caller sets it), and a
    probe setting of the wrong kind (:func:`hyca.probing.probe.check_options`)."""
    for name, instead in {**_SET_BY_PROBE, **(owned or {})}.items():
        if name in kwargs:
            raise ValueError(f"probe_kwargs: {name!r} is set by HyCa itself; use {instead}")
    check_options({k: v for k, v in kwargs.items() if k in PROBE_KEYS or k in _NAMED})
    for name in ("steps", "interval", "warmup"):
        if name in kwargs and (isinstance(kwargs[name], bool) or not isinstance(kwargs[name], numbers.Integral)
                               or kwargs[name] < 1):
            raise ValueError(f"{name} must be a positive integer, got {kwargs[name]!r}")
    transformer = getattr(pipe, "transformer", None)
    clusters = kwargs.get("clusters")
    if clusters is not None and isinstance(transformer, torch.nn.Module) and clusters > hidden_size(transformer):
        raise ValueError(f"clusters ({clusters}) must be at most the hidden size ({hidden_size(transformer)}): "
                         "a cluster is a group of feature dimensions")
    for name in ("height", "width"):
        if kwargs.get(name) is not None:
            _pixels(name, kwargs[name])
    if kwargs.get("prompt") is not None:
        _check_prompt(kwargs["prompt"])
    parameters = inspect.signature(type(pipe).__call__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return  # the pipeline takes any keyword: it checks them itself
    unknown = [k for k in kwargs if k not in _NAMED and k not in PROBE_KEYS and k not in parameters]
    if unknown:
        raise ValueError(f"probe_kwargs: {unknown[0]!r} is neither a hyca.probe setting "
                         f"({', '.join(_NAMED + PROBE_KEYS)}) nor an argument of {type(pipe).__name__}.__call__")


def probe(
    pipe: Any,
    prompt: str | list[str] | None = None,
    height: int | None = None,
    width: int | None = None,
    steps: int = 28,
    interval: int = 5,
    warmup: int = 3,
    positions: str = "step",
    clusters: int = 4,
    shared: bool = False,
    seed: int = 0,
    progress: bool = True,
    **options: Any,
) -> Profile:
    """Probe a diffusers pipeline: one fully computed ``height`` x ``width`` generation of
    ``prompt`` in ``steps`` steps (latents only, no decoding), recorded and analysed into
    a :class:`Profile` for ``hyca.enable(pipe, profile, interval=interval, warmup=warmup,
    positions=positions)``; then, by default, the choice is validated closed loop: a
    cached run of the same prompt and seed per candidate assignment (every single solver
    of the pool, eq. 5's, and refinements), the nearest to full compute kept
    (:mod:`hyca.probing.closed_loop`). Run it at the settings you sample with: step count,
    guidance (``guidance_scale`` / ``true_cfg_scale`` with a ``negative_prompt``), N,
    warm-up; the profile records them (``chosen_for``) and ``hyca.enable`` prefers a
    profile made for the run's settings.

    Defaults: ``prompt`` :data:`DEFAULT_PROMPT` (four captions; one caption given is sampled
    under ``hyca.probing.CALIBRATION_SAMPLES`` noises unless ``latents`` are given) at 256 x 256, latent output, unless the
    pipeline names its own in a ``hyca_probe_defaults`` dict (the shipped reference model
    does: captions it knows, its 32 x 32 pixels).

    ``options``: settings of :func:`probe_transformer` (``compute_last``, ``rows``,
    ``spectral_rows``, ``n_init``, ``candidates``, ``singles``, ``branch``, ``accumulate_on``,
    ``selection``, ``guard``, ``target``, ``on_progress``, ``tolerance``, ``halving``, ``refine``); a list of
    prompts with per-sample ``latents`` lets the probe screen candidates on a few of them
    (successive halving); everything else goes to the
    pipeline call (e.g. ``guidance_scale``, or ``prompt_embeds`` instead of a prompt).
    """
    own = dict(getattr(pipe, "hyca_probe_defaults", None) or {})
    given = {"prompt": prompt, "height": height, "width": width}
    fallback = {"prompt": DEFAULT_PROMPT, "height": 256, "width": 256}
    prompt, height, width = (v if v is not None else own.get(k, fallback[k]) for k, v in given.items())
    height, width = (_pixels(name, value) for name, value in (("height", height), ("width", width)))
    options = {**{k: v for k, v in own.items() if k not in given}, **options}
    check_probe_kwargs(pipe, {**options, "steps": steps, "interval": interval, "warmup": warmup, "clusters": clusters,
                              "shared": shared, "seed": seed, "positions": positions})
    steps, interval, warmup, clusters, seed = (int(v) for v in (steps, interval, warmup, clusters, seed))  # numpy ints
    probe_options = {k: options.pop(k) for k in PROBE_KEYS if k in options}
    call = {"output_type": "latent", **options}
    if "prompt_embeds" not in call:
        _check_prompt(prompt)
        # one caption: sampled under CALIBRATION_SAMPLES noises (one noise alone lets it decide)
        alone = isinstance(prompt, str) and "latents" not in call and call.get("num_images_per_prompt", 1) == 1
        call["prompt"] = [prompt] * CALIBRATION_SAMPLES if alone else prompt
        if isinstance(prompt, list) and len(prompt) * call.get("num_images_per_prompt", 1) < CALIBRATION_SAMPLES:
            logger.warning("HyCa probe: %d calibration sample(s) (the captions given, one noise each); the default "
                           "scores every candidate on %d, which carries over to other captions better (a single "
                           "caption string is sampled under %d noises)", len(prompt), CALIBRATION_SAMPLES,
                           CALIBRATION_SAMPLES)
    transformer = getattr(pipe, "transformer", None)
    if not isinstance(transformer, torch.nn.Module):
        raise TypeError(f"{type(pipe).__name__} has no transformer to probe; for a bare transformer and "
                        "your own sampling loop use hyca.adapters.diffusers.probe.probe_transformer")
    settings = {"prompt": prompt if "prompt_embeds" not in call else None, "height": height, "width": width}
    guidance = guidance_of(pipe, call)
    if guidance is not None:
        settings["guidance_scale"] = guidance
    sigmas = call.get("sigmas")
    chosen_for = RunSettings(steps=steps, guidance_scale=guidance, shift=schedule_shift(getattr(pipe, "scheduler", None)),
                             sigmas=tuple(float(s) for s in sigmas) if sigmas is not None else None)

    samples = _separable(call)

    def run(indices: tuple[int, ...] | None = None) -> Any:
        generator = torch.Generator().manual_seed(seed)
        return pipe(height=height, width=width, num_inference_steps=steps, generator=generator,
                    **(call if indices is None else _subset(call, indices)))

    with _quiet(pipe):
        return probe_transformer(transformer, run, steps, interval=interval, warmup=warmup, positions=positions,
                                 clusters=clusters, shared=shared, seed=seed, progress=progress,
                                 settings=settings, guidance_scale=guidance, chosen_for=chosen_for,
                                 samples=samples, **probe_options)


#: Per-sample arguments of a pipeline call, batch first; a call whose samples all come from
#: these (the noise given as ``latents``, so no generator draws it for the whole batch) can
#: run a subset of its samples, each as it runs in the whole batch.
_PER_SAMPLE = ("prompt", "latents", "negative_prompt")


def _separable(call: dict[str, Any]) -> int | None:
    """The number of samples when ``call`` can be split into them (a list of prompts with
    their own ``latents``, nothing else batched), else None."""
    prompts, latents = call.get("prompt"), call.get("latents")
    if not isinstance(prompts, list) or not isinstance(latents, torch.Tensor) or len(prompts) < 2:
        return None
    if latents.shape[0] != len(prompts) or "prompt_embeds" in call or call.get("num_images_per_prompt", 1) != 1:
        return None
    negative = call.get("negative_prompt")
    if negative is not None and not isinstance(negative, str) and not (isinstance(negative, list)
                                                                       and len(negative) == len(prompts)):
        return None
    return len(prompts)


def _subset(call: dict[str, Any], indices: tuple[int, ...]) -> dict[str, Any]:
    """``call`` with its per-sample arguments cut to ``indices`` (latents cloned: a pipeline
    may write into them)."""
    out = dict(call)
    for key in _PER_SAMPLE:
        value = call.get(key)
        if isinstance(value, torch.Tensor):
            out[key] = value[list(indices)].clone()
        elif isinstance(value, list):
            out[key] = [value[i] for i in indices]
    return out
