"""One small adapter per method: how to switch it on for a pipeline, and off again.

A :class:`Method` is a setting of one family (``"HyCa"``, ``"diffusers MagCache"``, ...):
``enable(pipe)`` before a generation, ``disable(pipe)`` after, and ``steps(requested)``
the step count it runs (only the step-reduction baseline changes it). Families whose
speed is set by a threshold (FirstBlockCache, MagCache, DBCache) are built from that
threshold by a factory, so :mod:`hyca.bench.calibrate` can search it for a FLOPs target.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

import hyca

# Families, in table order. "ours" marks solvers run by HyCa's own engine with a one-solver profile.
FULL = "full compute"
STEPS = "fewer steps"
FORA = "FORA (ours)"
TAYLOR_1 = "TaylorSeer-1 (ours)"
TAYLOR_2 = "TaylorSeer-2 (ours)"
DIFFUSERS_TAYLOR = "diffusers TaylorSeer"
DIFFUSERS_FBCACHE = "diffusers FirstBlockCache"
DIFFUSERS_MAGCACHE = "diffusers MagCache"
DBCACHE = "cache-dit DBCache"
DBCACHE_TAYLOR = "cache-dit DBCache+TaylorSeer"
HYCA = "HyCa"
HYCA_SIGMA = "HyCa (sigma axis)"

WARMUP = 3  # computed warm-up steps, the same for every method that has the setting


@dataclass
class Method:
    """One setting of one family. ``level``: the HyCa interval whose FLOPs it is matched to."""

    family: str
    setting: str
    enable: Callable[[Any], None] = lambda pipe: None
    disable: Callable[[Any], None] = lambda pipe: None
    steps: Callable[[int], int] = lambda requested: requested
    level: int | None = None
    note: str = ""
    knob: float | None = None
    extra: dict = field(default_factory=dict)
    # Threshold-driven: which steps it skips depends on the prompt, so are its FLOPs.
    # A fixed schedule's FLOPs do not (same steps, same token counts), so counting it on
    # one prompt is exact for all.
    adaptive: bool = False

    @property
    def name(self) -> str:
        return f"{self.family} [{self.setting}]" if self.setting else self.family

    @property
    def key(self) -> str:
        """Unique within a run: a threshold search can land on one setting at two levels."""
        return self.name if self.level is None else f"{self.name} @ N={self.level}"


def full() -> Method:
    return Method(FULL, "")


def fewer_steps(steps: int, level: int | None = None) -> Method:
    return Method(STEPS, f"{steps} steps", steps=lambda requested: steps, level=level, knob=steps)


# --- HyCa's own engine: FORA, TaylorSeer, HyCa ----------------------------------------------


def engine(family: str, profile: Any, interval: int, positions: str = "step") -> Method:
    """HyCa's engine with ``profile`` (a probed Profile, or a solver name for FORA/TaylorSeer)."""

    def enable(pipe: Any) -> None:
        hyca.enable(pipe, profile=profile, interval=interval, warmup=WARMUP, positions=positions)

    return Method(family, f"N={interval}", enable, hyca.disable, level=interval, knob=interval,
                  extra={"positions": positions})


def fora(interval: int) -> Method:
    return engine(FORA, "fora", interval)


def taylor(order: int, interval: int) -> Method:
    return engine(TAYLOR_1 if order == 1 else TAYLOR_2, f"taylor-{order}", interval)


# --- diffusers' own caches ------------------------------------------------------------------


def _diffusers(family: str, setting: str, make_config: Callable[[], Any], **kwargs: Any) -> Method:
    def enable(pipe: Any) -> None:
        pipe.transformer.enable_cache(make_config())

    def disable(pipe: Any) -> None:
        pipe.transformer.disable_cache()

    return Method(family, setting, enable, disable, **kwargs)


def diffusers_taylorseer(interval: int, order: int = 1) -> Method:
    """Lite mode: blocks skipped, the transformer's output projection forecast — the mode
    whose skip steps save the whole stack, as FORA/TaylorSeer/HyCa do. (The default mode
    forecasts attention outputs only and still runs every MLP, so it cannot reach 3x.)
    Factors in float32: bfloat16 factors would add rounding error HyCa does not have."""
    from diffusers import TaylorSeerCacheConfig

    return _diffusers(
        DIFFUSERS_TAYLOR, f"N={interval}, order {order}, lite",
        lambda: TaylorSeerCacheConfig(cache_interval=interval, disable_cache_before_step=WARMUP,
                                      max_order=order, taylor_factors_dtype=torch.float32, use_lite_mode=True),
        level=interval, knob=interval)


def first_block_cache(threshold: float) -> Method:
    from diffusers import FirstBlockCacheConfig

    return _diffusers(DIFFUSERS_FBCACHE, f"threshold={threshold:.4g}",
                      lambda: FirstBlockCacheConfig(threshold=threshold), knob=threshold, adaptive=True)


# MagCache's defaults (retention 0.2, at most 3 skips in a row) cap it near 2.5x at 50
# steps; to reach 3-6x it gets the same 3 computed warm-up steps as everyone else and up
# to 12 skips in a row, and its threshold is searched.
MAG_MAX_SKIPS = 12


def mag_cache(threshold: float, ratios: list[float], steps: int) -> Method:
    from diffusers import MagCacheConfig

    retention = (WARMUP - 0.5) / steps  # int(ratio * steps + 0.5) == WARMUP
    return _diffusers(
        DIFFUSERS_MAGCACHE, f"threshold={threshold:.4g}",
        lambda: MagCacheConfig(threshold=threshold, max_skip_steps=MAG_MAX_SKIPS, retention_ratio=retention,
                               num_inference_steps=steps, mag_ratios=torch.tensor(ratios)),
        knob=threshold, adaptive=True)


def calibrate_mag_ratios(pipe: Any, run: Callable[[], Any], steps: int) -> list[float]:
    """MagCache's own calibration (``MagCacheConfig(calibrate=True)``): one fully computed
    run; diffusers prints the per-step magnitude ratios at its end, which we read back."""
    from diffusers import MagCacheConfig

    pipe.transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=steps))
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            run()
    finally:
        pipe.transformer.disable_cache()
    lines = [line for line in printed.getvalue().splitlines() if line.strip().startswith("[")]
    if not lines:
        raise RuntimeError("MagCache calibration printed no ratios; diffusers' MagCache output format changed?")
    ratios = [float(v) for v in lines[-1].strip().strip("[]").split(",")]
    if len(ratios) != steps:
        raise RuntimeError(f"MagCache calibration gave {len(ratios)} ratios for {steps} steps")
    return ratios


# --- cache-dit ------------------------------------------------------------------------------


def cache_dit_available() -> str | None:
    """None when cache-dit imports, else why not (it is an optional benchmark dependency)."""
    os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "error")  # it logs every enable/disable otherwise
    try:
        import cache_dit  # noqa: F401
    except Exception as error:  # any import failure means "skip it", with the reason shown
        return (f"cache-dit not importable ({type(error).__name__}: {error}): pip install \"hyca[bench]\" "
                "(in a source checkout: pip install -e \".[bench]\")")
    return None


# cache-dit patches the transformer it is given for good: its forward is replaced and its
# block lists are re-registered in another order, which breaks diffusers' own caches
# (they take the first registered block list as the head). So cache-dit gets its own
# copy of the transformer, made once per model and swapped in only while it runs.
# The original is kept in the value so that its id is never reused for another model.
_cache_dit_copies: dict[int, tuple[torch.nn.Module, torch.nn.Module]] = {}


def _swap_in_copy(pipe: Any) -> None:
    original = pipe.transformer
    if id(original) not in _cache_dit_copies:
        _cache_dit_copies[id(original)] = (original, copy.deepcopy(original))
    pipe._bench_original_transformer = original
    pipe.transformer = _cache_dit_copies[id(original)][1]


def forget_copies() -> None:
    """Drop cache-dit's transformer copies (the benchmark calls this after each measurement)."""
    _cache_dit_copies.clear()


def _swap_back(pipe: Any) -> None:
    pipe.transformer = pipe.__dict__.pop("_bench_original_transformer")


def dbcache(threshold: float, steps: int, taylorseer: bool = False) -> Method:
    """DBCache F1B0 (the first block always computed, as cache-dit recommends for speed),
    3 computed warm-up steps, no cap on cached steps; optionally its TaylorSeer calibrator
    (order 1, cache-dit's default)."""

    def enable(pipe: Any) -> None:
        import cache_dit

        quiet_cache_dit()
        config = cache_dit.DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=threshold,
                                         max_warmup_steps=WARMUP, num_inference_steps=steps)
        calibrator = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=1) if taylorseer else None
        _swap_in_copy(pipe)
        cache_dit.enable_cache(pipe.transformer, cache_config=config, calibrator_config=calibrator)

    def disable(pipe: Any) -> None:
        import cache_dit

        try:
            cache_dit.disable_cache(pipe.transformer)
        finally:
            _swap_back(pipe)

    family = DBCACHE_TAYLOR if taylorseer else DBCACHE
    return Method(family, f"F1B0, threshold={threshold:.4g}", enable, disable, knob=threshold, adaptive=True)


def quiet_cache_dit() -> None:
    """cache-dit logs every enable/disable at INFO/WARNING; its loggers live under "CACHE_DIT"."""
    for name in list(logging.root.manager.loggerDict):
        if name.upper().startswith("CACHE_DIT"):
            logging.getLogger(name).setLevel(logging.ERROR)
