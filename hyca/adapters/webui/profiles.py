""""Give me a Profile for this model": the one place the WebUI extension asks for one.

Sources, in the order the user's choice selects them: a uniform method by name, a local
profile file (shipped in the extension's ``profiles/`` folder or in the cache folder),
a Hub repo id, or "automatic". "automatic" and Hub ids go through
``hyca.profiles.sources.resolve_profile`` when that module is installed; when it is not,
or it finds nothing, the pass is probed (hyca.probing) and the profile saved to the cache;
without hyca.probing HyCa runs with a uniform second-order Taylor profile and says so once
in the console. With LoRA reuse off, each new LoRA set gets its own probe and the ARI of
its clusters against the base profile is reported. Profiles are kept per model fingerprint, choice and LoRA set for the session.
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
from . import probe
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
    """A profile, where it came from, and what to tell the user. ``profile`` is ``None``
    when it must be probed: the next pass records, and :meth:`ProfileBook.learn` stores
    the result under ``key``."""

    profile: Profile | None
    source: str                       # what to print and write: "uniform taylor-2", a file name, ...
    notes: list[str] = field(default_factory=list)
    lora_ari: float | None = None
    key: tuple = ()
    base: Profile | None = None       # a LoRA set's probe is compared with this profile


def profile_dirs() -> list[Path]:
    """Where local profiles are listed from: the folders hyca.profiles.sources searches
    (``$HYCA_PROFILES``, the shipped ``profiles/``, the cache) when it is installed, else the
    extension's ``profiles/`` folder and ``~/.cache/hyca/profiles``."""
    sources = _optional("hyca.profiles.sources")
    if sources is not None:
        return [*sources.extra_dirs(), sources.shipped_dir(), sources.default_cache_dir()]
    return [EXTENSION_ROOT / "profiles", Path(os.path.expanduser("~")) / ".cache" / "hyca" / "profiles"]


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


def _solver_named(choice: str) -> str | None:
    """The pool solver ``choice`` names (``fora``, ``taylor-2``, ...), or None."""
    from ...math.solvers import get_solver

    try:
        return get_solver(choice).name
    except ValueError:
        return None


def adjusted_rand_index(a: Profile, b: Profile) -> float:
    """Mean over blocks of the ARI between two profiles' cluster labels (1 = same
    clustering): :func:`hyca.profiles.compare.compare_profiles` when installed."""
    compare = _optional("hyca.profiles.compare")
    if compare is not None:
        return float(compare.compare_profiles(a, b).ari_overall)
    from sklearn.metrics import adjusted_rand_score

    if a.labels.shape != b.labels.shape:
        raise ValueError(f"profiles differ in shape: {tuple(a.labels.shape)} vs {tuple(b.labels.shape)}")
    scores = [adjusted_rand_score(x.tolist(), y.tolist()) for x, y in zip(a.labels, b.labels)]
    return float(sum(scores) / len(scores))


class ProfileBook:
    """Profiles resolved (or probed) so far in this WebUI session."""

    def __init__(self) -> None:
        self._known: dict[tuple, Chosen] = {}

    def clear(self) -> None:
        self._known.clear()

    def choose(self, model: torch.nn.Module, adapter: Adapter, choice: str, hub_repo: str = "",
               interval: int | None = None, lora_key: str = "", lora_reuse: bool = True) -> Chosen:
        fp = fingerprint(model, adapter)
        base_key = (fp["config_sha256"], choice, hub_repo, interval)
        base = self._known.get(base_key) or self._resolve(fp, choice, hub_repo, interval, base_key)
        if base.profile is not None:
            self._known[base_key] = base
        if not lora_key or lora_reuse or base.profile is None:
            return base
        key = base_key + (lora_key,)
        if key in self._known:
            return self._known[key]
        if probe.available():
            return Chosen(None, "probe", [f"LoRA set {lora_key[:12]}: probing its own profile on this pass"],
                          key=key, base=base.profile)
        return Chosen(base.profile, base.source,
                      [f"LoRA set {lora_key[:12]}: a profile of its own needs hyca.probing; using the base profile"])

    def learn(self, chosen: Chosen, engine: "probe.ProbeEngine", fp: dict, run_settings: Any = None) -> Chosen:
        """Turn a finished probing pass into the profile ``chosen`` was waiting for.
        ``run_settings``: the pass's :class:`~hyca.profiles.settings.RunSettings`, written
        into the profile as what it was chosen for."""
        profile = engine.profile(fp, run_settings=run_settings)
        if chosen.base is not None:  # a LoRA set: compared with the base, kept for this session
            ari = adjusted_rand_index(chosen.base, profile)
            learned = Chosen(profile, "probe (LoRA set)", [f"LoRA profile: ARI {ari:.3f} against the base profile"],
                             lora_ari=ari)
        else:
            learned = Chosen(profile, "probe", [])
            sources = _optional("hyca.profiles.sources")
            if sources is not None:  # saved to the cache, read back: what later sessions will load
                resolved = sources.resolve_profile(fp, interval=chosen.key[3], hub_repo=None,
                                                   probe=lambda: profile)
                learned = Chosen(resolved.profile, f"probe, saved to {resolved.path}", list(resolved.warnings))
        self._known[chosen.key] = learned
        return learned

    def _resolve(self, fp: dict, choice: str, hub_repo: str, interval: int | None, key: tuple) -> Chosen:
        blocks, dim = sum(fp["blocks"].values()), fp["hidden_size"]
        solver = _solver_named(choice)
        if choice in UNIFORM or solver is not None:  # a label of the menu, or a solver name (fora, taylor-2, ...)
            name = UNIFORM.get(choice, solver)
            return Chosen(Profile.uniform(name, blocks, dim), f"uniform {name}")
        files = local_profiles()
        if choice in files:
            from ...profiles.io import read_profile

            profile, warns = read_profile(files[choice], fp, interval=interval)
            return Chosen(profile, choice, list(warns))
        notes = []
        if choice != AUTOMATIC:  # a typo, or a file named in a pasted infotext that is not on this machine
            notes.append(f"profile {choice!r} is neither a choice of the menu ({', '.join([AUTOMATIC, *UNIFORM])}), "
                         f"a solver name, nor a profile file in {', '.join(str(d) for d in profile_dirs())}; "
                         "using automatic")
        chosen = self._automatic(fp, hub_repo, interval, key, blocks, dim)
        return Chosen(chosen.profile, chosen.source, notes + chosen.notes, key=chosen.key)

    def _automatic(self, fp: dict, hub_repo: str, interval: int | None, key: tuple, blocks: int, dim: int) -> Chosen:
        sources = _optional("hyca.profiles.sources")
        if sources is not None:
            try:
                kwargs = {"hub_repo": hub_repo} if hub_repo else {}
                resolved = sources.resolve_profile(fp, interval=interval, **kwargs)
                return Chosen(resolved.profile, f"{resolved.source} {resolved.path or ''}".strip(),
                              list(resolved.warnings))
            except Exception as error:  # noqa: BLE001 - nothing found: probe, or fall back, with the reason
                note = str(error).split(": looked in")[0]
        else:
            note = "hyca.profiles.sources is not installed, so no profile can be looked up"
        if probe.available():
            return Chosen(None, "probe", [f"{note}; probing one on this pass (computed in full)"], key=key)
        message = f"{note}; using a uniform {FALLBACK_SOLVER} profile (TaylorSeer-like)"
        return Chosen(Profile.uniform(FALLBACK_SOLVER, blocks, dim), f"uniform {FALLBACK_SOLVER}", [message])
