"""Profiles on the Hugging Face Hub: download and upload, through huggingface_hub only.

Every failure of a transfer becomes a :class:`HubError` whose message says what went
wrong in the user's terms (offline, unreachable, no such repo, no such file, not
authorised) and what to do; :mod:`hyca.profiles.sources` turns those into a warning and
moves on to the next source.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from collections.abc import Mapping
from typing import Any

from . import fingerprint as fpmod
from .io import read_profile, save_profile
from .names import profile_filename
from .profile import Profile

#: Where hyca looks for shared profiles unless HYCA_HUB_REPO says otherwise.
DEFAULT_HUB_REPO = "hyca-project/profiles"
_NO_REPO = {"", "none", "off", "0", "false"}


class HubError(RuntimeError):
    """A Hub transfer failed; the message names the cause and the remedy.

    ``kind``: ``offline``, ``unreachable``, ``no-repo``, ``no-file``, ``denied``, ``invalid``
    or ``http`` -- resolution tries the next file name only after ``no-file``."""

    def __init__(self, message: str, kind: str = "http") -> None:
        super().__init__(message)
        self.kind = kind


def hub_repo_id() -> str | None:
    """The repo to search: ``$HYCA_HUB_REPO`` (``none`` turns the Hub off), else the default."""
    value = os.environ.get("HYCA_HUB_REPO")
    if value is None:
        return DEFAULT_HUB_REPO
    return None if value.strip().lower() in _NO_REPO else value.strip()


def hub_offline() -> bool:
    """huggingface_hub's offline switch (read when it was imported) or HF_HUB_OFFLINE now."""
    from huggingface_hub import constants

    now = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return bool(constants.is_offline_mode() or now)


def _explain(err: BaseException, repo_id: str, filename: str | None = None) -> HubError:
    """A huggingface_hub / network exception as a HubError a user can act on."""
    from huggingface_hub import errors

    what = f"{repo_id}/{filename}" if filename else repo_id
    login = "log in with `hf auth login` or set HF_TOKEN"
    if isinstance(err, errors.OfflineModeIsEnabled) or (
        isinstance(err, errors.LocalEntryNotFoundError) and hub_offline()
    ):
        return HubError(f"Hub skipped for {what}: offline mode (HF_HUB_OFFLINE=1) and no copy in the Hub cache",
                        "offline")
    if isinstance(err, errors.LocalEntryNotFoundError):
        return HubError(f"Hub unreachable for {what} (no network connection?) and no copy in the Hub cache",
                        "unreachable")
    if isinstance(err, errors.HFValidationError):
        return HubError(f"invalid Hub repo id or file name {what!r}: {str(err).splitlines()[0]}", "invalid")
    if isinstance(err, errors.RemoteEntryNotFoundError):
        return HubError(f"Hub repo {repo_id} has no file {filename}: check the file name (hyca probe names files "
                        f"<Class>-<config hash>.safetensors)", "no-file")
    if isinstance(err, errors.RevisionNotFoundError):
        return HubError(f"Hub repo {repo_id} has no such revision", "no-repo")
    if isinstance(err, errors.RepositoryNotFoundError):
        return HubError(f"Hub repo {repo_id} not found, or it is private/gated and you are not authorised "
                        f"({login})", "no-repo")
    if isinstance(err, errors.HfHubHTTPError):
        status = getattr(getattr(err, "response", None), "status_code", None)
        if status in (401, 403):
            return HubError(f"Hub refused access to {what} (HTTP {status}): {login} with a token that may "
                            f"{'write to' if filename is None else 'read'} this repo", "denied")
        return HubError(f"Hub request for {what} failed (HTTP {status}): {str(err).splitlines()[0]}")
    detail = str(err).splitlines()[0] if str(err) else ""
    return HubError(f"Hub unreachable for {what}: {type(err).__name__}: {detail}", "unreachable")


def _transfer_errors() -> tuple[type[BaseException], ...]:
    import httpx2
    from huggingface_hub import errors

    return (errors.HfHubHTTPError, errors.EntryNotFoundError, errors.HFValidationError, errors.OfflineModeIsEnabled,
            errors.FileMetadataError, httpx2.HTTPError, ConnectionError, TimeoutError)


def _reachable(repo_id: str, filename: str, revision: str | None, token: str | bool | None,
               endpoint: str | None, timeout: float) -> bool:
    """One HEAD without retries: False only when the Hub cannot be reached at all.

    hf_hub_download retries connection failures with backoff (about 20 s) when no cached
    copy exists; automatic resolution should fall through to the next source at once."""
    import httpx2
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    url = hf_hub_url(repo_id, filename, revision=revision, endpoint=endpoint)
    try:
        get_hf_file_metadata(url, token=token, timeout=timeout, endpoint=endpoint)
    except (httpx2.TransportError, ConnectionError, TimeoutError):
        return False
    except Exception:  # HTTP errors: hf_hub_download raises them again, with its own messages
        pass
    return True


def download_file(repo_id: str, filename: str, *, revision: str | None = None, token: str | bool | None = None,
                  cache_dir: str | os.PathLike | None = None, endpoint: str | None = None,
                  local_files_only: bool | None = None, retry: bool = True, timeout: float = 10) -> Path:
    """``hf_hub_download`` with errors as :class:`HubError`; offline it reads the Hub cache only.

    ``retry=False``: when the Hub is unreachable, use a cached copy or fail at once."""
    from huggingface_hub import hf_hub_download

    if local_files_only is None:
        local_files_only = hub_offline()
    try:
        if not (local_files_only or retry or _reachable(repo_id, filename, revision, token, endpoint, timeout)):
            local_files_only = True
        return Path(hf_hub_download(repo_id, filename, revision=revision, token=token, cache_dir=cache_dir,
                                    endpoint=endpoint, local_files_only=local_files_only, etag_timeout=timeout))
    except _transfer_errors() as err:
        raise _explain(err, repo_id, filename) from None


def pull_profile(repo_id: str, filename: str, *, output_dir: str | os.PathLike | None = None,
                 model: Mapping[str, Any] | None = None, revision: str | None = None, token: str | bool | None = None,
                 cache_dir: str | os.PathLike | None = None, endpoint: str | None = None) -> Path:
    """Download a profile, validate it (and that it fits ``model`` if given), and return its path:
    in ``output_dir`` when given, else in the Hub cache. ``model``: the fingerprint it must fit. A corrupt
    download raises ProfileError. An unreachable Hub fails after one request (a cached copy is
    used), without huggingface_hub's retries, as the automatic lookup does."""
    path = download_file(repo_id, filename, revision=revision, token=token, cache_dir=cache_dir, endpoint=endpoint,
                         retry=False)
    read_profile(path, model)
    if output_dir is None:
        return path
    target = Path(output_dir) / Path(filename).name
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        shutil.copyfile(path, tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def _default_path_in_repo(path: Path, fp: dict[str, Any]) -> str:
    """The file's own name when it already carries the model's stem (e.g. ``-n6``), else the canonical name."""
    stem = profile_filename(fp).removesuffix(".safetensors")
    return path.name if path.name.startswith(stem) and path.suffix == ".safetensors" else profile_filename(fp)


def push_profile(path_or_profile: str | os.PathLike | Profile, repo_id: str, *, token: str | bool | None = None,
                 private: bool = False, path_in_repo: str | None = None, commit_message: str | None = None,
                 model: Any = None, endpoint: str | None = None) -> str:
    """Validate a profile and upload it to ``repo_id`` (created if missing); returns the file's URL.
    A file that is not a valid profile raises :class:`~hyca.profiles.io.ProfileError` before
    the token is looked for; no token raises :class:`HubError`.

    A :class:`Profile` is written to a temporary file first (``model`` names its model
    when its metadata does not). The default name in the repo is the one
    :func:`hyca.profiles.sources.resolve_profile` looks for.
    """
    from huggingface_hub import HfApi, get_token

    with tempfile.TemporaryDirectory(prefix="hyca-push-") as tmp:
        if isinstance(path_or_profile, Profile):
            path = save_profile(path_or_profile, Path(tmp) / "profile.safetensors", model)
        else:
            path = Path(path_or_profile)
        profile, _ = read_profile(path, model)  # a bad file is said before the token is asked for
        if hub_offline():
            raise HubError(f"uploading to {repo_id} needs the network, and offline mode is on (HF_HUB_OFFLINE=1): "
                           "unset it to push", "offline")
        if token is False or (token in (None, True) and get_token() is None):
            raise HubError(f"uploading to {repo_id} needs a Hugging Face token with write access: log in with "
                           "`hf auth login`, set HF_TOKEN, or give one (token= in Python, --token on the command line)",
                           "denied")
        fp = profile.metadata["fingerprint"]
        name = path_in_repo or _default_path_in_repo(path, fp)
        message = commit_message or f"Add HyCa profile for {fpmod.describe(fp)}"
        api = HfApi(endpoint=endpoint, token=token)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            api.upload_file(path_or_fileobj=str(path), path_in_repo=name, repo_id=repo_id,
                            commit_message=message)
        except _transfer_errors() as err:
            raise _explain(err, repo_id) from None
    return f"{api.endpoint}/{repo_id}/blob/main/{name}"


__all__ = ["DEFAULT_HUB_REPO", "HubError", "download_file", "hub_offline", "hub_repo_id",
           "pull_profile", "push_profile"]
