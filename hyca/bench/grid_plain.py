"""The settings grid's default row, :data:`~hyca.bench.grid.HYCA`: HyCa as a user gets it,
``hyca.enable(pipe, interval=N, warmup=W)`` and nothing told, its first call probing for the
cell's settings on a profile cache of its own (:mod:`hyca.bench.grid`)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import hyca

if TYPE_CHECKING:
    from .grid import Method

HYCA = "HyCa"


def plain_call(interval: int, warmup: int, first_call: Callable[[], Any]) -> Method:
    """:data:`HYCA`: ``hyca.enable(pipe, interval=, warmup=)`` with an empty profile cache of
    its own (``HYCA_CACHE``, removed after), so its first call probes at the cell's settings
    as a user's first call at new settings does. ``first_call`` makes that call (a
    calibration caption at the cell's settings) before the held-out batches, whose FLOPs
    must not count the probe's. The row's info names what that probe chose."""
    kept: dict[str, Any] = {}
    info: dict[str, Any] = {"call": f"hyca.enable(pipe, interval={interval}, warmup={warmup})"}

    def enable(pipe: Any) -> None:
        kept["cache"], kept["env"] = tempfile.mkdtemp(prefix="hyca-grid-cache-"), os.environ.get("HYCA_CACHE")
        os.environ["HYCA_CACHE"] = kept["cache"]
        hyca.enable(pipe, interval=interval, warmup=warmup)
        first_call()
        info.update(_probed(Path(kept["cache"])))

    def disable(pipe: Any) -> None:
        hyca.disable(pipe)
        if kept["env"] is None:
            os.environ.pop("HYCA_CACHE", None)
        else:
            os.environ["HYCA_CACHE"] = kept["env"]
        shutil.rmtree(kept["cache"], ignore_errors=True)

    from .grid import Method  # noqa: F811 (at run time: grid imports this module)

    return Method(HYCA, enable, disable, info=info)


def _probed(cache: Path) -> dict[str, Any]:
    """What the plain call's first-use probe saved in ``cache``: its choice, trials, seconds."""
    from ..profiles.io import load_profile

    found = sorted(cache.rglob("*.safetensors"))
    if not found:
        return {}
    metadata = load_profile(found[0]).metadata
    report = metadata.get("selection", {}).get("closed_loop", {})
    return {"closed_loop_choice": report.get("chosen"), "closed_loop_trials": report.get("trials", []),
            "probe_seconds": round(sum(v for k, v in metadata.get("timing", {}).items() if k.endswith("_s")), 2)}


def plain_row(work: Any, cell: tuple, settings: Any) -> Any:
    """The plain call for ``cell`` (steps, guidance, shift, N) of a grid ``work``load."""
    steps, guidance, _, interval = cell

    def first_call() -> None:
        work.pipe(work.calibration[:1], num_inference_steps=steps, guidance_scale=guidance,
                  latents=work.calibration_latents[:1].clone(), output_type="pt")

    return plain_call(interval, settings.warmup, first_call)
