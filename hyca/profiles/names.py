"""Profile file names: which model and which settings a file is for, read off its name."""

from __future__ import annotations

from typing import Any, Mapping


def profile_filename(fp: Mapping[str, Any], interval: int | None = None, settings: Any = None) -> str:
    """``<Class>-<config hash 12>.safetensors``; ``-n<N>`` before the suffix for a profile
    chosen for one interval among several of the same model, then the settings' tag
    (:meth:`hyca.profiles.settings.RunSettings.tag`, e.g. ``-w3-s28-g2.5``) for one chosen
    for one sampling setting."""
    name = f"{fp['class']}-{str(fp['config_sha256'])[:12]}"
    if interval is not None:
        name += f"-n{int(interval)}"
    tag = settings.tag() if settings is not None else ""
    return f"{name}-{tag}.safetensors" if tag else f"{name}.safetensors"


def model_prefix(fp: Mapping[str, Any]) -> str:
    """The start every file name of this model's profiles shares."""
    return f"{fp['class']}-{str(fp['config_sha256'])[:12]}"
