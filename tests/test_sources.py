"""Where profiles come from: explicit path > HYCA_PROFILES > shipped > cache > Hub > probe,
and every broken source is a warning and the next source, never a crash."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

from hyca.adapters.diffusers.fingerprint import fingerprint
from hyca.profiles import sources
from hyca.profiles.io import ProfileError, load_profile, save_profile
from hyca.profiles.names import profile_filename
from hyca.profiles.profile import Profile
from hyca.profiles.sources import candidate_names, default_cache_dir, resolve_profile

from hub_standin import closed_port_endpoint, hub, online  # noqa: F401  (fixtures)
from profile_helpers import random_profile, tiny_fingerprint

REPO = "someone/hyca-profiles"


@pytest.fixture()
def fp():
    return tiny_fingerprint()


@pytest.fixture()
def dirs(tmp_path, monkeypatch):
    """Empty extra, shipped and cache folders; the Hub off unless a test names a repo."""
    d = {name: tmp_path / name for name in ("extra", "shipped", "cache", "hf")}
    for folder in d.values():
        folder.mkdir()
    monkeypatch.setenv("HYCA_PROFILES", str(d["extra"]))
    monkeypatch.setattr(sources, "shipped_dir", lambda: d["shipped"])
    monkeypatch.setenv("HYCA_CACHE", str(d["cache"]))
    monkeypatch.setenv("HYCA_HUB_REPO", "none")
    monkeypatch.setattr(sources, "_TOLD_ONCE", set())  # what is said once per process: said afresh per test
    return d


class Probe:
    """A probe callable that records its calls and returns a fixed profile."""

    def __init__(self, profile):
        self.profile, self.calls = profile, 0

    def __call__(self):
        self.calls += 1
        return self.profile


def same(a, b) -> bool:
    return torch.equal(a.labels, b.labels) and torch.equal(a.solvers, b.solvers)


def test_order_of_sources(dirs, fp, hub, tmp_path):
    """Each source wins over all later ones; removing it hands over to the next."""
    profiles = {name: random_profile(fp, seed=i) for i, name in
                enumerate(["path", "extra", "shipped", "cache", "hub", "probe"])}
    explicit = save_profile(profiles["path"], tmp_path / "mine.safetensors")
    placed = {name: save_profile(profiles[name], dirs[name] / profile_filename(fp))
              for name in ("extra", "shipped", "cache")}
    push = save_profile(profiles["hub"], tmp_path / "hub.safetensors")
    hub.state.put_file(REPO, profile_filename(fp), push.read_bytes())
    probe = Probe(profiles["probe"])

    def resolve(hub_cache=dirs["hf"], **kw):
        return resolve_profile(fp, hub_repo=REPO, hub_endpoint=hub.endpoint, hub_cache_dir=hub_cache,
                               probe=probe, **kw)

    found = resolve(path=explicit)
    assert (found.source, found.path) == ("path", explicit) and same(found.profile, profiles["path"])
    assert found.profile.source == str(explicit)  # what a run reports as its profile (RunStats.profile)
    words = {"extra": "($HYCA_PROFILES)", "shipped": "(shipped with hyca)", "cache": "(local cache)"}
    for name in ("extra", "shipped", "cache"):
        found = resolve()
        assert (found.source, found.path) == (name, placed[name]) and same(found.profile, profiles[name])
        assert found.warnings == [] and found.profile.source == f"{placed[name]} {words[name]}"
        placed[name].unlink()
    found = resolve()
    assert found.source == "hub" and same(found.profile, profiles["hub"]) and found.warnings == []
    assert found.profile.source == f"{profile_filename(fp)} from the Hub repo {REPO}"
    hub.state.repos.clear()
    # (huggingface_hub would still serve its cached copy of a vanished repo: use an empty Hub cache)
    with pytest.warns(UserWarning, match="not found"):
        found = resolve(hub_cache=tmp_path / "fresh-hf")
    assert found.source == "probe" and probe.calls == 1 and same(found.profile, profiles["probe"])
    assert found.path.parent == dirs["cache"] and found.profile.source == f"probed on first use, saved to {found.path}"


def test_a_profile_a_probe_replaces_is_not_said_to_be_used(dirs, fp):
    """Only an N=5 profile in the cache, a run at N=7 that probes for its settings: the
    N=5 file's "it is used at N=7" is not said (the probe's profile is used); without a probe
    the N=5 profile is used and it is said."""
    from hyca.profiles.settings import RunSettings

    save_profile(random_profile(fp, seed=1, interval=5), dirs["cache"] / profile_filename(fp))
    made = Probe(random_profile(fp, seed=2, interval=7))
    found = resolve_profile(fp, run=RunSettings(interval=7, steps=20), probe=made, probe_if_mismatched=True,
                            warn=False)
    assert found.source == "probe" and not any("it is used at N=7" in w for w in found.warnings)
    found.path.unlink()  # the probe's profile, saved to the cache
    found = resolve_profile(fp, run=RunSettings(interval=7, steps=20), warn=False)
    assert found.source == "cache" and any("it is used at N=7" in w for w in found.warnings)


def test_a_profile_for_given_sigmas_is_not_taken_for_the_schedulers_own(dirs, fp):
    """A run told without ``sigmas`` samples its scheduler's own schedule (the app, a pipeline
    call): a cached profile chosen for custom sigmas at the same step count differs from it and
    is probed past (a helper's app run took one without a word); ``own_sigmas=False`` (the
    schedule unknown) still takes it."""
    from hyca.profiles.settings import RunSettings

    sigmas = (1.0, 0.8, 0.5, 0.3, 0.1)
    custom = RunSettings(steps=5, sigmas=sigmas, interval=2, warmup=1)
    save_profile(random_profile(fp, seed=1, interval=2, chosen_for=custom.to_json()),
                 dirs["cache"] / profile_filename(fp, 2, custom))
    own = RunSettings(steps=5, interval=2, warmup=1)
    made = Probe(random_profile(fp, seed=2, interval=2, chosen_for=own.to_json()))
    found = resolve_profile(fp, run=own, probe=made, probe_if_mismatched=True, warn=False)
    assert found.source == "probe" and made.calls == 1
    found.path.unlink()
    found = resolve_profile(fp, run=own, warn=False)  # no probe: the closest, what differs said
    assert found.source == "cache" and any("sigmas" in d for d in found.differences), found.differences
    assert resolve_profile(fp, run=own, warn=False, own_sigmas=False).differences == []


def test_a_profile_under_a_name_of_the_users_choosing_is_found_by_its_header(dirs, fp):
    """Names only order the search (docs/profiles.md): a file the user named
    ``my-profile.safetensors`` in $HYCA_PROFILES or the cache, chosen for the run's settings,
    is used (it was skipped without a word, and a duplicate probed); one made for another
    model under such a name stays out, without a warning (folders are shared by models)."""
    from hyca.profiles.settings import RunSettings

    run = RunSettings(steps=20, interval=4, warmup=3)
    mine = save_profile(random_profile(fp, seed=3, interval=4, chosen_for=run.to_json()),
                        dirs["extra"] / "my-profile.safetensors")
    other_fp = {**fp, "config_sha256": "0" * 64}
    save_profile(random_profile(other_fp, seed=4, interval=4, chosen_for=run.to_json()),
                 dirs["extra"] / "aaa-other-model.safetensors")
    made = Probe(random_profile(fp, seed=5, interval=4))
    found = resolve_profile(fp, run=run, probe=made, probe_if_mismatched=True, warn=False)
    assert found.path == mine and found.differences == [] and made.calls == 0 and found.warnings == []
    mine.rename(dirs["cache"] / "mine.safetensors")
    assert resolve_profile(fp, run=run, warn=False).path == dirs["cache"] / "mine.safetensors"


def test_interval_specific_file_is_preferred(dirs, fp):
    general = save_profile(random_profile(fp, seed=1, interval=5), dirs["cache"] / profile_filename(fp))
    specific = save_profile(random_profile(fp, seed=2, interval=6), dirs["cache"] / profile_filename(fp, 6))
    assert candidate_names(fp, 6) == [specific.name, general.name]
    assert resolve_profile(fp, interval=6).path == specific
    with pytest.warns(UserWarning, match="chosen for interval N=5, it is used at N=7"):
        found = resolve_profile(fp, interval=7)
    assert found.path == general and len(found.warnings) == 1


def test_corrupt_cache_falls_through_to_probe_and_is_replaced(dirs, fp):
    cached = dirs["cache"] / profile_filename(fp)
    cached.write_bytes(b"\x20\x00\x00\x00\x00\x00\x00\x00{half")
    probe = Probe(random_profile(fp, seed=3, interval=5, warmup=2))
    with pytest.warns(UserWarning, match="skipping cache profile.*truncated"):
        found = resolve_profile(fp, probe=probe)
    assert (found.source, found.path, probe.calls) == ("probe", cached, 1)
    assert any("truncated" in w for w in found.warnings)
    # The probed profile replaced the corrupt file and is found there next time, without probing.
    assert same(load_profile(cached, fp), probe.profile)
    again = resolve_profile(fp, probe=probe)
    assert (again.source, probe.calls) == ("cache", 1) and again.warnings == []


def test_profile_for_another_model_is_skipped(dirs, fp):
    other = {**fp, "config_sha256": "f" * 64}
    save_profile(random_profile(other), dirs["shipped"] / profile_filename(fp))  # right name, wrong model
    good = save_profile(random_profile(fp, seed=4), dirs["cache"] / profile_filename(fp))
    with pytest.warns(UserWarning, match="skipping shipped profile.*differently configured"):
        found = resolve_profile(fp)
    assert found.path == good


def test_a_profile_of_a_target_the_host_cannot_apply_is_passed_over(dirs, fp):
    """A host that hooks the blocks only (ComfyUI, a WebUI) asks for residual profiles: a
    model-output profile ahead of the residual one in the search order is passed over, said;
    with nothing runnable left the host's own probe runs."""
    g = torch.Generator().manual_seed(5)  # one "block": the model output, as wide as the model names it
    model_output = Profile(torch.randint(0, 4, (1, 32), generator=g), torch.zeros(1, 4, dtype=torch.long),
                           {"fingerprint": fp, "target": "model_output"})
    shipped = save_profile(model_output, dirs["shipped"] / profile_filename(fp))
    residual = save_profile(random_profile(fp, seed=6), dirs["cache"] / profile_filename(fp))
    assert resolve_profile(fp).path == shipped  # a host that applies every target takes the first
    with pytest.warns(UserWarning, match="passing over .*forecasts the model output.*applies the blocks' residuals"):
        found = resolve_profile(fp, targets=("residual",))
    assert found.path == residual and len(found.warnings) == 1
    residual.unlink()
    probe = Probe(random_profile(fp, seed=7))
    with pytest.warns(UserWarning, match="passing over"):
        probed = resolve_profile(fp, targets=("residual", "output"), probe=probe)
    assert (probed.source, probe.calls) == ("probe", 1) and same(probed.profile, probe.profile)


def test_offline_skips_the_hub_with_one_warning(dirs, fp, monkeypatch):
    """The test suite runs with HF_HUB_OFFLINE=1: the default Hub repo is skipped, not a crash."""
    monkeypatch.setenv("HYCA_HUB_REPO", REPO)
    probe = Probe(random_profile(fp))
    with pytest.warns(UserWarning, match=r"offline mode \(HF_HUB_OFFLINE=1\)"):
        found = resolve_profile(fp, probe=probe, hub_cache_dir=dirs["hf"])
    assert found.source == "probe" and len(found.warnings) == 1 and REPO in found.warnings[0]
    # a deliberately offline user hears it once per process, not at every new setting; the
    # result still lists it
    import warnings

    found.path.unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = resolve_profile(fp, probe=probe, hub_cache_dir=dirs["hf"], interval=7)
    assert again.source == "probe" and len(again.warnings) == 1 and "offline mode" in again.warnings[0]


def test_offline_still_reads_a_prepopulated_hub_cache(dirs, fp, hub, monkeypatch, tmp_path):
    from huggingface_hub import constants

    profile = random_profile(fp, seed=5, interval=5)
    hub.state.put_file(REPO, profile_filename(fp), save_profile(profile, tmp_path / "p.safetensors").read_bytes())
    first = resolve_profile(fp, hub_repo=REPO, hub_endpoint=hub.endpoint, hub_cache_dir=dirs["hf"])
    assert first.source == "hub"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.state.repos.clear()  # the Hub has nothing now; the cached copy must serve
    again = resolve_profile(fp, hub_repo=REPO, hub_endpoint=hub.endpoint, hub_cache_dir=dirs["hf"])
    assert again.source == "hub" and same(again.profile, profile) and again.warnings == []
    # With an interval, the -n<N> name is missing from the Hub cache; the general one still serves.
    with pytest.warns(UserWarning, match="chosen for interval"):
        specific = resolve_profile(fp, hub_repo=REPO, hub_endpoint=hub.endpoint, hub_cache_dir=dirs["hf"],
                                   interval=6)
    assert specific.source == "hub" and same(specific.profile, profile)


def test_unreachable_hub_warns_once_and_moves_on(dirs, fp, online):
    probe = Probe(random_profile(fp))
    with pytest.warns(UserWarning, match="unreachable"):
        found = resolve_profile(fp, hub_repo=REPO, hub_endpoint=closed_port_endpoint(), hub_cache_dir=dirs["hf"],
                                probe=probe, interval=6)
    assert found.source == "probe" and len(found.warnings) == 1


def test_hub_without_the_file_and_with_a_bad_file(dirs, fp, hub):
    hub.state.put_file(REPO, "README.md", b"profiles")
    probe = Probe(random_profile(fp))
    with pytest.warns(UserWarning, match="has no profile for FluxTransformer2DModel.*-n6.safetensors"):
        found = resolve_profile(fp, hub_repo=REPO, hub_endpoint=hub.endpoint, hub_cache_dir=dirs["hf"],
                                probe=probe, interval=6)
    assert found.source == "probe" and len(found.warnings) == 1
    (dirs["cache"] / profile_filename(fp)).unlink()  # the first probe's result, saved to the cache
    hub.state.put_file(REPO, profile_filename(fp), b"garbage garbage garbage")
    with pytest.warns(UserWarning, match="skipping hub profile.*not a profile file"):
        found = resolve_profile(fp, hub_repo=REPO, hub_endpoint=hub.endpoint, hub_cache_dir=dirs["hf"],
                                probe=probe)
    assert found.source == "probe" and probe.calls == 2


def test_explicit_path_errors_are_raised(dirs, fp, tmp_path):
    bad = tmp_path / "mine.safetensors"
    bad.write_bytes(b"nonsense")
    save_profile(random_profile(fp), dirs["cache"] / profile_filename(fp))
    with pytest.raises(ProfileError, match="not a profile file"):
        resolve_profile(fp, path=bad)
    with pytest.raises(ProfileError, match="no such profile file"):
        resolve_profile(fp, path=tmp_path / "missing.safetensors")


def test_nothing_found_without_a_probe_says_where_it_looked(dirs, fp):
    with pytest.raises(ProfileError, match=r"no profile for FluxTransformer2DModel.*cache.*python -m hyca probe"):
        resolve_profile(fp)


def test_unwritable_cache_still_returns_the_probed_profile(dirs, fp, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    probe = Probe(random_profile(fp))
    with pytest.warns(UserWarning, match="could not save it to the cache"):
        found = resolve_profile(fp, probe=probe, cache_dir=blocker / "cache")
    assert found.source == "probe" and found.path is None and same(found.profile, probe.profile)


def test_a_transformers_fingerprint_finds_its_profile(dirs, fp):
    from tiny import tiny_flux

    path = save_profile(random_profile(fp), dirs["cache"] / profile_filename(fp))
    assert resolve_profile(fingerprint(tiny_flux())).path == path


def test_default_locations(monkeypatch, tmp_path):
    assert sources.shipped_dir() == Path(__file__).resolve().parents[1] / "profiles"
    monkeypatch.setenv("HYCA_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("HYCA_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "hyca" / "profiles"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "hyca" / "profiles"


def test_first_use_probe_end_to_end(dirs, fp):
    """The real probe as the fallback: its profile is cached, found again, and runs in hyca.enable."""
    import hyca
    from hyca import probe

    from tiny import tiny_flux, tiny_pipeline

    pipe = tiny_pipeline(tiny_flux())
    g = torch.Generator().manual_seed(0)
    embeds = dict(prompt_embeds=torch.randn(1, 5, 32, generator=g),
                  pooled_prompt_embeds=torch.randn(1, 24, generator=g))
    calls = []

    def first_use():
        calls.append(1)
        return probe(pipe, prompt=None, height=64, width=64, steps=10, interval=3, warmup=2, clusters=2,
                     progress=False, **embeds)

    with pytest.warns(UserWarning, match="offline mode"):  # the suite is offline: the Hub is skipped
        found = resolve_profile(fingerprint(pipe.transformer), interval=3, probe=first_use, hub_repo=REPO,
                                hub_cache_dir=dirs["hf"])
    assert found.source == "probe" and found.path == dirs["cache"] / profile_filename(fp)
    assert found.profile.metadata["interval"] == 3 and found.profile.metadata["positions"] == "step"
    again = resolve_profile(fingerprint(pipe.transformer), interval=3, probe=first_use, hub_repo=None)
    assert again.source == "cache" and len(calls) == 1 and same(again.profile, found.profile)
    hyca.enable(pipe, again.profile, interval=3, warmup=2)
    try:
        pipe(num_inference_steps=10, height=64, width=64, output_type="latent",
             generator=torch.Generator().manual_seed(1), **embeds)
        assert hyca.stats(pipe)[0].forecast > 0
    finally:
        hyca.disable(pipe)


def test_a_hyca_profiles_entry_that_is_no_folder_is_said_once(tmp_path, monkeypatch, caplog):
    """A typo in ``$HYCA_PROFILES`` is said once (it would otherwise be skipped without a
    word); an existing folder is not mentioned."""
    from hyca.profiles import sources

    missing = tmp_path / "no-such-folder"
    monkeypatch.setenv("HYCA_PROFILES", os.pathsep.join([str(tmp_path), str(missing)]))
    monkeypatch.setattr(sources, "_SAID_MISSING", set())
    with caplog.at_level(logging.WARNING, logger="hyca"):
        assert sources.extra_dirs() == [tmp_path, missing]
        sources.extra_dirs()
    said = [r.message for r in caplog.records if "HYCA_PROFILES" in r.message]
    assert len(said) == 1 and str(missing) in said[0] and str(tmp_path) + " " not in said[0]


def test_a_warning_during_a_pipeline_call_points_at_the_callers_line(tmp_path, monkeypatch):
    """A profile lookup warned about inside ``pipe(...)`` (HyCa's request handling runs in
    context managers) is attributed to the line that called the pipeline, not to
    ``contextlib.py``."""
    import warnings

    import hyca
    from hyca.adapters.diffusers.fingerprint import fingerprint
    from hyca.profiles.names import model_prefix
    from hyca.reference import load_pipeline

    (tmp_path / "cache").mkdir(), (tmp_path / "extra").mkdir()
    monkeypatch.setenv("HYCA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HYCA_PROFILES", str(tmp_path / "extra"))
    pipe = load_pipeline()
    (tmp_path / "extra" / f"{model_prefix(fingerprint(pipe.transformer))}-n4-bad.safetensors").write_bytes(b"junk")
    with pytest.warns(UserWarning):
        hyca.enable(pipe, interval=4, warmup=3)
    monkeypatch.setattr(sources, "_TOLD", set())  # the bad file is told again at the call's own lookup
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe("a large red circle at the center on a white background", num_inference_steps=6,
             generator=torch.Generator().manual_seed(0))
    hyca.disable(pipe)
    said = [w for w in caught if "skipping $HYCA_PROFILES profile" in str(w.message)]
    assert said and all(w.filename == __file__ for w in said), [(w.filename, w.lineno) for w in said]
