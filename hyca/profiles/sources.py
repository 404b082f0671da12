"""Where a model's profile comes from, in order:

1. an explicit path (its errors are raised: the user asked for that file);
2. the folders in ``$HYCA_PROFILES`` (``os.pathsep``-separated), then the ``profiles/``
   folder shipped with hyca;
3. the local cache, ``$HYCA_CACHE`` (else ``$XDG_CACHE_HOME/hyca/profiles``, else
   ``~/.cache/hyca/profiles``);
4. the Hugging Face Hub: ``hub_repo`` (default ``$HYCA_HUB_REPO`` or
   :data:`hyca.profiles.hub.DEFAULT_HUB_REPO`), through huggingface_hub's cache;
5. an automatic probe, whose result is saved to the local cache for next time.

File names come from the model fingerprint (:func:`hyca.profiles.names.profile_filename`):
``<Class>-<hash>-n<N>-<settings>.safetensors`` (a profile chosen for one sampling setting),
``<Class>-<hash>-n<N>.safetensors``, and the model's general ``<Class>-<hash>.safetensors``.

Settings (issue 11): a profile records what it was chosen for (``chosen_for``, a
:class:`~hyca.profiles.settings.RunSettings`). Given the run's settings (``run``), every
profile of the model in the local folders is ranked by how far its settings are from the
run's (:func:`~hyca.profiles.settings.mismatch_cost`), the folder order breaking ties; the
Hub is asked for the exact names when no local profile matches. The result says what still
differs (``differences``). With ``probe_if_mismatched`` a probe for the run's settings
replaces a profile made for others.

A file that is missing is skipped silently; one that is invalid, for another model, or
unreachable is a warning and the next source. Every ``*.safetensors`` file in a search
folder is checked, not only the one that would be chosen: a corrupt, foreign, pickled or
newer-format file is warned about (``logging`` and ``UserWarning``) once per process, and
again only after it changed.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import fingerprint as fpmod
from .compare import TARGET_WORDS
from .hub import HubError, download_file, hub_offline, hub_repo_id
from .io import (ProfileError, fingerprint_of, model_fingerprint, read_profile, read_raw_header, save_profile,
                 settings_header)
from .names import model_prefix, profile_filename
from .profile import Profile
from .settings import RunSettings, differences, mismatch_cost

logger = logging.getLogger("hyca")

#: ``hub_repo`` default: ask ``$HYCA_HUB_REPO`` / the built-in repo. Pass None to skip the Hub.
DEFAULT = "default"


@dataclass
class ResolvedProfile:
    """A profile and where it came from (``path``, ``extra``, ``shipped``, ``cache``, ``hub``, ``probe``)."""

    profile: Profile
    source: str
    path: Path | None
    warnings: list[str] = field(default_factory=list)
    #: what differs between the settings the profile was chosen for and the run's
    differences: list[str] = field(default_factory=list)
    #: the Hub repo it was downloaded from (source ``hub``)
    repo: str | None = None
    #: what reading the file noted (another interval, ...): said only if this profile is used
    pending: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """Where the profile came from, in words: what a run reports as its profile
        (``Profile.source``, ``RunStats.profile``) and what the log names."""
        if self.source == "probe":
            return "probed on first use, " + (f"saved to {self.path}" if self.path is not None else "not saved")
        if self.source == "hub":
            return f"{self.path.name if self.path else '?'} from the Hub repo {self.repo}"
        where = {"extra": " ($HYCA_PROFILES)", "shipped": " (shipped with hyca)", "cache": " (local cache)"}
        return f"{self.path}{where.get(self.source, '')}"

    def named(self) -> "ResolvedProfile":
        """This result, its profile's ``source`` set to :meth:`describe`."""
        self.profile.source = self.describe()
        return self


def shipped_dir() -> Path:
    """The ``profiles/`` folder next to the ``hyca`` package (a source checkout or editable install)."""
    return Path(__file__).resolve().parents[2] / "profiles"


def extra_dirs() -> list[Path]:
    """The folders of ``$HYCA_PROFILES``; one that is not a folder is said once (a typo there
    would otherwise leave every lookup to the other sources without a word)."""
    folders = [Path(p).expanduser() for p in os.environ.get("HYCA_PROFILES", "").split(os.pathsep) if p.strip()]
    for folder in folders:
        if not folder.is_dir() and str(folder) not in _SAID_MISSING:
            _SAID_MISSING.add(str(folder))
            logger.warning("HyCa: $HYCA_PROFILES names %s, which is not a folder; profiles are looked up in the "
                           "other sources", folder)
    return folders


_SAID_MISSING: set[str] = set()


def default_cache_dir() -> Path:
    if os.environ.get("HYCA_CACHE"):
        return Path(os.environ["HYCA_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "hyca" / "profiles"


def candidate_names(fp: Mapping[str, Any], interval: int | None, run: RunSettings | None = None) -> list[str]:
    """File names to look for, most specific first."""
    names = [profile_filename(fp, interval, run)] if interval is not None and run is not None and run.tag() else []
    if interval is not None:
        names.append(profile_filename(fp, interval))
    return [*names, profile_filename(fp)]


def _model_files(folder: Path, fp: Mapping[str, Any], names: list[str]) -> list[Path]:
    """The exact names that exist, then every other profile file of the model in ``folder``:
    those named for it, then those named otherwise whose header names this model (a user's
    ``-o my-profile.safetensors``: names only order the search)."""
    if not folder.is_dir():
        return []
    exact = [folder / n for n in names if (folder / n).is_file()]
    prefix = model_prefix(fp)
    named = sorted(p for p in folder.glob(f"{prefix}*.safetensors") if p not in exact)
    renamed = [p for p in sorted(folder.glob("*.safetensors"))
               if not p.name.startswith(prefix) and p.is_file() and _made_for(p, fp)]
    return exact + named + renamed


def _made_for(path: Path, fp: Mapping[str, Any]) -> bool:
    """Whether the profile file at ``path`` names the model ``fp`` in its header."""
    found = fingerprint_of(path)
    return found is not None and fpmod.mismatch(found, fp) is None


def _settings_of(path: Path) -> RunSettings | None:
    """What the file says it was chosen for, from its header alone; None if unreadable."""
    try:
        return RunSettings.of_profile(settings_header(path, read_raw_header(path)))
    except (ProfileError, ValueError):
        return None


def _folders(cache_dir: Path) -> Iterator[tuple[str, Path]]:
    for folder in extra_dirs():
        yield "extra", folder
    yield "shipped", shipped_dir()
    yield "cache", cache_dir


class _Log:
    """Collects warnings for the result and tells each as it happens: ``warn=True`` raises it
    as a UserWarning pointing at the caller's own line; a callable (a WebUI or ComfyUI console)
    gets it, in order with what the host prints around it; ``False``: listed only."""

    def __init__(self, warn: bool | Callable[[str], None] = True) -> None:
        self.messages: list[str] = []
        self.warn = warn

    def __call__(self, message: str, once: str | None = None) -> None:
        """``once``: a key told once per process (later lookups list the message only): the
        Hub skipped in offline mode, which a deliberately offline user need not hear at every
        new setting."""
        self.messages.append(message)
        if once is not None:
            if once in _TOLD_ONCE:
                return
            _TOLD_ONCE.add(once)
        if callable(self.warn):
            self.warn(message)
        elif self.warn:
            warnings.warn(message, UserWarning, stacklevel=caller_stacklevel())


_TOLD_ONCE: set[str] = set()


def caller_stacklevel() -> int:
    """The ``stacklevel`` of the first frame outside the ``hyca`` package and the libraries a
    pipeline call passes through (``contextlib``'s context managers, torch's and diffusers'
    wrappers), for a warning raised from inside HyCa: it then points at the user's line, not
    at ``contextlib.py`` (the ``skip_file_prefixes`` of Python 3.12's ``warnings.warn``)."""
    passed = _passed_through()
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(passed):
        frame, level = frame.f_back, level + 1
    return level if frame is not None else 1


def _passed_through() -> tuple[str, ...]:
    import contextlib

    folders = [Path(__file__).resolve().parents[1]]
    for name in ("torch", "diffusers"):
        module = sys.modules.get(name)
        if module is not None and getattr(module, "__file__", None):
            folders.append(Path(module.__file__).resolve().parent)
    prefixes = [str(folder) + os.sep for folder in folders] + [str(Path(__file__).parents[1]) + os.sep]
    return (*dict.fromkeys(prefixes), contextlib.__file__)


def _named(source: str) -> str:
    """A source as a user knows it: "extra" folders are the ones ``$HYCA_PROFILES`` names."""
    return "$HYCA_PROFILES" if source == "extra" else source


def _try_file(path: Path, fp: Mapping[str, Any], interval: int | None, log: _Log, source: str,
              ) -> ResolvedProfile | None:
    try:
        profile, notes = read_profile(path, fp, interval=interval)
    except ProfileError as err:
        _tell_bad(path, f"skipping {_named(source)} profile: {err}", log)
        return None
    return ResolvedProfile(profile, source, path, log.messages, pending=list(notes))


#: Bad files already told about in this process, by (path, size, modification time): a file
#: is warned about once, and again only after it changed.
_TOLD: set[tuple[str, int, int]] = set()
#: Verdicts on search-folder files (None: good), by (path, size, mtime, model checked against).
_VERDICTS: dict[tuple[str, int, int, str | None], str | None] = {}


def _stat_key(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return str(path), stat.st_size, stat.st_mtime_ns


def _tell_bad(path: Path, message: str, log: _Log) -> None:
    """Warn about a bad profile file once per process (log line, UserWarning, ``.warnings``)."""
    try:
        key = _stat_key(Path(path))
    except OSError:
        key = (str(path), -1, -1)
    if key in _TOLD:
        return
    _TOLD.add(key)
    logger.warning("HyCa: %s", message)
    log(message)


def _bad_files(folder: Path, source: str, fp: Mapping[str, Any], log: _Log) -> set[Path]:
    """The ``*.safetensors`` files in a search folder that cannot serve as a profile, each
    warned about once: unreadable for any model (corrupt, truncated, a pickle, a newer
    format, not a HyCa profile), or, named for this model, made for another one."""
    bad: set[Path] = set()
    if not folder.is_dir():
        return bad
    prefix = model_prefix(fp)
    for path in sorted(folder.glob("*.safetensors")):
        ours = path.name.startswith(prefix)
        try:
            key = (*_stat_key(path), fp.get("config_sha256") if ours else None)
        except OSError:
            continue
        if key not in _VERDICTS:
            try:
                read_profile(path, fp if ours else None)
                _VERDICTS[key] = None
            except ProfileError as err:
                _VERDICTS[key] = str(err)
        if _VERDICTS[key] is not None:
            bad.add(path)
            _tell_bad(path, f"skipping {_named(source)} profile: {_VERDICTS[key]}", log)
    return bad


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
            found.repo = repo
            return found
    cut_off = [err for err in misses if err.kind != "no-file"]
    if cut_off:
        offline = all(err.kind == "offline" for err in cut_off)
        log(f"{cut_off[0]}; trying the next source" + ("" if not offline else
            " (said once per process; every later lookup in offline mode skips the Hub alike)"),
            once=f"offline:{repo}" if offline else None)
    elif misses:
        log(f"Hub repo {repo} has no profile for {fpmod.describe(fp)} (looked for {', '.join(names)}); "
            "trying the next source")
    return None


def resolve_profile(model: Any, *, path: str | os.PathLike | None = None, hub_repo: str | None = DEFAULT,
                    hub_filename: str | None = None, interval: int | None = None, run: RunSettings | None = None,
                    probe: Callable[[], Profile] | None = None, probe_if_mismatched: bool = False,
                    own_sigmas: bool = True,
                    cache_dir: str | os.PathLike | None = None, offline: bool | None = None,
                    hub_endpoint: str | None = None, hub_token: str | bool | None = None,
                    hub_cache_dir: str | os.PathLike | None = None, warn: bool | Callable[[str], None] = True,
                    targets: Collection[str] | None = None, output_channels: int | None = None) -> ResolvedProfile:
    """Find the profile for the model with fingerprint ``model``; see the module doc.

    ``interval``: the N it will run at (prefers a profile made for it; another N warns).
    ``run``: the run's settings, as far as known (the closest profile is preferred; what
    still differs is in the result's ``differences``). ``probe``: zero-argument callable
    making a profile when no source has one (or, with ``probe_if_mismatched``, when the
    closest one was made for other settings); without it, finding nothing raises
    :class:`ProfileError`. ``own_sigmas`` (default): a run without ``sigmas`` samples on its
    scheduler's own schedule, so a profile chosen for given sigmas differs from it and the
    other way round (:func:`~hyca.profiles.settings.differences`); False: the run's schedule
    is not known, and a profile for any sigmas at its step count is as good as exact. ``offline``: skip the network (the Hub cache is still read);
    default: huggingface_hub's offline mode. ``warn``: raise each warning as a
    :class:`UserWarning` as well as listing it in the result's ``warnings`` (a callable: hand
    it each warning as it happens; False: list only).
    ``targets``: the forecast targets the caller's host can apply (``"residual"``,
    ``"output"``, ``"model_output"``; None: all): a found profile of another target (made by
    another host, sharing the cache) is passed over, said in the warnings, as if absent.
    ``output_channels``: the channels of the host's model output (None: unknown): a
    model-output profile of another width (another host's layout: diffusers' FLUX output is
    64 packed channels, a WebUI's latent 16) is passed over the same way.
    """
    fp = model_fingerprint(model)
    log = _Log(warn)
    if path is not None:
        profile, notes = read_profile(path, fp, interval=interval)
        for note in notes:
            log(note)
        return ResolvedProfile(profile, "path", Path(path), log.messages).named()

    run = (run or RunSettings()).merged(RunSettings(interval=interval))
    interval = run.interval
    names = candidate_names(fp, interval, run)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    looked: list[str] = []
    ranked = []
    for order, (source, folder) in enumerate(_folders(cache)):
        looked.append(str(folder / names[0]))
        bad = _bad_files(folder, source, fp, log)
        for rank, file in enumerate(f for f in _model_files(folder, fp, names) if f not in bad):
            settings = _settings_of(file)
            cost = mismatch_cost(settings, run, own_sigmas) if settings is not None else float("inf")
            ranked.append((cost, order, rank, source, file))
    best = None
    for cost, _, _, source, file in sorted(ranked, key=lambda item: item[:3]):
        best = _runnable(_try_file(file, fp, interval, log, source), targets, output_channels, log)
        if best is not None:
            break

    repo = hub_repo_id() if hub_repo == DEFAULT else hub_repo
    if repo and (best is None or _differences(best, run, own_sigmas)):
        looked.append(f"Hub repo {repo}")
        found = _runnable(_try_hub(repo, [hub_filename] if hub_filename else names, fp, interval, log,
                                   offline=hub_offline() if offline is None else offline, cache_dir=hub_cache_dir,
                                   endpoint=hub_endpoint, token=hub_token), targets, output_channels, log)
        if found is not None and (best is None or _cost(found, run, own_sigmas) < _cost(best, run, own_sigmas)):
            best = found

    if best is not None:
        best.differences = _differences(best, run, own_sigmas)
        if not (best.differences and probe is not None and probe_if_mismatched):
            for note in best.pending:  # (not said for a profile a probe replaces)
                log(note)
            return best.named()
        log(f"the closest profile ({best.path or best.source}) was chosen for {_chosen(best).describe()}; "
            f"probing one for this run's settings ({run.describe()})")
    elif probe is None:
        raise ProfileError(
            f"no profile for {fpmod.describe(fp)}: looked in {'; '.join(looked)}. Make one with "
            "`python -m hyca probe`, pass a path, or let hyca probe automatically"
        )
    target = cache / (names[0] if run.tag() else names[-1])
    resolved = _probe_and_cache(probe, fp, interval, target, log)
    resolved.differences = _differences(resolved, run, own_sigmas)
    return resolved.named()


def _runnable(found: ResolvedProfile | None, targets: Collection[str] | None, output_channels: int | None,
              log: _Log) -> ResolvedProfile | None:
    """``found``, unless its target is not one of ``targets`` or it forecasts a model output
    of other than ``output_channels`` channels (then None, said once)."""
    if found is None:
        return found
    target = found.profile.metadata.get("target", "residual")
    if targets is not None and target not in targets:
        log(f"passing over {found.path or found.source}: it forecasts the {TARGET_WORDS.get(target, target)}, which "
            f"this host cannot apply (it applies the {' and the '.join(TARGET_WORDS.get(t, t) for t in targets)})")
        return None
    if target == "model_output" and output_channels is not None and found.profile.dim != output_channels:
        log(f"passing over {found.path or found.source}: it forecasts a model output of {found.profile.dim} channels, "
            f"this host's model gives {output_channels} (a profile made by another host's layout)")
        return None
    return found


def _chosen(resolved: ResolvedProfile) -> RunSettings:
    return RunSettings.of_profile(resolved.profile.metadata)


def _differences(resolved: ResolvedProfile, run: RunSettings, own_sigmas: bool = False) -> list[str]:
    return differences(_chosen(resolved), run, own_sigmas)


def _cost(resolved: ResolvedProfile, run: RunSettings, own_sigmas: bool = False) -> float:
    return mismatch_cost(_chosen(resolved), run, own_sigmas)


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
