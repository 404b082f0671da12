""""Give me a Profile for this model": the one place the WebUI extension asks for one.

Sources, in the order the user's choice selects them: a uniform method by name, a local
profile file (shipped in the extension's ``profiles/`` folder or in the cache folder),
a Hub repo id, or "automatic". "automatic" and Hub ids go through
``hyca.profiles.sources.resolve_profile`` when that module is installed; when it is not,
or it finds nothing, HyCa runs with a uniform second-order Taylor profile and says so once
in the console. Profiles are kept per model fingerprint, choice and LoRA set for the session.
"""

from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ...profiles.profile import Profile
from .adapter import Adapter
from .fingerprint import fingerprint

logger = logging.getLogger("hyca.webui")

AUTOMATIC = "automatic"
FALLBACK_SOLVER = "taylor-2"
#: Choices that need no file: label -> pool solver name.
UNIFORM = {"TaylorSeer (taylor-2)": "taylor-2", "TaylorSeer (taylor-1)": "taylor-1", "FORA (reuse)": "reuse"}
EXTENSION_ROOT = Path(__file__).resolve().parents[3]


@dataclass
class Chosen:
    profile: Profile
    source: str                       # what to print and write: "uniform taylor-2", a file name, ...
    notes: list[str] = field(default_factory=list)
    lora_ari: float | None = None


def profile_dirs() -> list[Path]:
    """Shipped profiles, then the user's cache (``$HYCA_PROFILE_DIR`` or ``~/.cache/hyca/profiles``)."""
    cache = os.environ.get("HYCA_PROFILE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "hyca", "profiles")
    return [EXTENSION_ROOT / "profiles", Path(cache)]


def local_profiles() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for folder in profile_dirs():
        if folder.is_dir():
            for path in sorted(folder.glob("*.safetensors")):
                found.setdefault(path.name, path)
    return found


def choices() -> list[str]:
    return [AUTOMATIC, *UNIFORM, *local_profiles()]


def _optional(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def adjusted_rand_index(a: Profile, b: Profile) -> float:
    """Mean over blocks of the ARI between two profiles' cluster labels (1 = same clustering)."""
    from sklearn.metrics import adjusted_rand_score

    if a.labels.shape != b.labels.shape:
        raise ValueError(f"profiles differ in shape: {tuple(a.labels.shape)} vs {tuple(b.labels.shape)}")
    scores = [adjusted_rand_score(x.tolist(), y.tolist()) for x, y in zip(a.labels, b.labels)]
    return float(sum(scores) / len(scores))


class ProfileBook:
    """Profiles resolved so far in this WebUI session."""

    def __init__(self) -> None:
        self._known: dict[tuple, Chosen] = {}

    def clear(self) -> None:
        self._known.clear()

    def choose(self, model: torch.nn.Module, adapter: Adapter, choice: str, hub_repo: str = "",
               interval: int | None = None, lora_key: str = "", lora_reuse: bool = True) -> Chosen:
        fp = fingerprint(model, adapter)
        base_key = (fp["config_sha256"], choice, hub_repo, interval)
        if base_key not in self._known:
            self._known[base_key] = self._resolve(fp, choice, hub_repo, interval)
        base = self._known[base_key]
        if not lora_key or lora_reuse:
            return base
        lora_key_full = base_key + (lora_key,)
        if lora_key_full not in self._known:
            self._known[lora_key_full] = self._for_lora(fp, base, lora_key)
        return self._known[lora_key_full]

    def _resolve(self, fp: dict, choice: str, hub_repo: str, interval: int | None) -> Chosen:
        blocks, dim = sum(fp["blocks"].values()), fp["hidden_size"]
        if choice in UNIFORM:
            return Chosen(Profile.uniform(UNIFORM[choice], blocks, dim), f"uniform {UNIFORM[choice]}")
        files = local_profiles()
        if choice in files:
            from ...profiles.io import read_profile

            profile, warns = read_profile(files[choice], fp, interval=interval)
            return Chosen(profile, choice, list(warns))
        sources = _optional("hyca.profiles.sources")
        if sources is not None:
            try:
                resolved = sources.resolve_profile(fp, hub_repo=hub_repo or None, interval=interval)
                profile = getattr(resolved, "profile", None)
                if profile is not None:
                    return Chosen(profile, str(getattr(resolved, "source", "resolved")), list(getattr(resolved, "warnings", [])))
            except Exception as error:  # noqa: BLE001 - any source failure falls back, with the reason
                note = f"no profile found for {fp['class']} ({error})"
            else:
                note = f"no profile found for {fp['class']}"
        else:
            note = "hyca.profiles.sources is not installed, so no profile can be looked up"
        message = f"{note}; using a uniform {FALLBACK_SOLVER} profile (TaylorSeer-like)"
        return Chosen(Profile.uniform(FALLBACK_SOLVER, blocks, dim), f"uniform {FALLBACK_SOLVER}", [message])

    def _for_lora(self, fp: dict, base: Chosen, lora_key: str) -> Chosen:
        """A LoRA set's own profile needs a probe of the model with that LoRA applied."""
        probing = _optional("hyca.probing")
        if probing is None or not hasattr(probing, "probe_transformer"):
            note = (f"LoRA set {lora_key[:12]}: a profile of its own needs hyca.probing, which is not "
                    f"installed; using the base profile")
            return Chosen(base.profile, base.source, [note])
        # Probing needs a sampling run of the patched model; until the frontend glue drives one,
        # report that the base profile serves this LoRA set.
        note = f"LoRA set {lora_key[:12]}: probing inside a WebUI run is not wired yet; using the base profile"
        return Chosen(base.profile, base.source, [note])
