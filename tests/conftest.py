import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _real_profile_folders() -> list[Path]:
    """Where hyca would write profiles for this user, read from the environment the test
    session started with (hyca.profiles.sources.default_cache_dir's rule, and the WebUI
    extension's fallback ~/.cache/hyca/profiles)."""
    folders = [Path.home() / ".cache" / "hyca"]
    if os.environ.get("XDG_CACHE_HOME"):
        folders.append(Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "hyca")
    if os.environ.get("HYCA_CACHE"):
        folders.append(Path(os.environ["HYCA_CACHE"]).expanduser())
    return folders


#: Write-like audit events (``sys.audit``) and the position of the path they write.
_WRITES = {"os.rename": 1, "os.mkdir": 0, "os.remove": 0, "os.rmdir": 0, "tempfile.mkstemp": 0,
           "tempfile.mkdtemp": 0, "shutil.copyfile": 1, "shutil.rmtree": 0}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _watch_writes(folders: list[Path]) -> list[str]:
    """Record every path under ``folders`` that this process opens for writing, creates,
    renames onto or removes (an audit hook, so other processes on the machine do not count;
    subprocesses that tests start inherit the temporary HYCA_CACHE below)."""
    roots = tuple(os.path.join(os.path.abspath(f), "") for f in folders)
    seen: list[str] = []

    def hook(event: str, args: tuple) -> None:
        try:
            if event == "open":
                path, mode, flags = args
                writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & _WRITE_FLAGS)
            elif event in _WRITES:
                path, writing = args[_WRITES[event]], True
            else:
                return
            if writing and isinstance(path, (str, os.PathLike)):
                if os.path.join(os.path.abspath(path), "").startswith(roots):
                    seen.append(f"{event} {os.fspath(path)}")
        except Exception:  # an audit hook must never break the code it watches
            pass

    sys.addaudithook(hook)
    return seen


@pytest.fixture(scope="session", autouse=True)
def _the_users_profile_cache_is_left_alone():
    """Fails the session (an error at its last teardown) if a test in this process wrote
    into the user's real profile cache."""
    written = _watch_writes(_real_profile_folders())
    yield
    if written:
        pytest.fail(f"tests wrote into the user's profile cache: {sorted(set(written))}", pytrace=False)


@pytest.fixture(autouse=True)
def _profiles_in_a_temporary_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own empty profile cache, and no search folder of the user's:
    a probe's result, a pulled profile, a WebUI session's learned profile land in a
    temporary folder. Tests that need other folders set them themselves."""
    cache = tmp_path_factory.mktemp("hyca-cache")
    monkeypatch.setenv("HYCA_CACHE", str(cache))
    monkeypatch.delenv("HYCA_PROFILES", raising=False)


@pytest.fixture
def automatic(tmp_path, monkeypatch):
    """Profiles found or probed land in ``tmp_path`` only: no Hub, no $HYCA_PROFILES (the
    WebUI's "automatic" profile choice, in a folder of the test's own)."""
    monkeypatch.setenv("HYCA_CACHE", str(tmp_path))
    monkeypatch.setenv("HYCA_HUB_REPO", "none")
    monkeypatch.delenv("HYCA_PROFILES", raising=False)
    return tmp_path
