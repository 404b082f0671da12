"""The probe on a diffusers pipeline: one fully computed low-resolution run -> a
:class:`~hyca.profiles.Profile`.

Record (sketches of every block's residual, through HyCa's own hooks), then analyse:
indicators -> k-means labels -> per-cluster solver with the least error when the run is
replayed under the schedule the profile is for. HyCa's caching hooks, if enabled on the
transformer, are set aside for the run and put back afterwards; the recording hooks are
removed whatever happens, so the model computes exactly as before.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import time
from typing import Any, Callable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from ...engine.schedule import Schedule
from ...math.solvers import POOL_VERSION
from ...probing.analysis import analyse, candidate_solvers
from ...probing.recorder import SketchRecorder
from ...profiles.profile import Profile
from . import hooks
from .families import blocks_of, family_of
from .fingerprint import fingerprint

DEFAULT_PROMPT = "a photo of a cat"


@contextlib.contextmanager
def recording(transformer: torch.nn.Module, recorder: SketchRecorder) -> Iterator[None]:
    """Hook ``recorder`` in place of HyCa's engine for the duration; HyCa's own hooks, if
    enabled, are restored afterwards with the same engine and settings."""
    if getattr(transformer, "is_cache_enabled", False):
        raise RuntimeError(f"{type(transformer).__name__} has a diffusers cache enabled; the probe needs "
                           "every step computed: call transformer.disable_cache() first")
    family = family_of(transformer)
    blocks = blocks_of(transformer, family)
    previous = hooks.root_hook(transformer)
    if previous is not None and isinstance(previous.engine, SketchRecorder):
        previous = None  # left over from a probe that could not clean up: do not restore it
    hooks.unregister(transformer)
    try:
        hooks.register(transformer, blocks, recorder, family, lambda *_: recorder.steps)
        recorder.states = hooks.root_hook(transformer).states
        yield
    finally:
        hooks.unregister(transformer)
        if previous is not None:
            hooks.register(transformer, blocks, previous.engine, previous.family, previous.total_steps)


def probe_transformer(
    transformer: torch.nn.Module,
    run: Callable[[], Any],
    steps: int,
    interval: int = 5,
    warmup: int = 3,
    compute_last: bool = True,
    positions: str = "step",
    clusters: int = 4,
    shared: bool = False,
    seed: int = 0,
    rows: int = 8,
    spectral_rows: int | None = 2,
    n_init: int = 1,
    candidates: Sequence[str] | None = None,
    branch: str = "cond",
    progress: bool = True,
    settings: dict[str, Any] | None = None,
    accumulate_on: str | torch.device | None = "cpu",
) -> Profile:
    """Probe ``transformer`` while ``run()`` makes one fully computed generation of
    ``steps`` transformer calls per branch (a hand-written sampling loop, a frontend's
    sampler). The profile is chosen for ``interval``/``warmup``/``compute_last`` and the
    ``positions`` axis, as :func:`hyca.enable` will use them; ``clusters`` per block (or
    shared by all blocks), k-means seeded by ``seed``; sketches of ``rows`` rows (the
    spectral indicators use the first ``spectral_rows``). ``settings``: extra facts for the
    metadata's ``probe`` entry (prompt, resolution, ...). ``accumulate_on``: where the
    recording's running sums live, ``"cpu"`` or None for the residuals' device."""
    schedule = Schedule(interval=interval, warmup=warmup, compute_last=compute_last)
    blocks = blocks_of(transformer, family_of(transformer))
    with tqdm(total=steps, desc="HyCa probe", unit="step", disable=not progress) as bar:
        recorder = SketchRecorder(len(blocks), steps, schedule, positions, rows, spectral_rows, seed, branch,
                                  candidate_solvers(candidates), bar, accumulate_on)
        started = time.perf_counter()
        with recording(transformer, recorder):
            run()
        recorded = time.perf_counter()
        indicator_values, replay = recorder.finish()
        profile, report = analyse(indicator_values, replay, clusters, shared, seed, n_init)
        analysed = time.perf_counter()
    profile.metadata = {
        "method": "hyca",
        "fingerprint": fingerprint(transformer),
        "interval": interval,
        "warmup": warmup,
        "compute_last": compute_last,
        "positions": positions,
        "probe": {**(settings or {}), "steps": steps, "clusters": clusters, "shared": shared, "seed": seed,
                  "rows": rows, "spectral_rows": spectral_rows, "n_init": n_init, "branch": branch},
        "pool_version": POOL_VERSION,
        "hyca_version": _version(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "selection": report,
        "timing": {"record_s": round(recorded - started, 3), "analysis_s": round(analysed - recorded, 3)},
    }
    return profile


def _version() -> str:
    from ... import __version__

    return __version__


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


def probe(
    pipe: Any,
    prompt: str | None = DEFAULT_PROMPT,
    height: int = 256,
    width: int = 256,
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
    positions=positions)``.

    ``options``: settings of :func:`probe_transformer` (``compute_last``, ``rows``,
    ``spectral_rows``, ``n_init``, ``candidates``, ``branch``, ``accumulate_on``); everything else goes to
    the pipeline call (e.g. ``guidance_scale``, or ``prompt_embeds`` instead of a prompt).
    """
    probe_keys = ("compute_last", "rows", "spectral_rows", "n_init", "candidates", "branch", "accumulate_on")
    probe_options = {k: options.pop(k) for k in probe_keys if k in options}
    call = {"output_type": "latent", **options}
    if "prompt_embeds" not in call:
        call["prompt"] = prompt
    transformer = getattr(pipe, "transformer", None)
    if not isinstance(transformer, torch.nn.Module):
        raise TypeError(f"{type(pipe).__name__} has no transformer to probe; for a bare transformer and "
                        "your own sampling loop use hyca.probing.probe_transformer")
    settings = {"prompt": prompt if "prompt_embeds" not in call else None, "height": height, "width": width}

    def run() -> None:
        generator = torch.Generator().manual_seed(seed)
        pipe(height=height, width=width, num_inference_steps=steps, generator=generator, **call)

    with _quiet(pipe):
        return probe_transformer(transformer, run, steps, interval=interval, warmup=warmup, positions=positions,
                                 clusters=clusters, shared=shared, seed=seed, progress=progress,
                                 settings=settings, **probe_options)
