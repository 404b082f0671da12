import os
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


def _listing(folders: list[Path]) -> dict[str, tuple[int, int]]:
    """Every file under ``folders``, with its size and modification time (ns)."""
    found = {}
    for folder in folders:
        if folder.is_dir():
            for path in folder.rglob("*"):
                if path.is_file():
                    stat = path.stat()
                    found[str(path)] = (stat.st_size, stat.st_mtime_ns)
    return found


@pytest.fixture(scope="session", autouse=True)
def _the_users_profile_cache_is_left_alone():
    """Fails the session (an error at its last teardown) if any test wrote into the user's
    real profile cache."""
    folders = _real_profile_folders()
    before = _listing(folders)
    yield
    after = _listing(folders)
    changed = sorted(set(after) - set(before) | {p for p in before if after.get(p) != before[p]})
    if changed:
        pytest.fail(f"tests wrote into the user's profile cache: {changed}", pytrace=False)


@pytest.fixture(autouse=True)
def _profiles_in_a_temporary_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own empty profile cache, and no search folder of the user's:
    a probe's result, a pulled profile, a WebUI session's learned profile land in a
    temporary folder. Tests that need other folders set them themselves."""
    cache = tmp_path_factory.mktemp("hyca-cache")
    monkeypatch.setenv("HYCA_CACHE", str(cache))
    monkeypatch.delenv("HYCA_PROFILES", raising=False)
