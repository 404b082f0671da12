"""Profile files: exact round trip, and every kind of bad file rejected with its own message."""

from __future__ import annotations

import datetime as dt
import json
import os
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import hyca
from hyca.math.solvers import POOL_VERSION, pool_names
from hyca.adapters.diffusers.fingerprint import fingerprint
from hyca.profiles.io import FORMAT_VERSION, ProfileError, load_profile, save_profile
from hyca.profiles.names import profile_filename

from profile_helpers import random_profile, read_parts, tiny_fingerprint, write_parts
from tiny import tiny_flux


@pytest.fixture()
def fp():
    return tiny_fingerprint()


@pytest.fixture()
def saved(tmp_path, fp):
    profile = random_profile(fp, interval=5, warmup=3, probe={"prompt": "a cat", "steps": 10}, note=[1, "x"])
    return profile, save_profile(profile, tmp_path / profile_filename(fp))


# --- round trip -----------------------------------------------------------------------------

def test_round_trip_keeps_tensors_and_metadata(saved, fp):
    profile, path = saved
    loaded = load_profile(path, fp)
    assert torch.equal(loaded.labels, profile.labels) and loaded.labels.dtype == torch.int64
    assert torch.equal(loaded.solvers, profile.solvers) and loaded.solvers.dtype == torch.int64
    for key, value in profile.metadata.items():
        assert loaded.metadata[key] == value, key
    assert loaded.metadata["format_version"] == FORMAT_VERSION
    assert loaded.metadata["pool_version"] == POOL_VERSION
    assert loaded.metadata["hyca_version"] == hyca.__version__
    created = dt.datetime.strptime(loaded.metadata["created"], "%Y-%m-%dT%H:%M:%SZ")
    assert abs(dt.datetime.now(dt.timezone.utc).replace(tzinfo=None) - created) < dt.timedelta(minutes=5)


def test_file_layout_small_dtypes_and_header(saved, fp):
    profile, path = saved
    tensors, header = read_parts(path)
    assert set(tensors) == {"labels", "solvers"}
    assert tensors["labels"].dtype == torch.uint8 and tensors["solvers"].dtype == torch.uint8
    assert header["format"] == "hyca-profile"
    assert header["solver_pool"] == {"version": POOL_VERSION, "names": list(pool_names())}
    assert header["fingerprint"] == fingerprint(tiny_flux())
    assert (header["interval"], header["warmup"]) == (5, 3)
    assert header["probe"] == {"prompt": "a cat", "steps": 10}
    assert header["metadata"] == {"note": [1, "x"]}


def test_many_clusters_use_a_wider_dtype(tmp_path, fp):
    profile = random_profile(fp, clusters=300)
    path = save_profile(profile, tmp_path / "p.safetensors")
    assert read_parts(path)[0]["labels"].dtype == torch.int16
    assert torch.equal(load_profile(path).labels, profile.labels)


def test_arguments_override_metadata(tmp_path, fp):
    profile = random_profile(fp, interval=5)
    del profile.metadata["fingerprint"]
    path = save_profile(profile, tmp_path / "p.safetensors", fingerprint(tiny_flux()), interval=7, warmup=2)
    loaded = load_profile(path)
    assert (loaded.metadata["interval"], loaded.metadata["warmup"]) == (7, 2)
    assert loaded.metadata["fingerprint"] == fp


def test_saving_needs_a_model(tmp_path, fp):
    profile = random_profile(fp)
    del profile.metadata["fingerprint"]
    with pytest.raises(ProfileError, match="must name its model"):
        save_profile(profile, tmp_path / "p.safetensors")
    with pytest.raises(ProfileError, match="plain JSON"):
        save_profile(random_profile(fp, bad=object()), tmp_path / "p.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_probe_metadata_is_kept_with_non_finite_numbers_as_null(tmp_path, fp):
    """What hyca.probing puts in metadata (nested reports, its own timestamps) survives the file."""
    report = {"blocks": [[{"solver": "reuse", "errors": [0.5, float("nan"), float("inf")]}]]}
    profile = random_profile(fp, interval=4, compute_last=True, positions="sigma", selection=report,
                             created="2000-01-01T00:00:00+00:00", pool_version=POOL_VERSION)
    path = save_profile(profile, tmp_path / "p.safetensors")
    header = read_parts(path)[1]
    assert header["metadata"]["selection"]["blocks"][0][0]["errors"] == [0.5, None, None]
    assert "created" not in header["metadata"] and "pool_version" not in header["metadata"]
    loaded = load_profile(path)
    assert (loaded.metadata["compute_last"], loaded.metadata["positions"]) == (True, "sigma")
    assert loaded.metadata["created"] == header["created"] != "2000-01-01T00:00:00+00:00"


def test_solvers_are_mapped_by_name_not_position(tmp_path, saved):
    """A file whose pool lists the solvers in another order still means the same solvers."""
    profile, path = saved
    tensors, header = read_parts(path)
    names = list(pool_names())
    order = list(reversed(range(len(names))))  # file position i holds pool solver order[i]
    header["solver_pool"]["names"] = [names[i] for i in order]
    to_file = torch.tensor([order.index(i) for i in range(len(names))], dtype=torch.uint8)
    tensors["solvers"] = to_file[profile.solvers]
    loaded = load_profile(write_parts(tmp_path / "reordered.safetensors", tensors, header))
    assert torch.equal(loaded.solvers, profile.solvers)


def test_profile_filename(fp):
    stem = f"FluxTransformer2DModel-{fp['config_sha256'][:12]}"
    assert profile_filename(fp) == f"{stem}.safetensors"
    assert profile_filename(fp, 6) == f"{stem}-n6.safetensors"


# --- warnings: usable, but not what it was made for ------------------------------------------

def test_other_interval_loads_with_a_warning(saved):
    _, path = saved
    with pytest.warns(UserWarning, match=r"chosen for interval N=5, it is used at N=6"):
        load_profile(path, interval=6)


def test_a_profile_used_at_n1_draws_no_accuracy_warning(saved, recwarn):
    """N=1 computes every step: no forecast, so nothing about the profile's accuracy there."""
    _, path = saved
    load_profile(path, interval=1)
    assert not [w for w in recwarn if "chosen for interval" in str(w.message)]


def test_other_pool_version_warns(tmp_path, saved):
    _, path = saved
    tensors, header = read_parts(path)
    header["solver_pool"]["version"] = POOL_VERSION + 1
    with pytest.warns(UserWarning, match="solver pool version"):
        load_profile(write_parts(tmp_path / "v.safetensors", tensors, header))


# --- bad files --------------------------------------------------------------------------------

def forge(tmp_path, path, edit_header=None, edit_tensors=None, raw_header=None):
    tensors, header = read_parts(path)
    if edit_header:
        edit_header(header)
    if edit_tensors:
        edit_tensors(tensors)
    return write_parts(tmp_path / "forged.safetensors", tensors, raw_header if raw_header is not None else header)


def test_truncated_file(tmp_path, saved):
    _, path = saved
    data = path.read_bytes()
    for size, message in [(len(data) - 10, "truncated file: its tensors need"), (50, "truncated file: the header"),
                          (5, "too short")]:
        cut = tmp_path / f"cut{size}.safetensors"
        cut.write_bytes(data[:size])
        with pytest.raises(ProfileError, match=message):
            load_profile(cut)


def test_flipped_data_byte_fails_the_checksum(tmp_path, saved):
    _, path = saved
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # the last solver id: still in range, so only the checksum can tell
    bad = tmp_path / "flipped-data.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(ProfileError, match="tensor data does not match its checksum"):
        load_profile(bad)


def test_fuzzed_files_fail_only_with_profile_errors(tmp_path, saved):
    """Random byte flips and cuts anywhere: a ProfileError, never another exception. The
    few files that load had a flip in free text of the header (a date, a version): their
    tensors are intact (the checksum covers the tensors, not the header)."""
    profile, path = saved
    data = path.read_bytes()
    rng = np.random.default_rng(0)
    outcomes = Counter()
    for i in range(300):
        fuzzed = bytearray(data)
        if i % 3 == 0:
            fuzzed = fuzzed[: int(rng.integers(0, len(data)))]
        else:
            for pos in rng.integers(0, len(data), size=int(rng.integers(1, 4))):
                fuzzed[pos] = int(rng.integers(0, 256))
        target = tmp_path / "fuzzed.safetensors"
        target.write_bytes(bytes(fuzzed))
        try:
            loaded = load_profile(target)
        except ProfileError:
            outcomes["rejected"] += 1
            continue
        assert torch.equal(loaded.labels, profile.labels) and torch.equal(loaded.solvers, profile.solvers)
        outcomes["loaded"] += 1
    assert outcomes["rejected"] > 250


def test_oversized_file_is_refused_before_reading(tmp_path, monkeypatch):
    from hyca.profiles import io

    big = tmp_path / "big.safetensors"
    big.write_bytes(b"\0" * 2048)
    monkeypatch.setattr(io, "MAX_FILE_BYTES", 1024)
    with pytest.raises(ProfileError, match="far larger than any profile"):
        load_profile(big)


def test_corrupt_header_bytes(tmp_path, saved):
    _, path = saved
    data = bytearray(path.read_bytes())
    data[8:12] = b"\xff\xfe\x00!"  # the JSON header now starts with garbage
    bad = tmp_path / "flipped.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(ProfileError, match="header is not valid JSON"):
        load_profile(bad)


def test_foreign_safetensors_file(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"weight": torch.zeros(3, 3)}, str(path))
    with pytest.raises(ProfileError, match=r"not a HyCa profile.*tensors: weight"):
        load_profile(path)


def test_pickles_are_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "unpickled"

    class Trap:
        def __reduce__(self):  # unpickling this would create the marker file
            return (open, (str(marker), "w"))

    raw = tmp_path / "raw.safetensors"
    raw.write_bytes(pickle.dumps(Trap(), protocol=4))
    with pytest.raises(ProfileError, match="Python pickle"):
        load_profile(raw)
    zipped = tmp_path / "torch.safetensors"
    torch.save({"labels": torch.zeros(2, 2)}, zipped)
    with pytest.raises(ProfileError, match="zip archive.*never loads pickles"):
        load_profile(zipped)
    assert not marker.exists()


def test_newer_format_version(tmp_path, saved):
    bad = forge(tmp_path, saved[1], edit_header=lambda h: h.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(ProfileError, match=rf"format version {FORMAT_VERSION + 1} is newer.*upgrade hyca"):
        load_profile(bad)


def test_unknown_solver_name(tmp_path, saved):
    profile, path = saved
    used = int(profile.solvers[0, 0])

    def rename(header):
        header["solver_pool"]["names"][used] = "adams-magic-9"

    with pytest.raises(ProfileError, match="uses solver 'adams-magic-9', which this hyca does not know"):
        load_profile(forge(tmp_path, path, edit_header=rename))


def test_wrong_dims_for_the_fingerprint(tmp_path, saved):
    bad = forge(tmp_path, saved[1], edit_header=lambda h: h["fingerprint"].update(hidden_size=64))
    with pytest.raises(ProfileError, match=r"labels have shape \(5, 32\).*needs \(5, 64\)"):
        load_profile(bad)


def test_wrong_shape_and_dtype(tmp_path, saved):
    _, path = saved
    one_d = forge(tmp_path, path, edit_tensors=lambda t: t.update(labels=t["labels"].flatten()))
    with pytest.raises(ProfileError, match="labels have shape"):
        load_profile(one_d)
    floats = forge(tmp_path, path, edit_tensors=lambda t: t.update(labels=t["labels"].float()))
    with pytest.raises(ProfileError, match="labels has dtype torch.float32, expected an integer dtype"):
        load_profile(floats)
    extra = forge(tmp_path, path, edit_tensors=lambda t: t.update(bonus=torch.zeros(1)))
    with pytest.raises(ProfileError, match="expected tensors labels and solvers"):
        load_profile(extra)


def test_labels_out_of_range(tmp_path, saved):
    bad = forge(tmp_path, saved[1], edit_tensors=lambda t: t["labels"].__setitem__((0, 0), 9))
    with pytest.raises(ProfileError, match=r"labels span \[0, 9\] but there are 4 clusters"):
        load_profile(bad)


@pytest.mark.parametrize("edit, message", [
    (lambda h: "not json {", "HyCa metadata is not valid JSON"),
    (lambda h: "[" * 100000 + "]" * 100000, "HyCa metadata is not valid JSON"),
    (lambda h: json.dumps([1, 2]), "does not declare format"),
    (lambda h: {**h, "format_version": "1"}, "'format_version' is '1', expected int"),
    (lambda h: {**h, "format_version": True}, "'format_version' is True, expected int"),
    (lambda h: {**h, "interval": "five"}, "'interval' is 'five'"),
    (lambda h: {**h, "interval": 0}, "interval 0 / warm-up 3 in its metadata"),
    (lambda h: {**h, "warmup": -2}, "interval 5 / warm-up -2 in its metadata"),
    (lambda h: {**h, "warmup": 0}, r"interval 5 / warm-up 0 in its metadata \(an interval is at least 1 and a warm-up at "
                                   "least 1\)"),  # hyca.enable refuses warm-up 0 too: the first step has no history
    (lambda h: {**h, "metadata": {"chosen_for": {"steps": -3}}}, "'steps' is -3, expected at least 1"),
    (lambda h: {**h, "fingerprint": {**h["fingerprint"], "hidden_size": "32"}}, "field 'hidden_size' is '32'"),
    (lambda h: {**h, "fingerprint": {**h["fingerprint"], "blocks": {"x": -1}}}, "positive counts"),
    (lambda h: {**h, "solver_pool": {"version": 1, "names": "reuse"}}, "list of solver names"),
    (lambda h: {**h, "metadata": ["not", "a", "dict"]}, "'metadata' is"),
    # the keys the engine runs by: a value it could not apply was ignored without a word
    (lambda h: {**h, "metadata": {"target": "banana"}}, "target 'banana' in its metadata; HyCa forecasts one of"),
    *[(lambda h, v=v: {**h, "metadata": {"first_interval": v}}, rf"first_interval {v!r} in its metadata")
      for v in (-3, 0, 6, "two", 2.0, True)],
    (lambda h: {**h, "metadata": {"skip_last": "yes"}}, "skip_last 'yes' in its metadata"),
    (lambda h: {**h, "metadata": {"guard": 0}}, "guard 0 in its metadata"),
    (lambda h: {**h, "metadata": {"compute_last": "x"}}, "compute_last 'x' in its metadata"),
    (lambda h: {**h, "metadata": {"positions": "bogus"}}, "positions 'bogus' in its metadata"),
    (lambda h: {**h, "metadata": {"chosen_for": "x"}}, "chosen_for 'x' in its metadata"),
    (lambda h: {**h, "metadata": {"chosen_for": {"interval": 4}}}, "N=4 in its settings but N=5 in its header"),
])
def test_hostile_metadata(tmp_path, saved, edit, message):
    _, path = saved
    tensors, header = read_parts(path)
    bad = write_parts(tmp_path / "hostile.safetensors", tensors, edit(header))
    with pytest.raises(ProfileError, match=message):
        load_profile(bad)


def test_model_mismatch_is_named(saved, fp):
    _, path = saved
    with pytest.raises(ProfileError, match="made for FluxTransformer2DModel, not SD3Transformer2DModel"):
        load_profile(path, {**fp, "class": "SD3Transformer2DModel"})
    with pytest.raises(ProfileError, match=r"blocks .* x 32 dims, this model has blocks"):
        load_profile(path, fingerprint(tiny_flux(num_single_layers=4)))
    with pytest.raises(ProfileError, match="differently configured FluxTransformer2DModel"):
        load_profile(path, fingerprint(tiny_flux(guidance_embeds=True)))
    assert load_profile(path, fingerprint(tiny_flux())).num_blocks == 5  # the real model fits


def test_the_core_takes_fingerprints_not_host_models(saved):
    """Profiles are host-free: a diffusers transformer is refused with the adapter's function to call."""
    _, path = saved
    with pytest.raises(TypeError, match=r"hyca\.adapters\.diffusers\.fingerprint\.fingerprint"):
        load_profile(path, tiny_flux())


def test_missing_file(tmp_path):
    with pytest.raises(ProfileError, match="no such profile file"):
        load_profile(tmp_path / "nope.safetensors")


# --- atomic writes ----------------------------------------------------------------------------

def test_interrupted_save_leaves_old_file_and_no_partial(tmp_path, saved, fp, monkeypatch):
    _, path = saved
    before = path.read_bytes()
    import safetensors.torch

    def half_then_fail(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x10\x00\x00\x00half a file")
        raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of the write

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_fail)
    with pytest.raises(KeyboardInterrupt):
        save_profile(random_profile(fp, seed=9), path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == [path.name]
    with pytest.raises(KeyboardInterrupt):
        save_profile(random_profile(fp, seed=9), tmp_path / "new.safetensors")
    assert sorted(os.listdir(tmp_path)) == [path.name]



def test_a_saved_profile_has_the_umask_s_permissions(tmp_path, fp):
    """Written through a private temporary file, but shared folders ($HYCA_PROFILES) need
    the permissions any new file gets."""
    import os

    previous = os.umask(0o022)
    try:
        path = save_profile(random_profile(fp), tmp_path / "p.safetensors")
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o644
