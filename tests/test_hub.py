"""Hub transfers through the real huggingface_hub client, against the local Hub stand-in
(tests/hub_standin.py) or an endpoint where nothing listens; no internet."""

from __future__ import annotations

import pytest
import torch

from hyca.profiles.hub import HubError, download_file, hub_repo_id, pull_profile, push_profile
from hyca.profiles.io import ProfileError, load_profile, save_profile
from hyca.profiles.names import profile_filename

from hub_standin import closed_port_endpoint, hub, online  # noqa: F401  (fixtures)
from profile_helpers import random_profile, tiny_fingerprint

REPO = "someone/hyca-profiles"


@pytest.fixture()
def fp():
    return tiny_fingerprint()


def test_push_then_pull_round_trip(hub, fp, tmp_path):
    profile = random_profile(fp, interval=5, warmup=3)
    url = push_profile(profile, REPO, token=hub.token, endpoint=hub.endpoint)
    name = profile_filename(fp)
    assert url == f"{hub.endpoint}/{REPO}/blob/main/{name}"
    # The client went through the Hub's create / preupload / commit protocol.
    assert [m for m, _ in hub.state.requests] == ["POST"] * 3
    assert [p for _, p in hub.state.requests] == [
        "/api/repos/create", f"/api/models/{REPO}/preupload/main", f"/api/models/{REPO}/commit/main"]
    assert name in hub.state.repos[REPO].files

    out = pull_profile(REPO, name, output_dir=tmp_path / "out", cache_dir=tmp_path / "hf", endpoint=hub.endpoint,
                       model=fp)
    assert out == tmp_path / "out" / name
    pulled = load_profile(out, fp)
    assert torch.equal(pulled.labels, profile.labels) and torch.equal(pulled.solvers, profile.solvers)
    assert (pulled.metadata["interval"], pulled.metadata["warmup"]) == (5, 3)


def test_push_a_file_keeps_its_interval_name_and_repo_reuse(hub, fp, tmp_path):
    path = save_profile(random_profile(fp), tmp_path / profile_filename(fp, 6))
    push_profile(path, REPO, token=hub.token, endpoint=hub.endpoint)
    push_profile(path, REPO, token=hub.token, endpoint=hub.endpoint, path_in_repo="custom.safetensors")
    assert set(hub.state.repos[REPO].files) == {path.name, "custom.safetensors"}
    assert hub.state.repos[REPO].files[path.name] == path.read_bytes()


def test_private_repo_needs_a_token_to_pull(hub, fp, tmp_path):
    push_profile(random_profile(fp), REPO, token=hub.token, private=True, endpoint=hub.endpoint)
    assert hub.state.repos[REPO].private
    name = profile_filename(fp)
    with pytest.raises(HubError, match="not found, or it is private") as err:
        pull_profile(REPO, name, cache_dir=tmp_path / "hf", endpoint=hub.endpoint, token=False)
    assert err.value.kind == "no-repo"
    assert pull_profile(REPO, name, cache_dir=tmp_path / "hf", endpoint=hub.endpoint, token=hub.token).is_file()


def test_push_checks_the_file_and_the_token_before_any_request(hub, fp, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a profile at all")
    with pytest.raises(ProfileError, match="not a profile file"):
        push_profile(bad, REPO, token=hub.token, endpoint=hub.endpoint)
    with pytest.raises(ProfileError, match="not a profile file"):  # the file's fault is said first, token or not
        push_profile(bad, REPO, token=False, endpoint=hub.endpoint)
    with pytest.raises(HubError, match="needs a Hugging Face token"):
        push_profile(random_profile(fp), REPO, token=False, endpoint=hub.endpoint)
    assert hub.state.requests == []


def test_push_offline_says_the_upload_needs_the_network(fp, tmp_path):
    """The suite runs with HF_HUB_OFFLINE=1: an upload is refused before any request, in
    words about uploading (not the download's "no copy in the Hub cache")."""
    with pytest.raises(HubError, match=r"needs the network, and offline mode is on") as err:
        push_profile(random_profile(fp), REPO, token="hf_unused", endpoint=closed_port_endpoint())
    assert err.value.kind == "offline" and "Hub cache" not in str(err.value)


def test_bad_token_is_refused(hub, fp):
    with pytest.raises(HubError, match=r"refused access .*HTTP 401") as err:
        push_profile(random_profile(fp), REPO, token="hf_wrong", endpoint=hub.endpoint)
    assert err.value.kind == "denied"


def test_missing_repo_and_missing_file(hub, fp, tmp_path):
    with pytest.raises(HubError, match="not found") as err:
        pull_profile("nobody/nothing", "x.safetensors", cache_dir=tmp_path, endpoint=hub.endpoint)
    assert err.value.kind == "no-repo"
    push_profile(random_profile(fp), REPO, token=hub.token, endpoint=hub.endpoint)
    with pytest.raises(HubError, match="has no file other.safetensors") as err:
        pull_profile(REPO, "other.safetensors", cache_dir=tmp_path, endpoint=hub.endpoint)
    assert err.value.kind == "no-file"


def test_corrupt_download_is_rejected(hub, fp, tmp_path):
    path = save_profile(random_profile(fp), tmp_path / "good.safetensors")
    hub.state.put_file(REPO, "cut.safetensors", path.read_bytes()[:-7])
    with pytest.raises(ProfileError, match="truncated"):
        pull_profile(REPO, "cut.safetensors", output_dir=tmp_path / "out", cache_dir=tmp_path / "hf",
                     endpoint=hub.endpoint)
    assert not (tmp_path / "out").exists()  # nothing is copied out of a bad download


def test_foreign_model_download_is_rejected(hub, fp, tmp_path):
    path = save_profile(random_profile(fp), tmp_path / "p.safetensors")
    hub.state.put_file(REPO, "p.safetensors", path.read_bytes())
    with pytest.raises(ProfileError, match="made for FluxTransformer2DModel, not OtherModel"):
        pull_profile(REPO, "p.safetensors", cache_dir=tmp_path / "hf", endpoint=hub.endpoint,
                     model={**fp, "class": "OtherModel"})


def test_offline_mode_uses_the_hub_cache_only(hub, fp, tmp_path, monkeypatch):
    from huggingface_hub import constants

    push_profile(random_profile(fp), REPO, token=hub.token, endpoint=hub.endpoint)
    name = profile_filename(fp)
    first = download_file(REPO, name, cache_dir=tmp_path / "hf", endpoint=hub.endpoint)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    seen = len(hub.state.requests)
    assert download_file(REPO, name, cache_dir=tmp_path / "hf", endpoint=hub.endpoint) == first
    with pytest.raises(HubError, match=r"offline mode \(HF_HUB_OFFLINE=1\) and no copy") as err:
        download_file(REPO, "other.safetensors", cache_dir=tmp_path / "hf", endpoint=hub.endpoint)
    assert err.value.kind == "offline"
    assert len(hub.state.requests) == seen  # offline: not one request


def test_unreachable_hub_fails_fast_without_retries(online, tmp_path):
    with pytest.raises(HubError, match="unreachable") as err:
        download_file(REPO, "x.safetensors", cache_dir=tmp_path, endpoint=closed_port_endpoint(), retry=False)
    assert err.value.kind == "unreachable"


def test_pull_from_an_unreachable_hub_fails_after_one_request(online, tmp_path, monkeypatch):
    """`python -m hyca pull` against a Hub that refuses connections took ~25 s of
    huggingface_hub's retries (found by a README-only helper); it now asks once, as the
    automatic lookup does, and no download with retries is attempted."""
    import huggingface_hub

    asked = []
    real = huggingface_hub.hf_hub_download
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda *a, **k: asked.append(k["local_files_only"]) or real(*a, **k))
    with pytest.raises(HubError, match="unreachable") as err:
        pull_profile(REPO, "x.safetensors", cache_dir=tmp_path, endpoint=closed_port_endpoint())
    assert err.value.kind == "unreachable" and asked == [True]  # only the Hub cache was read after the one request


def test_invalid_repo_id(online, tmp_path):
    with pytest.raises(HubError, match="invalid Hub repo id"):
        download_file("not a repo", "x.safetensors", cache_dir=tmp_path, endpoint=closed_port_endpoint())


def test_default_repo_from_environment(monkeypatch):
    from hyca.profiles.hub import DEFAULT_HUB_REPO

    monkeypatch.delenv("HYCA_HUB_REPO", raising=False)
    assert hub_repo_id() == DEFAULT_HUB_REPO
    monkeypatch.setenv("HYCA_HUB_REPO", "me/mine")
    assert hub_repo_id() == "me/mine"
    monkeypatch.setenv("HYCA_HUB_REPO", "none")
    assert hub_repo_id() is None
