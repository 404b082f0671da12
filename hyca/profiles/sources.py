"""Where a model's profile comes from, in order:

1. an explicit path (its errors are raised: the user asked for that file);
2. the folders in ``$HYCA_PROFILES`` (``os.pathsep``-separated), then the ``profiles/``
   folder shipped with hyca;
3. the local cache, ``$HYCA_CACHE`` (else ``$XDG_CACHE_HOME/hyca/profiles``, else
   ``~/.cache/hyca/profiles``);
4. the Hugging Face Hub: ``hub_repo`` (default ``$HYCA_HUB_REPO`` or
   :data:`hyca.profiles.hub.DEFAULT_HUB_REPO`), through huggingface_hub's cache;
5. an automatic probe, whose result is saved to the local cache for next time.

File names come from the model fingerprint (:func:`hyca.profiles.io.profile_filename`):
with an interval N, ``<Class>-<hash>-n<N>.safetensors`` is tried before the model's
general ``<Class>-<hash>.safetensors``. A file that is missing is skipped silently; one
that is invalid, for another model, or unreachable is a warning and the next source.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import fingerprint as fpmod
from .hub import HubError, download_file, hub_offline, hub_repo_id
from .io import ProfileError, model_fingerprint, profile_filename, read_profile, save_profile
from .profile import Profile

#: ``hub_repo`` default: ask ``$HYCA_HUB_REPO`` / the built-in repo. Pass None to skip the Hub.
DEFAULT = "default"


@dataclass
class ResolvedProfile:
    """A profile and where it came from (``path``, ``extra``, ``shipped``, ``cache``, ``hub``, ``probe``)."""

    profile: Profile
    source: str
    path: Path | None
    warnings: list[str] = field(default_factory=list)


def shipped_dir() -> Path:
    """The ``profiles/`` folder next to the ``hyca`` package (a source checkout or editable install)."""
    return Path(__file__).resolve().parents[2] / "profiles"


def extra_dirs() -> list[Path]:
    return [Path(p).expanduser() for p in os.environ.get("HYCA_PROFILES", "").split(os.pathsep) if p.strip()]


def default_cache_dir() -> Path:
    if os.environ.get("HYCA_CACHE"):
        return Path(os.environ["HYCA_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "hyca" / "profiles"


def candidate_names(fp: Mapping[str, Any], interval: int | None) -> list[str]:
    """File names to look for, most specific first."""
    general = profile_filename(fp)
    return [profile_filename(fp, interval), general] if interval is not None else [general]


def _folders(cache_dir: Path) -> Iterator[tuple[str, Path]]:
    for folder in extra_dirs():
        yield "extra", folder
    yield "shipped", shipped_dir()
    yield "cache", cache_dir


class _Log:
    """Collects warnings for the result and raises each as a UserWarning as it happens."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def __call__(self, message: str) -> None:
        self.messages.append(message)
        warnings.warn(message, UserWarning, stacklevel=4)


def _try_file(path: Path, fp: Mapping[str, Any], interval: int | None, log: _Log, source: str,
              ) -> ResolvedProfile | None:
    try:
        profile, notes = read_profile(path, fp, interval=interval)
    except ProfileError as err:
        log(f"skipping {source} profile: {err}")
        return None
    for note in notes:
        log(note)
    return ResolvedProfile(profile, source, path, log.messages)


#: Hub failures that concern one file name only (not the repo or the connection as a
#: whole): the next candidate name may still be there, e.g. in the Hub cache when offline.
_PER_FILE = {"no-file", "offline", "unreachable"}


def _try_hub(repo: str, names: list[str], fp: Mapping[str, Any], interval: int | None, log: _Log, *,
             offline: bool, cache_dir: str | os.PathLike | None, endpoint: str | None,
             token: str | bool | None) -> ResolvedProfile | None:
    misses: list[HubError] = []
    for name in names:
        try:
            path = download_file(repo, name, token=token, endpoint=endpoint, cache_dir=cache_dir,
                                 local_files_only=offline, retry=False)
        except HubError as err:
            if err.kind not in _PER_FILE:
                log(f"{err}; trying the next source")
                return None
            misses.append(err)
            continue
        found = _try_file(path, fp, interval, log, "hub")
        if found is not None:
            return found
    cut_off = [err for err in misses if err.kind != "no-file"]
    if cut_off:
        log(f"{cut_off[0]}; trying the next source")
    elif misses:
        log(f"Hub repo {repo} has no profile for {fpmod.describe(fp)} (looked for {', '.join(names)}); "
            "trying the next source")
    return None


def resolve_profile(model: Any, *, path: str | os.PathLike | None = None, hub_repo: str | None = DEFAULT,
                    hub_filename: str | None = None, interval: int | None = None,
                    probe: Callable[[], Profile] | None = None, cache_dir: str | os.PathLike | None = None,
                    offline: bool | None = None, hub_endpoint: str | None = None,
                    hub_token: str | bool | None = None, hub_cache_dir: str | os.PathLike | None = None,
                    ) -> ResolvedProfile:
    """Find the profile for the model with fingerprint ``model``; see the module doc.

    ``interval``: the N it will run at (prefers a profile made for it; another N warns).
    ``probe``: zero-argument callable making a profile when no source has one; without it,
    finding nothing raises :class:`ProfileError`. ``offline``: skip the network (the Hub
    cache is still read); default: huggingface_hub's offline mode.
    """
    fp = model_fingerprint(model)
    log = _Log()
    if path is not None:
        profile, notes = read_profile(path, fp, interval=interval)
        for note in notes:
            log(note)
        return ResolvedProfile(profile, "path", Path(path), log.messages)

    names = candidate_names(fp, interval)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    looked: list[str] = []
    for source, folder in _folders(cache):
        for name in names:
            looked.append(str(folder / name))
            if (folder / name).is_file():
                found = _try_file(folder / name, fp, interval, log, source)
                if found is not None:
                    return found

    repo = hub_repo_id() if hub_repo == DEFAULT else hub_repo
    if repo:
        looked.append(f"Hub repo {repo}")
        found = _try_hub(repo, [hub_filename] if hub_filename else names, fp, interval, log,
                         offline=hub_offline() if offline is None else offline, cache_dir=hub_cache_dir,
                         endpoint=hub_endpoint, token=hub_token)
        if found is not None:
            return found

    if probe is None:
        raise ProfileError(
            f"no profile for {fpmod.describe(fp)}: looked in {'; '.join(looked)}. Make one with "
            "`python -m hyca probe`, pass a path, or let hyca probe automatically"
        )
    return _probe_and_cache(probe, fp, interval, cache / names[-1], log)


def _probe_and_cache(probe: Callable[[], Profile], fp: Mapping[str, Any], interval: int | None, target: Path,
                     log: _Log) -> ResolvedProfile:
    """Run the probe, save its profile to the cache, and return what was saved (read back)."""
    profile = probe()
    chosen = profile.metadata.get("interval", interval)
    try:
        save_profile(profile, target, fp, interval=chosen)
    except (OSError, ProfileError) as err:
        log(f"probed a profile but could not save it to the cache ({err}); it will be probed again next time")
        return ResolvedProfile(profile, "probe", None, log.messages)
    saved, notes = read_profile(target, fp, interval=interval)
    for note in notes:
        log(note)
    return ResolvedProfile(saved, "probe", target, log.messages)


__all__ = ["DEFAULT", "ResolvedProfile", "candidate_names", "default_cache_dir", "extra_dirs", "resolve_profile",
           "shipped_dir"]
