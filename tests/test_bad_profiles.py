"""Bad profile files in any search folder ($HYCA_PROFILES, the shipped folder, the cache,
and the WebUI's folders) are warned about once each, even when a good profile elsewhere
is chosen, as README.md promises ("a bad file is a warning and the next source").

The four kinds of bad file are made here: a truncated file, a pickle, a newer format
version (forged header), and another model's profile under this model's name.
"""

from __future__ import annotations

import logging
import pickle
import warnings

import pytest

from hyca.profiles.io import FORMAT_VERSION, save_profile
from hyca.profiles.names import profile_filename
from hyca.profiles.sources import resolve_profile

from profile_helpers import random_profile, read_parts, tiny_fingerprint, write_parts
from test_sources import dirs  # noqa: F401  (fixture: empty extra, shipped and cache folders, no Hub)

KINDS = ("corrupt", "pickle", "newer", "foreign")


@pytest.fixture()
def fp():
    return tiny_fingerprint()


def make_bad(kind: str, folder, fp, tmp_path):
    """One bad file of ``kind`` in ``folder``, named for this model (n<k> names, so that a
    good general profile elsewhere is the better match and would win without looking)."""
    path = folder / profile_filename(fp, 3 + KINDS.index(kind))
    if kind == "corrupt":
        good = save_profile(random_profile(fp), tmp_path / "whole.safetensors")
        path.write_bytes(good.read_bytes()[:-40])
    elif kind == "pickle":
        path.write_bytes(pickle.dumps({"labels": [1, 2, 3]}, protocol=4))
    elif kind == "newer":
        tensors, header = read_parts(save_profile(random_profile(fp), tmp_path / "plain.safetensors", fp))
        write_parts(path, tensors, {**header, "format_version": FORMAT_VERSION + 1})
    else:
        other = {**fp, "config_sha256": "e" * 64}
        save_profile(random_profile(other), path, other)
    return path


def hyca_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "hyca" and r.levelno == logging.WARNING]


@pytest.mark.parametrize("where", ["extra", "shipped", "cache"])
def test_each_bad_kind_in_each_folder_is_warned_once(where, dirs, fp, tmp_path, caplog):
    good = save_profile(random_profile(fp, seed=5), dirs["extra" if where != "extra" else "cache"]
                        / profile_filename(fp), fp)
    bad = {kind: make_bad(kind, dirs[where], fp, tmp_path) for kind in KINDS}
    with caplog.at_level(logging.WARNING, logger="hyca"), pytest.warns(UserWarning):
        found = resolve_profile(fp)
    assert found.path == good
    told = hyca_warnings(caplog)
    assert len(told) == len(KINDS)
    expected = {"corrupt": "truncated", "pickle": "pickle", "newer": "newer", "foreign": "differently configured"}
    for kind, path in bad.items():
        line = [m for m in told if str(path) in m]
        named = "$HYCA_PROFILES" if where == "extra" else where  # the "extra" folders, as a user knows them
        assert len(line) == 1 and f"skipping {named} profile" in line[0] and expected[kind] in line[0], (kind, told)
    assert len(found.warnings) == len(KINDS)

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hyca"):
        again = resolve_profile(fp)
    assert again.path == good and hyca_warnings(caplog) == [] and again.warnings == []

    bad["pickle"].write_bytes(pickle.dumps("changed", protocol=4))  # a changed file is looked at again
    with caplog.at_level(logging.WARNING, logger="hyca"), pytest.warns(UserWarning):
        resolve_profile(fp)
    assert [m for m in hyca_warnings(caplog) if str(bad["pickle"]) in m] == hyca_warnings(caplog) != []


def test_an_unreadable_file_of_no_known_model_is_warned_too(dirs, fp, caplog):
    (dirs["extra"] / "my-favourite.safetensors").write_bytes(b"\x00" * 3)
    save_profile(random_profile(fp), dirs["cache"] / profile_filename(fp), fp)
    with caplog.at_level(logging.WARNING, logger="hyca"), pytest.warns(UserWarning):
        resolve_profile(fp)
    assert len(hyca_warnings(caplog)) == 1 and "my-favourite.safetensors" in hyca_warnings(caplog)[0]


def test_the_webui_folders_are_the_searched_ones_and_automatic_warns(dirs, fp, tmp_path, caplog):
    """The WebUI's automatic profile is settled for a pass's settings (ProfileBook.for_settings):
    a good profile made for them in the cache is used, and a bad file in the shipped folder is
    warned about once, in the log and among the notes the WebUI prints to its console, and
    not raised as a UserWarning as well."""
    from hyca.adapters.webui.profiles import AUTOMATIC, Chosen, ProfileBook, profile_dirs
    from hyca.profiles.settings import RunSettings

    assert profile_dirs() == [dirs["extra"], dirs["shipped"], dirs["cache"]]
    run = RunSettings(steps=10, guidance_scale=1.0, interval=3, warmup=2)
    made = random_profile(fp, seed=2, interval=3, warmup=2, chosen_for=run.to_json())
    good = save_profile(made, dirs["cache"] / profile_filename(fp, interval=3), fp)
    bad = make_bad("foreign", dirs["shipped"], fp, tmp_path)

    def probe():
        raise AssertionError("a profile made for these settings is in the cache: nothing to probe")

    pending = Chosen(None, AUTOMATIC, key=(fp["config_sha256"], AUTOMATIC, "", 3), fp=fp)
    with caplog.at_level(logging.WARNING, logger="hyca"), warnings.catch_warnings(record=True) as raised:
        warnings.simplefilter("always")
        chosen = ProfileBook().for_settings(pending, run, (16, 8, 8), probe)
    # the console prints the notes: no UserWarning on top (a WebUI console would show it again)
    assert not [w for w in raised if issubclass(w.category, UserWarning)]
    assert str(good) in chosen.source
    assert any(str(bad) in note for note in chosen.notes)  # what the WebUI prints to its console
    assert len(hyca_warnings(caplog)) == 1 and str(bad) in hyca_warnings(caplog)[0]

def test_a_profile_probed_for_a_pass_is_named_by_its_file_at_later_passes(dirs, fp):
    """The first pass at new settings probes and says "probe, saved to <file>"; later passes at
    the same settings use that profile without probing and name the file (a fresh-eyes run saw
    ComfyUI's console say "probe" at every run)."""
    from hyca.adapters.webui.profiles import AUTOMATIC, Chosen, ProfileBook
    from hyca.profiles.settings import RunSettings

    run = RunSettings(steps=10, guidance_scale=1.0, interval=3, warmup=2)
    calls = []

    def probe():
        calls.append(1)
        return random_profile(fp, seed=5, interval=3, warmup=2, chosen_for=run.to_json())

    book, pending = ProfileBook(), Chosen(None, AUTOMATIC, key=(fp["config_sha256"], AUTOMATIC, "", 3), fp=fp)
    first = book.for_settings(pending, run, (16, 8, 8), probe)
    again = book.for_settings(pending, run, (16, 8, 8), probe)
    saved = list(dirs["cache"].glob("*.safetensors"))
    assert len(calls) == 1 and len(saved) == 1 and again.profile is first.profile
    assert first.source == f"probe, saved to {saved[0]}"
    assert again.source == f"{saved[0]} (probed earlier this session)"
