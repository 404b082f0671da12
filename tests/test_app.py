"""The Gradio app: metrics, the cluster picture, model checks, and the running app driven
through ``gradio_client`` (generation, probe, concurrency, errors), checked against the
pipeline run directly, outside the app."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import hyca
from hyca.app import metrics, profile_view
from hyca.app.compare import upscale
from hyca.app.models import GB, Facts, choice, choices, decide, gather_facts
from hyca.adapters.diffusers.families import FAMILIES
from hyca.adapters.diffusers.fingerprint import fingerprint
from hyca.engine.schedule import Schedule
from hyca.math.solvers import pool_names
from hyca.profiles import Profile, load_profile

from app_server import running_app
from hub_standin import hub, online  # noqa: F401  (fixtures: a local stand-in for the Hub)

# --- metrics ------------------------------------------------------------------------------


def test_psnr_of_a_uniform_offset_is_its_closed_form():
    a = np.random.default_rng(0).uniform(0.2, 0.8, (16, 16, 3))
    # mse = 0.1^2 -> PSNR = 10 log10(1 / 0.01) = 20 dB
    assert metrics.psnr(a, a + 0.1) == pytest.approx(20.0, abs=1e-9)
    assert math.isinf(metrics.psnr(a, a))


def test_ssim_of_two_flat_images_is_the_luminance_term():
    # Flat images: both variances and the covariance are 0, so SSIM = (2 mu_a mu_b + C1) / (mu_a^2 + mu_b^2 + C1).
    a, b = np.full((32, 32, 3), 0.2), np.full((32, 32, 3), 0.6)
    expected = (2 * 0.2 * 0.6 + 0.01 ** 2) / (0.2 ** 2 + 0.6 ** 2 + 0.01 ** 2)
    assert metrics.ssim(a, b) == pytest.approx(expected, abs=1e-12)
    assert metrics.ssim(a, a) == pytest.approx(1.0, abs=1e-12)


def _ssim_one_window_by_hand(x: np.ndarray, y: np.ndarray) -> float:
    """SSIM of two 11x11 grey images (exactly one window position), written out with loops."""
    weights = np.zeros((11, 11))
    for i in range(11):
        for j in range(11):
            weights[i, j] = math.exp(-((i - 5) ** 2 + (j - 5) ** 2) / (2 * 1.5 ** 2))
    weights /= weights.sum()
    mx = sum(weights[i, j] * x[i, j] for i in range(11) for j in range(11))
    my = sum(weights[i, j] * y[i, j] for i in range(11) for j in range(11))
    vx = sum(weights[i, j] * (x[i, j] - mx) ** 2 for i in range(11) for j in range(11))
    vy = sum(weights[i, j] * (y[i, j] - my) ** 2 for i in range(11) for j in range(11))
    cxy = sum(weights[i, j] * (x[i, j] - mx) * (y[i, j] - my) for i in range(11) for j in range(11))
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    return ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))


def test_ssim_matches_the_gaussian_window_formula_written_out():
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 1, (11, 11))
    y = np.clip(x + rng.normal(0, 0.1, (11, 11)), 0, 1)
    assert metrics.ssim(x, y) == pytest.approx(_ssim_one_window_by_hand(x, y), rel=1e-10)
    assert metrics.ssim(x, y) == pytest.approx(metrics.ssim(y, x), rel=1e-12)
    # a larger image is the mean over every window position
    big_x, big_y = rng.uniform(0, 1, (13, 12)), rng.uniform(0, 1, (13, 12))
    by_hand = np.mean([_ssim_one_window_by_hand(big_x[i:i + 11, j:j + 11], big_y[i:i + 11, j:j + 11])
                       for i in range(3) for j in range(2)])
    assert metrics.ssim(big_x, big_y) == pytest.approx(by_hand, rel=1e-10)


def test_metrics_refuse_images_of_different_shapes():
    with pytest.raises(ValueError, match="same shape"):
        metrics.ssim(np.zeros((8, 8, 3)), np.zeros((8, 9, 3)))


def test_upscale_repeats_whole_pixels():
    image = np.random.default_rng(2).uniform(0, 1, (32, 32, 3)).astype(np.float32)
    big = upscale(image, 256)
    assert big.shape == (256, 256, 3) and big.dtype == np.uint8
    assert np.array_equal(big[::8, ::8], np.round(image * 255).astype(np.uint8))
    assert np.array_equal(big[7::8, 7::8], big[::8, ::8])


# --- the cluster picture ------------------------------------------------------------------------


def _error(b: int, c: int, s: int) -> float:
    """The replay error the stand-in report gives solver ``s`` on block ``b``, cluster ``c``."""
    return round(0.1 * b + 0.01 * c + 0.001 * s, 4)


def _profile(blocks: int = 3, dim: int = 10, kept: torch.Tensor | None = None) -> Profile:
    """A probed profile's shape and report: eq. 5 chose ``solvers`` (every candidate's error
    recorded per cluster); ``kept``: what the closed loop kept instead (default: eq. 5's)."""
    rng = np.random.default_rng(3)
    labels = torch.as_tensor(rng.integers(0, 3, (blocks, dim)))
    solvers = torch.as_tensor(rng.integers(0, len(pool_names()), (blocks, 3)))
    names = pool_names()
    selection = {"candidates": list(names),
                 "blocks": [[{"solver": names[int(solvers[b, c])], "error": _error(b, c, int(solvers[b, c])),
                              "errors": [_error(b, c, s) for s in range(len(names))]} for c in range(3)]
                            for b in range(blocks)],
                 "replay_error": {"profile": 0.5, "uniform": {n: 0.6 + 0.01 * i for i, n in enumerate(names)}}}
    return Profile(labels, solvers if kept is None else kept, {"selection": selection})


def test_cluster_picture_colours_every_dimension_by_its_cluster_and_solver():
    p = _profile()
    picture = profile_view.cluster_image(p, "cluster", row_height=4, column_width=2)
    assert picture.shape == (3 * 4, 10 * 2, 3)
    for b in range(3):
        for d in range(10):
            assert tuple(picture[4 * b + 3, 2 * d + 1]) == profile_view.colour(int(p.labels[b, d]))
    by_solver = profile_view.cluster_image(p, "solver", row_height=1, column_width=1)
    for b in range(3):
        for d in range(10):
            assert tuple(by_solver[b, d]) == profile_view.colour(int(p.solvers[b, p.labels[b, d]]))


@pytest.mark.parametrize("kept", ["eq5", "taylor-2"])
def test_solver_table_lists_each_cluster_with_its_size_solver_and_error(kept):
    """The error shown is that of the solver the profile uses in that cluster: eq. 5's, or,
    when the closed loop kept another assignment (here taylor-2 everywhere), that one's
    from the same report; so is the whole profile's (fresh-eyes finding: the app showed
    eq. 5's errors for a profile that had kept another solver)."""
    index = pool_names().index("taylor-2")
    p = _profile(kept=None if kept == "eq5" else torch.full((3, 3), index))
    rows = profile_view.solver_rows(p)
    assert len(rows) == 3 * 3
    for block, cluster, dims, solver, error in rows:
        assert dims == int((p.labels[block] == cluster).sum())
        assert solver == pool_names()[int(p.solvers[block, cluster])]
        assert float(error) == pytest.approx(_error(block, cluster, int(p.solvers[block, cluster])))
    expected = "0.5" if kept == "eq5" else f"{0.6 + 0.01 * index:.3g}"
    assert f"Relative replay error of the profile: {expected};" in profile_view.summary(p)


def test_the_profile_summary_counts_every_timed_part_of_the_probe():
    """The probe times its recordings, analysis and closed-loop runs apart (metadata
    ``timing``); the app's "Probe took" is their sum (it showed the first recording and the
    analysis only: 1.4 s for a 23.5 s probe)."""
    p = _profile()
    p.metadata["timing"] = {"record_s": 2.5, "analysis_s": 0.25, "record_output_s": 2.0, "closed_loop_s": 20.0}
    assert "Probe took 24.8 s (closed-loop runs 20.0 s)." in profile_view.summary(p)


# --- model choices ------------------------------------------------------------------------------


def test_every_offered_model_has_a_supported_family():
    keys = [c.key for c in choices()]
    assert keys[0] == "reference" and {"flux-schnell", "flux-dev", "qwen-image"} <= set(keys)
    assert all(c.transformer in FAMILIES for c in choices())


def _facts(**kw) -> Facts:
    base = dict(local_folder=None, on_disk_bytes=None, offline=False, gpu_free_bytes=80 * GB,
                ram_available_bytes=64 * GB)
    return Facts(**{**base, **kw})


def test_model_verdicts_explain_why_a_model_cannot_run():
    dev = choice("flux-dev")
    offline = decide(dev, _facts(offline=True))
    assert not offline.ok and "offline" in offline.message and "hf download black-forest-labs/FLUX.1-dev" in offline.message
    no_gpu = decide(dev, _facts(gpu_free_bytes=None))
    assert not no_gpu.ok and "needs a GPU" in no_gpu.message
    small_gpu = decide(dev, _facts(gpu_free_bytes=24 * GB))
    assert small_gpu.ok and small_gpu.offload and "offload" in small_gpu.message
    too_big = decide(choice("qwen-image"), _facts(gpu_free_bytes=24 * GB, ram_available_bytes=32 * GB))
    assert not too_big.ok and "does not fit" in too_big.message and "57.7 GB" in too_big.message
    fits = decide(dev, _facts(gpu_free_bytes=80 * GB, local_folder="/models/flux", on_disk_bytes=30 * GB))
    assert fits.ok and fits.device == "cuda" and not fits.offload and "30.0 GB" in fits.message


def test_a_custom_path_that_does_not_exist_is_named_as_a_missing_folder():
    from hyca.app.models import custom_choice

    verdict = decide(custom_choice("/nope"), _facts(offline=True))
    assert not verdict.ok and verdict.message.startswith("/nope: no such folder")
    assert "hf download" not in verdict.message


def test_text_that_is_no_repo_id_is_named_so_not_sent_to_hf_download():
    """A helper typed ``not a repo id!!`` and was told to run ``hf download not a repo id!!``."""
    from hyca.app.models import custom_choice

    verdict = decide(custom_choice("not a repo id!!"), _facts(offline=True))
    assert not verdict.ok and "neither a folder nor a Hugging Face repo id" in verdict.message
    assert "hf download" not in verdict.message
    assert "hf download owner/model" in decide(custom_choice("owner/model"), _facts(offline=True)).message


def test_a_folder_that_is_not_a_pipeline_is_named_so_before_loading(tmp_path):
    """A custom folder without model_index.json (found by a README-only helper: it read
    "Ready: about 0.0 GB", then loading failed with a bare FileNotFoundError)."""
    from hyca.app import handlers as h
    from hyca.app.models import ModelError, STORE, check, custom_choice

    (tmp_path / "notes.txt").write_text("not a model")
    verdict = check(custom_choice(str(tmp_path)))
    assert not verdict.ok and verdict.message.startswith(f"{tmp_path}: not a saved diffusers pipeline")
    assert h.model_status("", str(tmp_path)).startswith("**Not available:** ")
    with pytest.raises(ModelError, match="not a saved diffusers pipeline"):
        STORE.get(custom_choice(str(tmp_path)))


def test_an_unknown_menu_entry_reads_without_quotes():
    from hyca.app import handlers as h

    status = h.model_status("bogus", None)
    assert status.startswith("**Not available:** ") and not status.startswith("**Not available:** '")


def test_uncached_model_is_reported_offline_on_this_machine(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty Hub cache
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path))
    facts = gather_facts(choice("flux-schnell"))
    assert facts.local_folder is None and facts.offline
    assert not decide(choice("flux-schnell"), facts).ok


# --- the running app, through gradio_client ---------------------------------------------------

PROMPT = "a small blue square at the top left on a gray background"
STEPS = 12


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    with running_app(tmp_path_factory.mktemp("app")) as (url, folder):
        yield url, folder


@pytest.fixture(scope="module")
def solo_pipe(served):
    from hyca.reference import load_pipeline

    return load_pipeline(served[1])


def _client(url: str):
    from gradio_client import Client

    return Client(url, verbose=False)


def _generate(client, method="HyCa", seed=0, interval=4, warmup=2, lora="none", reuse=True, model="reference",
              custom=""):
    return client.predict(model, custom, PROMPT, seed, STEPS, method, interval, warmup, lora, reuse,
                          api_name="/generate")


def _pixels(path: str) -> np.ndarray:
    """The model's own 32x32 pixels back from the nearest-neighbour enlargement shown."""
    big = np.asarray(Image.open(path).convert("RGB"))
    factor = big.shape[0] // 32
    return big[::factor, ::factor]


def _solo(pipe, seed: int, profile=None, interval=4, warmup=2) -> np.ndarray:
    if profile is not None:
        hyca.enable(pipe, profile, interval=interval, warmup=warmup)
    try:
        out = pipe(PROMPT, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(seed),
                   output_type="np").images[0]
    finally:
        hyca.disable(pipe)
    return out


def _as_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.round(image * 255), 0, 255).astype(np.uint8)


def test_generation_returns_both_images_and_the_metrics(served, solo_pipe):
    full, fast, report, numbers = _generate(_client(served[0]), method="FORA", seed=3, interval=4, warmup=2)
    expected_full = _solo(solo_pipe, 3)
    expected_fast = _solo(solo_pipe, 3, "fora", interval=4, warmup=2)
    assert np.array_equal(_pixels(full), _as_uint8(expected_full))
    assert np.array_equal(_pixels(fast), _as_uint8(expected_fast))
    plan = Schedule(interval=4, warmup=2, compute_last=True).plan(STEPS)
    assert numbers["computed_steps"] == sum(plan) and numbers["forecast_steps"] == STEPS - sum(plan)
    assert numbers["full_flops"] > numbers["fast_flops"] > 0 and numbers["flops_ratio"] > 1
    # the report's speed-up is the ratio of its own two wall-clock times, and shows them
    assert numbers["speedup"] == pytest.approx(numbers["full_seconds"] / numbers["fast_seconds"], rel=1e-9)
    assert f"{numbers['full_seconds']:.2f} s | {numbers['fast_seconds']:.2f} s" in report
    assert numbers["psnr"] == pytest.approx(metrics.psnr(expected_fast, expected_full), rel=1e-5)
    assert numbers["ssim"] == pytest.approx(metrics.ssim(expected_fast, expected_full), rel=1e-5)
    assert "PSNR" in report and "SSIM" in report and "FLOPs" in report
    # the guard's switches of that same run, as hyca.stats reports them (FORA has nothing lower to switch to)
    hyca.enable(solo_pipe, "fora", interval=4, warmup=2)
    try:
        solo_pipe(PROMPT, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(3), output_type="np")
        expected_guard = [d.describe() for d in hyca.stats(solo_pipe)[0].switches]
    finally:
        hyca.disable(solo_pipe)
    assert numbers["guard"] == expected_guard == [] and "Guard: no solver group switched" in report


def test_probe_returns_a_profile_that_hyca_uses(served, solo_pipe):
    client = _client(served[0])
    picture, legend, table, summary, file = client.predict(
        "reference", "", PROMPT, STEPS, 4, 2, 3, "none", "cluster", api_name="/probe")
    profile = load_profile(file, fingerprint(solo_pipe.transformer))
    blocks = len(solo_pipe.transformer.transformer_blocks) + len(solo_pipe.transformer.single_transformer_blocks)
    if profile.metadata.get("target") == "output":  # the closed loop chose to forecast the output head's input
        blocks = 1
    dim = solo_pipe.transformer.inner_dim
    if profile.metadata.get("target") == "model_output":  # it chose to forecast the model output: its channels
        blocks, dim = 1, solo_pipe.transformer.proj_out.out_features
    assert (profile.num_blocks, profile.dim, profile.num_clusters) == (blocks, dim, 3)
    assert profile.metadata["interval"] == 4 and profile.metadata["warmup"] == 2
    assert len(table["data"]) == blocks * 3 and Image.open(picture).size[0] % profile.dim == 0
    # HyCa in the same session now uses that profile: its image is the solo run with it.
    full, fast, _, numbers = _generate(client, method="HyCa", seed=5)
    assert numbers["profile"] == f"session profile (probed on the Profile tab with prompt {PROMPT!r})"
    assert np.array_equal(_pixels(fast), _as_uint8(_solo(solo_pipe, 5, profile)))


def test_two_concurrent_generations_each_equal_their_solo_results(served):
    a, b = _client(served[0]), _client(served[0])
    settings_a = dict(method="FORA", seed=1, interval=3, warmup=1)
    settings_b = dict(method="TaylorSeer", seed=2, interval=5, warmup=2)
    solo_a, solo_b = _generate(a, **settings_a), _generate(b, **settings_b)
    job_a = a.submit("reference", "", PROMPT, settings_a["seed"], STEPS, settings_a["method"], 3, 1, "none", True,
                     api_name="/generate")
    job_b = b.submit("reference", "", PROMPT, settings_b["seed"], STEPS, settings_b["method"], 5, 2, "none", True,
                     api_name="/generate")
    together_a, together_b = job_a.result(timeout=300), job_b.result(timeout=300)
    for solo, together in ((solo_a, together_a), (solo_b, together_b)):
        assert np.array_equal(_pixels(solo[0]), _pixels(together[0]))
        assert np.array_equal(_pixels(solo[1]), _pixels(together[1]))
        assert solo[3]["computed_steps"] == together[3]["computed_steps"]
    assert not np.array_equal(_pixels(together_a[1]), _pixels(together_b[1]))


def test_unavailable_model_and_offline_hub_are_explained_not_crashes(served):
    from gradio_client.exceptions import AppError

    client = _client(served[0])
    with pytest.raises(AppError, match="offline|needs a GPU"):
        _generate(client, model="flux-dev")
    with pytest.raises(AppError, match="offline"):
        client.predict("reference", "", "", "", 4, api_name="/pull")
    with pytest.raises(AppError, match="no profile to push|offline"):
        client.predict("reference", "", "someone/profiles", api_name="/push")
    status = client.predict("flux-dev", "", api_name="/check_model")[0]
    assert "FLUX.1-dev" in status and ("offline" in status or "GPU" in status)
    full, fast, _, _ = _generate(client, method="FORA")  # the app still works
    assert Path(full).is_file() and Path(fast).is_file()


def test_a_method_the_app_does_not_offer_is_refused_by_name(served):
    """The UI's radio offers three methods; a direct handler call with another got a bare
    KeyError (a helper's finding)."""
    from hyca.app import handlers as h

    with pytest.raises(h.AppError, match="method must be one of HyCa, FORA, TaylorSeer, got 'Magic'"):
        h.generate(h.new_state(), "reference", "", PROMPT, 0, STEPS, "Magic", 4, 2, "none", True)


def test_a_local_diffusers_folder_loads_as_a_custom_model(served, tmp_path):
    from hyca.reference import tiny_components

    folder = tmp_path / "tiny"
    tiny_components(seed=4).save_pretrained(str(folder))
    full, fast, _, numbers = _generate(_client(served[0]), method="FORA", custom=str(folder))
    assert _pixels(full).shape == (32, 32, 3) and numbers["forecast_steps"] > 0


def test_lora_without_reuse_probes_again_and_reports_the_ari(served):
    """The ARI the app reports is sklearn's adjusted Rand index of the two profiles'
    cluster labels, averaged over the blocks (the session's profiles, read back)."""
    from sklearn.metrics import adjusted_rand_score

    from hyca.app import handlers as h
    from hyca.app.models import reference_folder

    if not (reference_folder() / "loras" / "outline.safetensors").is_file():
        pytest.skip("the reference LoRAs (models/reference/loras) are not in this checkout yet")
    state = h.new_state()
    reused = h.generate(state, "reference", "", PROMPT, 0, STEPS, "HyCa", 4, 2, "outline", True).numbers
    assert "reused for LoRA 'outline'" in reused["profile"] and "ari_vs_base" not in reused
    again = h.generate(state, "reference", "", PROMPT, 0, STEPS, "HyCa", 4, 2, "outline", False)
    assert "probed again with LoRA 'outline'" in again.numbers["profile"]
    slot = state["profiles"]["reference"]
    base = slot["base"]
    (lora,) = [profile for (name, _settings), profile in slot["lora"].items() if name == "outline"]
    assert lora is not base and lora.labels.shape == base.labels.shape
    expected = np.mean([adjusted_rand_score(a.numpy(), b.numpy()) for a, b in zip(base.labels, lora.labels)])
    assert again.numbers["ari_vs_base"] == pytest.approx(expected, abs=1e-12)
    assert f"{expected:.3f}" in again.report
    # one solver for every dimension in both: the clusters (and the ARI) change nothing, and it says so
    solvers = {int(i) for p in (base, lora) for i in p.dim_solvers().unique()}
    assert ("their clusters change nothing" in again.numbers["profile"]) == (len(solvers) == 1)


def test_a_profile_tab_lora_probe_is_what_generate_uses_for_that_lora(served, own_cache, monkeypatch):
    """The Profile tab's probe with a LoRA makes that LoRA's profile for these settings: a
    Generate with reuse off uses it (not a second probe) and says where it came from."""
    from hyca.app import handlers as h
    from hyca.app import session_profiles
    from hyca.app.models import reference_folder

    if not (reference_folder() / "loras" / "outline.safetensors").is_file():
        pytest.skip("the reference LoRAs (models/reference/loras) are not in this checkout yet")
    state = h.new_state()
    h.generate(state, "reference", "", PROMPT, 0, STEPS, "HyCa", 4, 2, "none", True)  # the base profile
    h.run_probe(state, "reference", "", PROMPT, STEPS, 4, 2, 3, "outline")
    made = state["profiles"]["reference"]["current"]
    monkeypatch.setattr(session_profiles, "probe_locked", lambda *a, **k: pytest.fail("probed the LoRA again"))
    again = h.generate(state, "reference", "", PROMPT, 0, STEPS, "HyCa", 4, 2, "outline", False)
    assert again.numbers["profile"].startswith(f"the session's profile for LoRA 'outline' ({made.source})")


def test_profile_round_trip_through_a_hub_standin(served, hub, tmp_path):
    """Probe in one session, push, pull in a fresh session: the same profile comes back."""
    from hyca.app import handlers as h

    first, second = h.new_state(), h.new_state()
    h.run_probe(first, "reference", "", PROMPT, STEPS, 4, 2, 3, "none")
    message = h.push(first, "reference", "", "someone/profiles", endpoint=hub.endpoint, token=hub.token)
    name = message.rsplit("/", 1)[1]
    assert message.startswith(f"Pushed to {hub.endpoint}/someone/profiles/") and name.endswith("-n4.safetensors")
    h.pull(second, "reference", "", "someone/profiles", name, 4, endpoint=hub.endpoint, token=hub.token,
           cache_dir=str(tmp_path / "hf"))
    sent, got = first["profiles"]["reference"]["current"], second["profiles"]["reference"]["current"]
    assert torch.equal(sent.labels, got.labels) and torch.equal(sent.solvers, got.solvers)
    assert got.source == f"{name} from the Hub repo someone/profiles"  # what a run's report names
    assert "ARI current vs previous" not in h.view(second, "reference", "").summary
    with pytest.raises(h.AppError, match="no earlier profile"):
        h.ari_vs_previous(second, "reference", "")
    h.run_probe(second, "reference", "", "a large yellow diamond at the center on a black background", STEPS, 4, 2, 3, "none")
    slot = second["profiles"]["reference"]
    targets = {p.metadata.get("target", "residual") for p in (slot["current"], slot["previous"])}
    if len(targets) == 1:  # the probe chose the same kind of profile for both prompts: comparable
        assert "ARI current vs previous profile" in h.ari_vs_previous(second, "reference", "")
    else:  # e.g. a model-output profile for one prompt, an output-head one for the other: said, not a crash
        with pytest.raises(h.AppError, match="cannot be compared"):
            h.ari_vs_previous(second, "reference", "")


def test_generation_and_probe_report_progress_per_transformer_call(served):
    from hyca.app import handlers as h

    reports: list[tuple[float, str]] = []
    state = h.new_state()
    h.run_probe(state, "reference", "", PROMPT, STEPS, 4, 2, 3, "none", progress=lambda f, d: reports.append((f, d)))
    probe_steps = [d for _, d in reports if d.startswith("probe: step")]
    assert probe_steps == [f"probe: step {i}/{STEPS}" for i in range(1, STEPS + 1)]
    reports.clear()
    h.generate(state, "reference", "", PROMPT, 0, STEPS, "HyCa", 4, 2, "none", True,
               progress=lambda f, d: reports.append((f, d)))
    for label in ("full compute", "HyCa"):
        fractions = [f for f, d in reports if d.startswith(f"{label}: step")]
        assert len(fractions) == STEPS and fractions == sorted(fractions) and fractions[-1] == 1.0


def test_the_schedule_follows_the_step_count():
    """Choosing a model (or moving the steps slider) sets N and warm-up to what
    hyca.recommended_settings gives for that step count: 20-30 steps are not run at 50's N."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("hyca_app_main", Path(__file__).resolve().parents[1] / "app.py")
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    status, steps, interval, warmup = app.on_model("reference", "")
    assert steps["value"] == 28
    assert (interval["value"], warmup["value"]) == (4, 3) == tuple(
        hyca.recommended_settings(None, 28)[k] for k in ("interval", "warmup"))
    assert tuple(u["value"] for u in app.schedule_for(50)) == (5, 3)


@pytest.mark.parametrize("seed, expected", [(None, 0), ("", 0), ("7", 7), (7.0, 7)])
def test_seeds_as_the_ui_sends_them(seed, expected):
    from hyca.app import handlers as h

    assert h._seed(seed) == expected


@pytest.mark.parametrize("seed", ["abc", 2 ** 70, -1, 1.5])
def test_a_seed_torch_cannot_take_is_explained(seed):
    from hyca.app import handlers as h

    with pytest.raises(h.AppError, match="seed must be"):
        h._seed(seed)


@pytest.mark.parametrize("box, value, message", [
    ("steps", None, "steps is empty"), ("steps", "x", "steps must be a whole number"),
    ("interval", 2.5, "N must be a whole number"), ("warmup", 0, "warm-up must be at least 1"),
])
def test_a_cleared_or_odd_number_box_is_explained(box, value, message):
    """Gradio sends None for a cleared number box and floats for whole numbers."""
    from hyca.app import handlers as h

    boxes = {**dict(steps=28.0, interval=4, warmup=3), box: value}
    model = type("Loaded", (), {"size": (32, 32), "pipe": None, "choice": type("Choice", (), {"guidance": None})()})()
    with pytest.raises(h.AppError, match=message):
        h._settings(model, "a red circle", 0, boxes["steps"], "HyCa", boxes["interval"], boxes["warmup"], "none")
    settings = h._settings(model, "a red circle", 0, 28.0, "HyCa", 4, 3, "none")
    assert (settings.steps, settings.interval, settings.warmup) == (28, 4, 3)


# --- profiles per settings (issue 21, "The app") -----------------------------------------------

@pytest.fixture()
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HYCA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HYCA_HUB_REPO", "none")
    monkeypatch.delenv("HYCA_PROFILES", raising=False)


def _shown(image: np.ndarray) -> np.ndarray:
    """The model's own 32x32 pixels back from the enlarged image a handler returns."""
    factor = image.shape[0] // 32
    return image[::factor, ::factor]


def test_a_changed_n_gets_a_profile_probed_for_it_and_known_settings_are_not_probed_again(
        served, solo_pipe, own_cache, monkeypatch):
    from hyca.app import handlers as h
    from hyca.app import session_profiles

    probes = []
    real = session_profiles.probe_locked
    monkeypatch.setattr(session_profiles, "probe_locked", lambda model, prompt, steps, interval, warmup, *a, **k:
                        probes.append((steps, interval, warmup)) or real(model, prompt, steps, interval, warmup, *a, **k))
    state = h.new_state()
    at_4 = h.generate(state, "reference", "", PROMPT, 5, STEPS, "HyCa", 4, 2, "none", True)
    at_10 = h.generate(state, "reference", "", PROMPT, 5, STEPS, "HyCa", 10, 2, "none", True)
    profile_10 = state["profiles"]["reference"]["current"]
    back_at_4 = h.generate(state, "reference", "", PROMPT, 5, STEPS, "HyCa", 4, 2, "none", True)
    fresh = h.new_state()  # another session: the profile probed for N=10 comes from the local cache
    other_session = h.generate(fresh, "reference", "", PROMPT, 5, STEPS, "HyCa", 10, 2, "none", True)
    assert probes == [(STEPS, 4, 2), (STEPS, 10, 2)]
    cache = os.environ["HYCA_CACHE"]  # own_cache's: each profile is named by where it was saved or found
    assert at_4.numbers["profile"].startswith(f"profile probed now for these settings, saved to {cache}")
    at_10_file = at_10.numbers["profile"].split("saved to ")[1]
    assert Path(at_10_file).parent == Path(cache) and Path(at_10_file).is_file() and "-n10-" in at_10_file
    assert back_at_4.numbers["profile"] == "session profile (probed on first use, saved to " + \
        at_4.numbers["profile"].split("saved to ")[1] + ")"
    assert other_session.numbers["profile"] == f"profile from {at_10_file} (local cache)"
    chosen_for = profile_10.metadata["chosen_for"]
    assert (chosen_for["interval"], chosen_for["warmup"], chosen_for["steps"]) == (10, 2, STEPS)
    # the N=10 image is the pipeline's own run with that profile, outside the app
    assert np.array_equal(_shown(at_10.fast), _as_uint8(_solo(solo_pipe, 5, profile_10, interval=10, warmup=2)))
    assert np.array_equal(_shown(other_session.fast), _shown(at_10.fast))


def test_a_loaded_profile_for_other_settings_says_what_to_do_in_the_app(served, own_cache, caplog):
    from hyca.app import handlers as h

    maker = h.new_state()
    h.run_probe(maker, "reference", "", PROMPT, STEPS, 4, 2, 3, "none")
    state = h.new_state()
    h.use_file(state, "reference", "", maker["profiles"]["reference"]["file"])
    with caplog.at_level("WARNING", logger="hyca"):
        off = h.generate(state, "reference", "", PROMPT, 0, STEPS, "HyCa", 6, 2, "none", True)
    # said once in the log, as README promises (the FLOPs count's second run said it again: a helper)
    assert sum("chosen for other settings" in r.getMessage() for r in caplog.records) == 1
    said = off.numbers["profile"] + " ".join(off.numbers["notes"]) + off.report
    # the engine's off-settings decision, in the app's words: what differs, the path, what to press
    assert off.numbers["profile"] == f"the profile you loaded ({maker['profiles']['reference']['file']})"
    assert off.numbers["off_settings"] == "robust (reuse start, guard)"  # unguided, even sigmas: reuse
    (note,) = [n for n in off.numbers["notes"] if "chosen for other settings" in n]
    assert "N 4 vs 6" in note and "robust path" in note and note.endswith(h.IN_APP_REMEDY)
    assert "Used away from its settings: robust (reuse start, guard)" in off.report
    assert "Run the probe" in said and "hyca.enable" not in said and "num_inference_steps" not in said
    # pressing it gives the session a profile for N=6, used from then on instead of the file
    h.run_probe(state, "reference", "", PROMPT, STEPS, 6, 2, 3, "none")
    after = h.generate(state, "reference", "", PROMPT, 0, STEPS, "HyCa", 6, 2, "none", True)
    assert after.numbers["profile"] == f"session profile (probed on the Profile tab with prompt {PROMPT!r})"
    assert state["profiles"]["reference"]["current"].metadata["chosen_for"]["interval"] == 6


def test_a_loaded_profile_is_used_even_where_the_session_has_its_own(served, solo_pipe, own_cache):
    """Loading a file after a generation at the same settings: the next generation uses the
    file (the user's choice), not the profile the session found or probed before it."""
    from hyca.app import handlers as h
    from hyca.profiles.io import load_profile

    maker = h.new_state()
    h.run_probe(maker, "reference", "", "a large yellow diamond at the center on a black background", STEPS, 4, 2, 3,
                "none")
    file = maker["profiles"]["reference"]["file"]
    state = h.new_state()
    before = h.generate(state, "reference", "", PROMPT, 0, STEPS, "HyCa", 4, 2, "none", True)
    assert not before.numbers["profile"].startswith("the profile you loaded")
    h.use_file(state, "reference", "", file)
    after = h.generate(state, "reference", "", PROMPT, 0, STEPS, "HyCa", 4, 2, "none", True)
    assert after.numbers["profile"] == f"the profile you loaded ({file})"
    assert np.array_equal(_shown(after.fast), _as_uint8(_solo(solo_pipe, 0, load_profile(file), interval=4, warmup=2)))


def test_a_lora_probe_that_chose_another_target_is_kept_without_an_ari(served, own_cache, monkeypatch):
    """The Profile tab's LoRA probe may choose another forecast target than the probe without
    LoRA (their clusters are of different features): the probe's result stands, the message
    says why there is no ARI, as Generate's does."""
    from hyca.app import handlers as h

    state = h.new_state()
    h.run_probe(state, "reference", "", PROMPT, STEPS, 4, 2, 3, "none")
    base = state["profiles"]["reference"]["base"]
    other = "model_output" if base.metadata.get("target", "residual") != "model_output" else "residual"
    real = h.probe_locked
    monkeypatch.setattr(h, "probe_locked", lambda *a, **k: real(*a, **{**k, "target": other}))
    message = h.run_probe(state, "reference", "", PROMPT, STEPS, 4, 2, 3, "outline")
    assert "no ARI against the profile without LoRA" in message and "ARI vs" not in message
    lora = state["profiles"]["reference"]["current"]
    assert lora.metadata.get("target", "residual") == other and state["profiles"]["reference"]["base"] is base


def test_steps_with_nothing_to_forecast_run_in_full_and_say_so():
    """4 steps at warm-up 3 and N=4 (the steps slider's minimum with the app's defaults):
    every step is computed, so there is nothing to probe; the run is the full run and the
    report says why nothing was cached."""
    from hyca.app import handlers as h

    result = h.generate(h.new_state(), "reference", "", PROMPT, 0, 4, "HyCa", 4, 3, "none", True)
    assert result.numbers["forecast_steps"] == 0
    assert "nothing to forecast" in result.numbers["profile"]
    assert np.array_equal(result.full, result.fast)
    assert "no step forecast: the same transformer FLOPs" in result.report and "fewer transformer" not in result.report


def test_profiles_of_different_targets_are_said_to_be_incomparable():
    """The ARI buttons compare clusterings of one kind of feature; a model-output profile and an
    output-head one cannot be compared, and the app says so instead of failing."""
    from hyca.app import handlers as h
    from hyca.profiles.profile import Profile

    head, output = Profile.uniform("taylor-1", 1, 8), Profile.uniform("reuse", 1, 8)
    head.metadata["target"], output.metadata["target"] = "output", "model_output"
    with pytest.raises(h.AppError, match="cannot be compared: one profile forecasts the output head's input"):
        h.describe_comparison(head, output, "previous profile")
    assert "ARI current vs previous profile" in h.describe_comparison(head, head, "previous profile")


def test_an_ari_of_one_solver_profiles_says_their_clusters_change_nothing():
    """Two profiles that each give every dimension one solver read "ARI 1.000 ... the same
    solver for 0% of dimensions", as if the clusters mattered (a fourth helper); the line now
    says they do not. A profile of several solvers gets no such words."""
    from hyca.app import handlers as h
    from hyca.profiles.profile import Profile

    fora, taylor = Profile.uniform("reuse", 2, 8), Profile.uniform("taylor-1", 2, 8)
    both = h.describe_comparison(fora, taylor, "file")
    assert "ARI current vs file: **1.000**" in both and "The current and the file profiles give every" in both
    mixed = Profile(torch.arange(16).reshape(2, 8) % 2, torch.tensor([[0, 1], [1, 2]]))
    assert "one solver" not in h.describe_comparison(mixed, mixed, "file")


def test_the_timed_order_alternates_between_requests_and_keeps_each_side_its_own(monkeypatch):
    """The run timed second was measured faster even where both do the same work (a
    fresh-eyes finding): requests alternate which side runs first; each side's image and
    time still come from its own run, whatever the order."""
    from hyca.app import compare
    from hyca.app.models import LoadedModel
    from hyca.reference import load_pipeline

    order: list[str] = []
    timed = compare._timed
    monkeypatch.setattr(compare, "_timed", lambda pipe, s, label, progress: order.append(label) or
                        timed(pipe, s, label, progress))
    model = LoadedModel(choice=choice("reference"), pipe=load_pipeline())
    s = compare.Settings(prompt="a large red circle at the center on a white background", seed=0, steps=8,
                         height=32, width=32, method="FORA", interval=3, warmup=2)
    results = [compare.side_by_side(model, s) for _ in range(3)]
    assert order == ["full compute", "FORA", "FORA", "full compute", "full compute", "FORA"]
    plain = compare.generate(model.pipe, s)
    for r in results:
        assert np.array_equal(r.full, plain) and not np.array_equal(r.fast, plain)
        assert np.array_equal(r.fast, results[0].fast)


@pytest.mark.parametrize("full, fast, said", [(2.0, 1.0, "**2.00x** faster"), (1.0, 1.25, "**1.25x** slower")])
def test_the_report_says_slower_when_the_cached_run_was(full, fast, said):
    """A cached run that took longer than full compute (a loaded machine, a tiny model) is
    reported as slower, not as '0.80x faster'."""
    from hyca.app.handlers import report_markdown

    n = dict(method="HyCa", interval=4, warmup=3, full_seconds=full, fast_seconds=fast, full_flops=2e9,
             fast_flops=1e9, computed_steps=10, forecast_steps=18, speedup=full / fast, flops_ratio=2.0, psnr=40.0,
             ssim=0.99, profile="shipped", off_settings=None, notes=[], guard=[])
    text = report_markdown(n)
    assert said in text and ("faster" in text) == (full > fast)
