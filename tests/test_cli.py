"""``python -m hyca``: show / compare / push / pull / probe, exit codes and one-line errors."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from hyca.cli import main
from hyca.math.solvers import pool_names
from hyca.adapters.diffusers.fingerprint import fingerprint
from hyca.profiles.fingerprint import describe
from hyca.profiles.settings import RunSettings
from hyca.profiles.io import load_profile, save_profile
from hyca.profiles.names import profile_filename
from hyca.profiles.profile import Profile

from hub_standin import HubStandIn
from profile_helpers import permuted, random_profile, tiny_fingerprint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def fp():
    return tiny_fingerprint()


@pytest.fixture()
def saved(tmp_path, fp):
    profile = random_profile(fp, interval=5, warmup=3, probe={"prompt": "a cat", "steps": 10})
    return profile, save_profile(profile, tmp_path / profile_filename(fp))


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hyca", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **(env or {})}, timeout=300)


def our_stderr(text: str) -> list[str]:
    """stderr lines written by hyca (libraries imported on the way may print notices)."""
    return [line for line in text.splitlines() if line.startswith("hyca ")]


def test_show_summarises_the_file(saved, fp, capsys):
    profile, path = saved
    assert main(["show", str(path)]) == 0
    out = capsys.readouterr().out
    assert describe(fp) in out
    assert "transformer_blocks x2" in out and "single_transformer_blocks x3" in out
    assert "5 blocks x 32 dims, 4 clusters per block" in out
    names = pool_names()
    clusters = Counter(profile.solvers.flatten().tolist())
    dims = Counter(profile.dim_solvers().flatten().tolist())
    for sid, n in dims.items():  # every solver in use, with its own counts
        noun = "cluster" if clusters[sid] == 1 else "clusters"
        assert f"{names[sid]}: {clusters[sid]} {noun}, {100 * n / profile.labels.numel():.1f}% of dims" in out
    assert "interval N=5, warm-up 3" in out and "prompt=a cat" in out
    created = load_profile(path).metadata["created"]
    assert f"created:   {created} by hyca 0.1.0 (format 1, solver pool 1)" in out


def test_show_reads_the_schedule_from_chosen_for_or_says_not_recorded(tmp_path, fp, capsys):
    """A profile saved without ``interval`` / ``warmup`` (a host's own probe): ``show`` gives
    the ones in ``chosen_for``, or says they are not recorded (it printed ``N=None``)."""
    profile = random_profile(fp)
    profile.metadata["chosen_for"] = {"steps": 10, "interval": 3, "warmup": 2}
    save_profile(profile, tmp_path / "told.safetensors", fp)
    save_profile(random_profile(fp), tmp_path / "bare.safetensors", fp)
    assert main(["show", str(tmp_path / "told.safetensors")]) == 0
    assert "chosen for interval N=3, warm-up 2" in capsys.readouterr().out
    assert main(["show", str(tmp_path / "bare.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "N=not recorded, warm-up not recorded" in out and "None" not in out


def test_show_marks_a_shared_labelling(tmp_path, fp, capsys):
    base = random_profile(fp)
    shared = Profile(base.labels[:1].expand(5, -1).clone(), base.solvers, base.metadata)
    main(["show", str(save_profile(shared, tmp_path / "s.safetensors"))])
    assert "one labelling shared by all blocks" in capsys.readouterr().out


def test_show_names_what_the_closed_loop_chose_beyond_the_solvers(saved, tmp_path, capsys):
    profile, _ = saved
    main(["show", str(save_profile(profile, tmp_path / "plain.safetensors"))])
    plain = capsys.readouterr().out
    assert "guard:" not in plain and "last step forecast" not in plain
    profile.metadata.update(guard=False, skip_last=True, first_interval=2)
    main(["show", str(save_profile(profile, tmp_path / "lite.safetensors"))])
    out = capsys.readouterr().out
    assert "first computed step 2 after warm-up, last step forecast" in out
    assert "guard:     off at the settings it was chosen for" in out
    assert "choice:" not in plain  # no closed-loop report in this profile
    profile.metadata["selection"] = {"closed_loop": {"chosen": "model,lite:uniform:taylor-1,no-guard", "trials": [
        {"name": "eq5", "fidelity_db": 30.0}, {"name": "model,lite:uniform:taylor-1,no-guard", "fidelity_db": 31.25}]}}
    main(["show", str(save_profile(profile, tmp_path / "chosen.safetensors"))])
    assert "choice:    model,lite:uniform:taylor-1,no-guard, the nearest of 2 cached runs (31.2 dB)" in \
        capsys.readouterr().out


def overall(out: str) -> float:
    return float(re.search(r"overall ARI \(mean over 5 blocks\): (-?[\d.]+)", out).group(1))


def test_compare_prints_per_block_and_overall_ari(saved, tmp_path, fp, capsys):
    profile, path = saved
    relabelled = save_profile(permuted(profile, seed=3), tmp_path / "b.safetensors")
    assert main(["compare", str(path), str(relabelled)]) == 0
    out = capsys.readouterr().out
    for name in ["transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.2"]:
        assert re.search(rf"^{re.escape(name)}\s+1\.000$", out, re.M), name
    assert overall(out) == 1.0
    assert "solver agreement: 100.0% of dims" in out and "same model: yes" in out

    other = save_profile(random_profile(fp, seed=11), tmp_path / "c.safetensors")
    main(["compare", str(path), str(other)])
    assert abs(overall(capsys.readouterr().out)) < 0.2  # independent labellings of 32 dims


def test_compare_of_different_models_exits_with_one_line(saved, tmp_path, capsys):
    small = Profile(torch.zeros(2, 8, dtype=torch.int64), torch.zeros(2, 1, dtype=torch.int64))
    other = save_profile(small, tmp_path / "small.safetensors",
                         {"class": "X", "hidden_size": 8, "blocks": {"b": 2}, "config_sha256": "0" * 64})
    assert main(["compare", str(saved[1]), str(other)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hyca compare: error: profiles cover different shapes")


def test_bad_file_is_exit_1_without_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"junk" * 10)
    assert main(["show", str(bad)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"hyca show: error: {bad}: not a profile file: it does not start with a safetensors header"]


def test_usage_errors_exit_2(capsys):
    for argv in ([], ["show"], ["compare", "only-one"], ["push", "f.safetensors"], ["nonsense"]):
        with pytest.raises(SystemExit) as err:
            main(argv)
        assert err.value.code == 2, argv


def test_module_entry_point_help_and_error_exit(tmp_path):
    helped = run_cli("--help")
    assert helped.returncode == 0
    for command in ("probe", "show", "compare", "push", "pull"):
        assert re.search(rf"^\s+{command}\s", helped.stdout, re.M), command
    failed = run_cli("show", str(tmp_path / "missing.safetensors"))
    assert failed.returncode == 1
    assert "Traceback" not in failed.stderr
    assert our_stderr(failed.stderr) == [f"hyca show: error: {tmp_path / 'missing.safetensors'}: no such profile file"]


def test_push_and_pull_through_the_hub_standin(saved, tmp_path, capsys, monkeypatch):
    """Push: the real command line, huggingface_hub pointed at the stand-in by HF_ENDPOINT.
    Pull: in-process with --endpoint (a subprocess costs seconds of imports)."""
    from huggingface_hub import constants

    _, path = saved
    with HubStandIn() as hub:
        env = {"HF_ENDPOINT": hub.endpoint, "HF_HUB_OFFLINE": "0", "HF_TOKEN": hub.token,
               "HF_HOME": str(tmp_path / "hf-home")}
        pushed = run_cli("push", str(path), "--repo", "me/profiles", env=env)
        assert pushed.returncode == 0, pushed.stderr
        assert f"uploaded {path} to {hub.endpoint}/me/profiles/blob/main/{path.name}" in pushed.stdout
        assert hub.state.repos["me/profiles"].files[path.name] == path.read_bytes()

        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        common = ["--repo", "me/profiles", "--endpoint", hub.endpoint, "--cache-dir", str(tmp_path / "hf")]
        assert main(["pull", *common, "--file", path.name, "-o", str(tmp_path / "got")]) == 0
        assert (tmp_path / "got" / path.name).read_bytes() == path.read_bytes()
        capsys.readouterr()
        assert main(["pull", *common, "--file", "nope.safetensors"]) == 1
        assert capsys.readouterr().err.strip().splitlines() == [
            "hyca pull: error: Hub repo me/profiles has no file nope.safetensors: check the file name "
            "(hyca probe names files <Class>-<config hash>.safetensors)"]
        assert main(["push", str(path), "--repo", "me/profiles", "--endpoint", hub.endpoint, "--token", "bad"]) == 1
        assert capsys.readouterr().err.startswith("hyca push: error: Hub refused access to me/profiles (HTTP 401)")


def test_probe_writes_a_profile_for_a_saved_reference_model(tmp_path, capsys):
    reference = pytest.importorskip("hyca.reference")
    reference.tiny_components().save_pretrained(tmp_path / "ref")
    folder = tmp_path / "profiles"
    folder.mkdir()
    code = main(["probe", "--model", str(tmp_path / "ref"), "--prompt", "a red circle", "--height", "32",
                 "--width", "32", "--steps", "8", "--interval", "3", "--warmup", "2", "--clusters", "2",
                 "--guidance-scale", "2.5", "--shift", "3", "-o", str(folder)])
    assert code == 0
    transformer = reference.load_pipeline(tmp_path / "ref").transformer
    run = RunSettings(steps=8, guidance_scale=2.5, shift=3.0, interval=3, warmup=2, compute_last=True,
                      positions="step")
    out = folder / profile_filename(fingerprint(transformer), 3, run)  # the name lookup tries first for these settings
    assert f"saved profile to {out}" in capsys.readouterr().out
    profile = load_profile(out, fingerprint(transformer))
    assert (profile.metadata["interval"], profile.metadata["warmup"]) == (3, 2)
    assert RunSettings.of_profile(profile.metadata) == run
    assert profile.metadata["selection"]["branches"] == ["cond", "uncond"]  # guided: both branches recorded
    assert profile.metadata["probe"]["prompt"] == "a red circle" and profile.num_clusters == 2


def test_probe_takes_candidates_and_singles_as_comma_lists(tmp_path, capsys):
    """--candidates bounds every solver the profile may use, --singles those tried alone
    (recorded in the profile's metadata); a wrong name is a usage error naming the known ones."""
    from hyca.math.solvers import pool_names

    reference = pytest.importorskip("hyca.reference")
    reference.tiny_components().save_pretrained(tmp_path / "ref")
    out = tmp_path / "p.safetensors"
    assert main(["probe", "--model", str(tmp_path / "ref"), "--prompt", "a red circle", "--height", "32",
                 "--width", "32", "--steps", "8", "--interval", "3", "--warmup", "2", "--clusters", "2",
                 "--candidates", "reuse, taylor-1", "--singles", "reuse", "-o", str(out)]) == 0
    profile = load_profile(out)
    assert profile.metadata["probe"]["singles"] == ["reuse"]
    assert profile.metadata["probe"]["candidates"] == ["reuse", "taylor-1"]  # recorded, shown by `show`
    assert {pool_names()[i] for i in profile.solvers.unique().tolist()} <= {"reuse", "taylor-1"}
    capsys.readouterr()
    with pytest.raises(SystemExit) as err:
        main(["probe", "--model", "reference", "--candidates", "reuse,taylor-9"])
    assert err.value.code == 2 and "unknown solver 'taylor-9'; known solvers:" in capsys.readouterr().err


@pytest.mark.parametrize("target", ["output", "residual"])
def test_probe_keeps_to_the_target_named(tmp_path, capsys, target):
    """--target output probes the output head's input, which the default no longer tries (it
    tries the model output, a linear map away); the profile forecasts what was named, and
    `show` says so."""
    reference = pytest.importorskip("hyca.reference")
    reference.tiny_components().save_pretrained(tmp_path / "ref")
    out = tmp_path / "p.safetensors"
    assert main(["probe", "--model", str(tmp_path / "ref"), "--prompt", "a red circle", "--height", "32",
                 "--width", "32", "--steps", "8", "--interval", "3", "--warmup", "2", "--clusters", "2",
                 "--candidates", "reuse,taylor-1", "--target", target, "-o", str(out)]) == 0
    profile = load_profile(out)
    assert profile.metadata.get("target", "residual") == target
    names = [t["name"] for t in profile.metadata["selection"]["closed_loop"]["trials"]]
    assert all(n.startswith("output") == (target == "output") for n in names), names
    capsys.readouterr()
    assert main(["show", str(out)]) == 0
    shown = capsys.readouterr().out
    assert ("output head's input" in shown) == (target == "output"), shown


def test_probe_without_output_saves_to_the_cache_where_lookup_finds_it(tmp_path, capsys, monkeypatch):
    """No -o: the profile goes to $HYCA_CACHE (not the shipped profiles/ folder, which would
    outrank the cache), under the name the lookup tries first for its settings."""
    from hyca.profiles.sources import resolve_profile

    reference = pytest.importorskip("hyca.reference")
    reference.tiny_components().save_pretrained(tmp_path / "ref")
    monkeypatch.setenv("HYCA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HYCA_PROFILES", str(tmp_path / "none"))
    assert main(["probe", "--model", str(tmp_path / "ref"), "--prompt", "a red circle", "--height", "32",
                 "--width", "32", "--steps", "8", "--interval", "3", "--warmup", "2", "--clusters", "2",
                 "--selection", "eq5"]) == 0
    transformer = reference.load_pipeline(tmp_path / "ref").transformer
    run = RunSettings(steps=8, guidance_scale=None, shift=None, interval=3, warmup=2, compute_last=True,
                      positions="step")
    (saved,) = (tmp_path / "cache").glob("*.safetensors")
    assert f"saved profile to {saved}" in capsys.readouterr().out
    found = resolve_profile(fingerprint(transformer), run=run, offline=True)
    assert (found.source, found.path) == ("cache", saved)


def test_probe_of_a_missing_model_is_one_line(tmp_path, capsys):
    assert main(["probe", "--model", str(tmp_path / "no-such-model")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"hyca probe: error: --model {tmp_path / 'no-such-model'}: no such folder"]


@pytest.mark.parametrize("argv, message", [
    (["--height", "0"], "--height must be a positive number of pixels, got 0"),
    (["--width", "-8"], "--width must be a positive number of pixels, got -8"),
    (["--seed", "-5"], "--seed must be between 0 and 2**32 - 1, got -5"),
    (["--guidance-scale", "-2"], "--guidance-scale must be >= 0 (1 = no guidance), got -2.0"),
    (["--shift", "0"], "--shift must be positive, got 0.0"),
    (["--clusters", "0"], "--clusters must be at least 1 (clusters per block), got 0"),
    (["--device", "foo"], "--device 'foo' is not a torch device"),
    (["--candidates", "reuse", "--singles", "taylor-2"],
     "--candidates / --singles: singles ['taylor-2'] are not among the candidates ['reuse']"),
    (["-o", "/no/such/folder/p.safetensors"],
     "-o /no/such/folder/p.safetensors: the folder /no/such/folder does not exist"),
    (["-o", "p.txt"], "-o p.txt: a profile file is a .safetensors file; name it p.safetensors, or give a folder"),
    (["-o", "p.safetensors.bak"], "-o p.safetensors.bak: a profile file is a .safetensors file; name it p.safetensors,"),
])
def test_probe_arguments_are_checked_before_any_model_loads(argv, message, capsys):
    assert main(["probe", "--model", "reference", *argv]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"hyca probe: error: {message}"), err


def test_probe_on_a_cuda_device_without_one_is_one_line(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["probe", "--model", "reference", "--device", "cuda"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no CUDA device here" in err[0]


def test_show_of_a_folder_says_so(tmp_path, capsys):
    assert main(["show", str(tmp_path)]) == 1
    assert capsys.readouterr().err.strip() == (f"hyca show: error: {tmp_path} is a folder; give one of its "
                                               ".safetensors profile files")
