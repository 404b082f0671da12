"""Full compute and HyCa side by side: same model, prompt and seed, one request.

Both runs happen while the caller holds the model's lock, so the wall-clock times are
measured back to back on the same machine state and no other session's hooks are
present. Transformer FLOPs are counted with ``torch.utils.flop_counter`` in a separate,
untimed pass (counting slows every operation), once per setting: they depend on the
schedule and the shapes, not on the prompt or the seed.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from .. import disable, enable, stats
from ..engine.cache import RunStats
from ..profiles.profile import Profile
from .metrics import psnr, ssim
from .models import LoadedModel, ModelError

#: The methods the app compares, all run by the same engine: a probed profile, or one solver everywhere.
METHODS = {"HyCa": None, "FORA": "fora", "TaylorSeer": "taylor-2"}

Progress = Callable[[float, str], None]


@dataclass(frozen=True)
class Settings:
    prompt: str
    seed: int
    steps: int
    height: int
    width: int
    guidance: float | None = None
    method: str = "HyCa"
    interval: int = 5
    warmup: int = 3
    lora: str = "none"


@dataclass
class SideBySide:
    full: np.ndarray  # (H, W, 3) float in [0, 1]
    fast: np.ndarray
    full_seconds: float
    fast_seconds: float
    full_flops: int
    fast_flops: int
    run: RunStats
    psnr: float
    ssim: float

    @property
    def speedup(self) -> float:
        return self.full_seconds / self.fast_seconds if self.fast_seconds else float("nan")

    @property
    def flops_ratio(self) -> float:
        """How many times fewer transformer FLOPs HyCa needed."""
        return self.full_flops / self.fast_flops if self.fast_flops else float("nan")


def method_profile(method: str, profile: Profile | None) -> Profile | str:
    """What ``hyca.enable`` gets for ``method``: the probed profile for HyCa, else a solver name."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    if METHODS[method] is not None:
        return METHODS[method]
    if profile is None:
        raise ValueError("HyCa needs a profile: run the probe first (Profile panel)")
    return profile


def apply_lora(model: LoadedModel, lora: str) -> None:
    """Switch the shared pipeline to ``lora`` ("none" turns LoRAs off); caller holds the lock."""
    if lora in (None, "", "none"):
        if model.loras:
            model.pipe.disable_lora()
        return
    if lora not in model.loras:
        offered = ", ".join(model.loras) or "none (LoRAs are shipped for the reference model only)"
        raise ModelError(f"LoRA {lora!r} is not available for {model.choice.label}; available: {offered}")
    model.pipe.enable_lora()
    model.pipe.set_adapters([lora])


def _call_kwargs(s: Settings) -> dict[str, Any]:
    kwargs = dict(prompt=s.prompt, num_inference_steps=s.steps, height=s.height, width=s.width,
                  generator=torch.Generator().manual_seed(s.seed), output_type="np")
    if s.guidance is not None:
        kwargs["guidance_scale"] = s.guidance
    return kwargs


def generate(pipe: Any, s: Settings) -> np.ndarray:
    """One image as (H, W, 3) floats in [0, 1]."""
    images = pipe(**_call_kwargs(s)).images
    return np.asarray(images[0], dtype=np.float32)


def report_calls(transformer: torch.nn.Module, total: int, label: str, progress: Progress | None):
    """A forward pre-hook that reports each transformer call to ``progress``; returns its handle."""
    calls = [0]

    def report(*_: Any) -> None:
        calls[0] += 1
        if progress is not None:
            progress(min(calls[0] / total, 1.0), f"{label}: step {min(calls[0], total)}/{total}")

    return transformer.register_forward_pre_hook(report)


def _timed(pipe: Any, s: Settings, label: str, progress: Progress | None) -> tuple[np.ndarray, float]:
    handle = report_calls(pipe.transformer, s.steps, label, progress)
    try:
        started = time.perf_counter()
        image = generate(pipe, s)
        return image, time.perf_counter() - started
    finally:
        handle.remove()


def transformer_flops(pipe: Any, s: Settings) -> int:
    """FLOPs spent inside the transformer during one generation (matrix products and attention)."""
    with FlopCounterMode(display=False) as counter:
        generate(pipe, s)
    return int(sum(counter.get_flop_counts().get(type(pipe.transformer).__name__, {}).values()))


def profile_digest(profile: Profile | str) -> str:
    if isinstance(profile, str):
        return profile
    h = hashlib.sha256(profile.labels.numpy().tobytes())
    h.update(profile.solvers.numpy().tobytes())
    return h.hexdigest()[:16]


_FLOPS: dict[tuple, tuple[int, int]] = {}
_FLOPS_LOCK = threading.Lock()


def _counted_flops(model: LoadedModel, s: Settings, profile: Profile | str) -> tuple[int, int]:
    """(full, accelerated) transformer FLOPs for these settings, counted once and remembered."""
    key = (model.choice.key, s.lora, s.steps, s.height, s.width, s.guidance, s.interval, s.warmup,
           profile_digest(profile))
    with _FLOPS_LOCK:
        if key in _FLOPS:
            return _FLOPS[key]
    with _unsaid():  # the timed run of the same settings said it all already (once, as promised)
        full = transformer_flops(model.pipe, s)
        enable(model.pipe, profile, interval=s.interval, warmup=s.warmup)
        try:
            fast = transformer_flops(model.pipe, s)
        finally:
            disable(model.pipe)
    with _FLOPS_LOCK:
        _FLOPS[key] = (full, fast)
    return full, fast


@contextlib.contextmanager
def _unsaid() -> Iterator[None]:
    """HyCa's log lines from this thread dropped meanwhile (other threads' requests keep theirs)."""
    me = threading.get_ident()

    def drop(record: logging.LogRecord) -> bool:
        return record.thread != me

    hyca_log = logging.getLogger("hyca")
    hyca_log.addFilter(drop)
    try:
        yield
    finally:
        hyca_log.removeFilter(drop)


def side_by_side(model: LoadedModel, s: Settings, profile: Profile | None = None,
                 progress: Progress | None = None) -> SideBySide:
    """Full compute and ``s.method`` with the same seed, timed in turn (which one first
    alternates between requests); the caller must hold ``model.lock``."""
    chosen = method_profile(s.method, profile)
    pipe = model.pipe
    apply_lora(model, s.lora)
    if not model.warm:  # the first call of a fresh model pays one-off costs: keep them untimed
        generate(pipe, replace(s, steps=1))
        model.warm = True
    # the run timed second was measured faster even where both runs do the same work: the
    # order alternates between requests, so neither side always has it
    fast_first, model.compared = model.compared % 2 == 1, model.compared + 1
    if not fast_first:
        full, full_s = _timed(pipe, s, "full compute", progress)
    enable(pipe, chosen, interval=s.interval, warmup=s.warmup)
    try:
        fast, fast_s = _timed(pipe, s, s.method, progress)
        run = stats(pipe)[0]
    finally:
        disable(pipe)
    if fast_first:
        full, full_s = _timed(pipe, s, "full compute", progress)
    if progress is not None:
        progress(1.0, "counting FLOPs")
    full_flops, fast_flops = _counted_flops(model, s, chosen)
    return SideBySide(full, fast, full_s, fast_s, full_flops, fast_flops, run, psnr(fast, full), ssim(fast, full))


def upscale(image: np.ndarray, target: int = 256) -> np.ndarray:
    """Nearest-neighbour enlargement (whole pixels, no smoothing) to at least ``target`` pixels
    on the longer side, as uint8 for display; larger images are returned as they are."""
    factor = max(1, target // max(image.shape[0], image.shape[1]))
    big = np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)
    return np.clip(np.round(big * 255), 0, 255).astype(np.uint8)
