"""Output-head profiles (``target="output"``) in the WebUI extension, on every frontend
stand-in (tests/standins): the adapters name each model's final linear map; a pass with
such a profile (a file, or the automatic probe's) equals the independent reference
(webui_reference.HeadReference: plain torch hooks on the unpatched model, the head's
input replaced on skipped steps by the hand-written forecast of the recorded ones), and
its blocks run on computed calls only; a model without a head refuses them, said once, the
pass uncached (model-output profiles: tests/test_webui_model_output.py)."""

from __future__ import annotations

import pytest
import torch

from hyca import Profile
from hyca.math.solvers import pool_names
from hyca.profiles.settings import RunSettings

from webui_harness import Frontend, ReferenceScript, args, no_hyca_left
from webui_reference import HeadReference

KINDS = ["forge_flux", "forge_chroma", "forge_mmditx", "neo_flux", "neo_qwen", "neo_wan", "neo_lumina", "a1111_sd3"]
#: The linear map each stand-in applies last, named here from the stand-ins' own modules
#: (the registry's ``head`` must find the same module).
HEADS = {"forge_flux": "final_layer.linear", "forge_chroma": "final_layer.linear",
         "forge_mmditx": "final_layer.linear", "neo_flux": "final_layer.linear", "neo_qwen": "proj_out",
         "neo_wan": "head.head", "neo_lumina": "final_layer.linear", "a1111_sd3": "final_layer.linear"}
STEPS, INTERVAL, WARMUP = 10, 3, 2


@pytest.fixture()
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("HYCA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HYCA_PROFILES", str(tmp_path))
    monkeypatch.setenv("HYCA_HUB_REPO", "none")
    return tmp_path


def output_profile(dim: int, seed: int = 0, target: str = "output") -> Profile:
    """One "block" of ``dim`` channels in four clusters, four different solvers."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor([pool_names().index(n) for n in ("reuse", "taylor-2", "lagrange-3", "am2")])
    profile = Profile(torch.randint(0, 4, (1, dim), generator=g), ids.reshape(1, 4))
    profile.metadata["target"] = target
    return profile


def head_of(model: torch.nn.Module, path: str) -> torch.nn.Module:
    module = model
    for part in path.split("."):
        module = getattr(module, part)
    return module


class BlockCalls:
    """Per model call, whether any module inside a block ran (a skipped block runs none:
    its gate or patch hands its inputs on without calling it)."""

    def __init__(self, model: torch.nn.Module, head: torch.nn.Module):
        from hyca.adapters.webui.registry import recognise

        self.model, self.ran, self.calls = model, False, []
        self.inner = [m for _, _, block in recognise(model).blocks(model) for m in block.modules() if m is not block]

    def __enter__(self):
        def mark(*_):
            self.ran = True

        def begin(*_):
            self.ran = False

        self.handles = [self.model.register_forward_pre_hook(begin),
                        self.model.register_forward_hook(lambda *_: self.calls.append(self.ran))]
        self.handles += [m.register_forward_pre_hook(mark) for m in self.inner]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def reference_run(f: Frontend, profile: Profile, **settings):
    reference = HeadReference(f.model, head_of(f.model, HEADS[f.kind]), profile.dim_solvers(), INTERVAL, WARMUP, 2,
                              f.spec.timestep_multiplier)
    with reference:
        out, _ = f.run([], ReferenceScript(reference), steps=STEPS, **settings)
    return out, reference


@pytest.mark.parametrize("kind", KINDS)
def test_an_output_head_profile_file_forecasts_the_heads_input(kind, isolated):
    from hyca.adapters.webui.fingerprint import fingerprint
    from hyca.adapters.webui.registry import recognise
    from hyca.profiles.io import save_profile

    with Frontend(kind) as f:
        adapter = recognise(f.model)
        assert adapter.head_module(f.model) is head_of(f.model, HEADS[kind])
        fp = fingerprint(f.model, adapter)
        profile = output_profile(fp["hidden_size"])
        save_profile(profile, isolated / "head.safetensors", fp)
        expected, reference = reference_run(f, profile)
        with BlockCalls(f.model, adapter.head_module(f.model)) as blocks:
            cached, p = f.run(args(True, INTERVAL, WARMUP, profile="head.safetensors"), steps=STEPS)
        assert no_hyca_left(f.model)
        plain, _ = f.run(args(False), steps=STEPS)
        unpatched, _ = f.run([], ReferenceScript(reference), steps=STEPS)  # no hooks, no script
    torch.testing.assert_close(cached.images[0], expected.images[0], rtol=1e-4, atol=1e-4)
    assert (cached.images[0] - plain.images[0]).abs().max() > 1e-3
    assert torch.equal(plain.images[0], unpatched.images[0])
    assert p.extra_generation_params["HyCa steps"] == "5 computed, 5 forecast"
    assert blocks.calls == reference.decisions and not all(blocks.calls)


@pytest.mark.parametrize("kind", ["forge_flux", "neo_wan", "a1111_sd3"])
def test_heun_midpoint_calls_forecast_the_head_at_their_fraction(kind, isolated):
    """Second-order samplers call the model between schedule points: a computed step's
    second call records nothing, a forecast step's forecasts at its fractional position."""
    from hyca.adapters.webui.fingerprint import fingerprint
    from hyca.adapters.webui.registry import recognise
    from hyca.profiles.io import save_profile

    with Frontend(kind) as f:
        fp = fingerprint(f.model, recognise(f.model))
        profile = output_profile(fp["hidden_size"], seed=1)
        save_profile(profile, isolated / "head.safetensors", fp)
        expected, _ = reference_run(f, profile, sampler_name="dpm2")
        cached, _ = f.run(args(True, INTERVAL, WARMUP, profile="head.safetensors"), steps=STEPS, sampler_name="dpm2")
    torch.testing.assert_close(cached.images[0], expected.images[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["neo_flux", "forge_mmditx"])
def test_a_probed_output_head_profile_caches_the_pass_that_asked_for_it(kind, isolated, monkeypatch, capsys):
    """The automatic path: the probe's choice (here an output-head profile it returns) is
    saved, read back and accepted; the pass runs cached with it from its first step."""
    from hyca.adapters.webui import probe

    chosen = {}

    def probe_returning_an_output_profile(host, run, schedule, guard, fp, on_progress=None):
        assert host.output_head  # the adapter names a head: the probe is offered its track
        chosen["profile"] = output_profile(host.hidden_size, seed=2)
        chosen["profile"].metadata["chosen_for"] = run.merged(RunSettings(
            interval=schedule.interval, warmup=schedule.warmup, compute_last=schedule.compute_last)).to_json()
        return chosen["profile"]

    monkeypatch.setattr(probe, "run_probe", probe_returning_an_output_profile)
    with Frontend(kind) as f:
        cached, p = f.run(args(True, INTERVAL, WARMUP, profile="automatic"), steps=STEPS)
        expected, _ = reference_run(f, chosen["profile"])
        # a new WebUI session finds the saved output-head profile in the cache and runs it, no probe
        from hyca.adapters.webui.controller import CONTROLLER

        CONTROLLER.book.clear()
        monkeypatch.setattr(probe, "run_probe", lambda *a, **k: pytest.fail("probed again"))
        from_cache, _ = f.run(args(True, INTERVAL, WARMUP, profile="automatic"), steps=STEPS)
    torch.testing.assert_close(cached.images[0], expected.images[0], rtol=1e-4, atol=1e-4)
    assert torch.equal(from_cache.images[0], cached.images[0])
    assert p.extra_generation_params["HyCa steps"] == "5 computed, 5 forecast"
    out = capsys.readouterr().out
    assert "could not" not in out and "profile ready (cache" in out, out


def test_an_output_head_profile_from_the_automatic_path_without_a_head_is_refused_and_said(isolated, monkeypatch,
                                                                                          capsys):
    """A profile the pass cannot run, coming from the probe / cache / Hub at the first model
    call (here the output head's, on a model whose adapter names no head), leaves the pass
    uncached with one console line; the generation goes on."""
    from hyca.adapters.webui import adapter as adapter_module
    from hyca.adapters.webui import probe

    def probe_returning_an_output_profile(host, run, schedule, guard, fp, on_progress=None):
        profile = output_profile(host.hidden_size)
        profile.metadata["chosen_for"] = run.to_json()
        return profile

    monkeypatch.setattr(adapter_module.Adapter, "head_module", lambda self, model: None)
    monkeypatch.setattr(probe, "run_probe", probe_returning_an_output_profile)
    with Frontend("neo_flux") as f:
        refused, p = f.run(args(True, INTERVAL, WARMUP, profile="automatic"), steps=STEPS)
        plain, _ = f.run(args(False), steps=STEPS)
        assert no_hyca_left(f.model)
    assert torch.equal(refused.images[0], plain.images[0]) and "HyCa steps" not in p.extra_generation_params
    lines = [line for line in capsys.readouterr().out.splitlines() if "could not settle a profile" in line]
    assert len(lines) == 1 and "output head" in lines[0], lines


@pytest.mark.parametrize("target,without_head", [("output", True)])
def test_refused_targets_are_said_once_and_the_pass_runs_uncached(target, without_head, isolated, monkeypatch, capsys):
    from hyca.adapters.webui import adapter as adapter_module
    from hyca.adapters.webui.fingerprint import fingerprint
    from hyca.adapters.webui.registry import recognise
    from hyca.profiles.io import save_profile

    if without_head:  # a model whose adapter names no head
        monkeypatch.setattr(adapter_module.Adapter, "head_module", lambda self, model: None)
    with Frontend("forge_flux") as f:
        fp = fingerprint(f.model, recognise(f.model))
        dim = f.model.final_layer.linear.out_features if target == "model_output" else fp["hidden_size"]
        save_profile(output_profile(dim, target=target), isolated / "other.safetensors", fp)
        refused, p = f.run(args(True, INTERVAL, WARMUP, profile="other.safetensors"), steps=STEPS)
        plain, _ = f.run(args(False), steps=STEPS)
        assert no_hyca_left(f.model)
    assert torch.equal(refused.images[0], plain.images[0]) and "HyCa steps" not in p.extra_generation_params
    lines = [line for line in capsys.readouterr().out.splitlines() if "could not start" in line]
    assert len(lines) == 1 and target.replace("_", " ") in lines[0], lines


def test_a_head_that_never_runs_falls_back_to_uncached_and_says_so(isolated, monkeypatch, capsys):
    """A model call that skips the head (another extension replaced it) cannot be recorded:
    the call is re-run uncached and the rest of the pass too, with one console line."""
    from hyca.adapters.webui.fingerprint import fingerprint
    from hyca.adapters.webui.registry import recognise
    from hyca.profiles.io import save_profile

    with Frontend("forge_chroma") as f:
        fp = fingerprint(f.model, recognise(f.model))
        save_profile(output_profile(fp["hidden_size"]), isolated / "head.safetensors", fp)
        layer = f.model.final_layer

        def final_layer_without_its_linear_module(x, mod):  # the same maths, the head module never called
            return torch.nn.functional.linear(layer.mod(x, mod)[0], layer.linear.weight, layer.linear.bias)

        monkeypatch.setattr(layer, "forward", final_layer_without_its_linear_module, raising=False)
        plain, _ = f.run(args(False), steps=STEPS)
        out, p = f.run(args(True, INTERVAL, WARMUP, profile="head.safetensors"), steps=STEPS)
    assert torch.equal(out.images[0], plain.images[0]) and "HyCa steps" not in p.extra_generation_params
    lines = [line for line in capsys.readouterr().out.splitlines() if "the output head did not run" in line]
    assert len(lines) == 1 and "uncached" in lines[0], lines


@pytest.mark.parametrize("call", ["positional", "input", "x", "unknown"])
def test_the_head_gate_replaces_the_input_however_the_head_is_called(call):
    """torch's Linear names its argument ``input``, Forge's ForgeOperations.Linear ``x``;
    a call the gate cannot read runs the head as it is (the pass then fails in end_call)."""
    from types import SimpleNamespace

    from hyca.adapters.webui.kinds import gate_head

    x, forecast = torch.zeros(1, 3, 4), torch.ones(1, 3, 4)
    session = SimpleNamespace(active=object(), head_input=lambda value: forecast if value is x else None)
    seen = []
    gate = gate_head(lambda: session)
    if call == "positional":
        gate(lambda value: seen.append(value), x)
    elif call == "unknown":
        gate(lambda **kw: seen.append(kw["weird"]), weird=x)
    else:
        gate(lambda **kw: seen.append(kw[call]), **{call: x})
    assert seen[0] is (x if call == "unknown" else forecast)


def test_a_lora_probe_of_another_target_than_the_base_is_said_not_compared(isolated, monkeypatch, capsys):
    """LoRA reuse off: the LoRA set's own probe keeps an output-head profile, the base a
    residual one; clusters of different targets are not compared (said), the pass is cached."""
    from hyca.adapters.webui import probe

    real = probe.run_probe
    calls = []

    def base_residual_then_lora_output(host, run, schedule, guard, fp, on_progress=None):
        calls.append(run)
        if len(calls) == 1:
            return real(host, run, schedule, guard, fp, on_progress)
        profile = output_profile(host.hidden_size, seed=3)
        profile.metadata["chosen_for"] = run.to_json()
        return profile

    monkeypatch.setattr(probe, "run_probe", base_residual_then_lora_output)
    with Frontend("forge_flux") as f:
        f.run(args(True, INTERVAL, WARMUP, profile="automatic", lora_reuse=False), steps=STEPS)
        lora, p = f.run(args(True, INTERVAL, WARMUP, profile="automatic", lora_reuse=False), steps=STEPS,
                        lora_hash="abc123")
    out = capsys.readouterr().out
    assert len(calls) == 2 and p.extra_generation_params["HyCa steps"] == "5 computed, 5 forecast"
    assert ("it forecasts the output head's input, the base profile the blocks' residuals: their clusters are not "
            "compared") in out, out
    assert "HyCa LoRA ARI" not in p.extra_generation_params
