"""HyCa in every WebUI hook point, driven through the stand-ins (tests/standins): enabled
output equals the independent per-block reference (webui_reference.py) for the same
profile and schedule; disabled output is bit-identical to the unpatched stand-in; and
nothing is left on the model afterwards."""

import pytest
import torch

from hyca import Profile
from webui_harness import Processing, ReferenceScript, flavour_of, generate, load_script, model_kinds, standins
from references import expected_plan
from webui_reference import ReferenceHyCa

KINDS = ["forge_flux", "forge_chroma", "forge_mmditx", "neo_flux", "neo_qwen", "neo_wan", "neo_lumina", "a1111_sd3"]
UNIFORM = "TaylorSeer (taylor-2)"


def args(enabled=True, interval=3, warmup=2, compute_last=True, hires=True, profile=UNIFORM, hub_repo="", lora_reuse=True,
         cache_dtype="model", guard=False, speedup=0.0):
    """Script arguments; the guard is off by default here because the references these
    tests compare with are the paper's engine (the guard has tests of its own)."""
    return [enabled, interval, warmup, compute_last, hires, profile, hub_repo, lora_reuse, cache_dtype, guard, speedup]


class Frontend:
    """The stand-ins of one frontend, imported for one test, removed afterwards."""

    def __init__(self, kind):
        self.kind = kind
        self._context = standins(flavour_of(kind))

    def __enter__(self):
        self._context.__enter__()
        self.script_module = load_script()
        self.script = self.script_module.HyCaScript()
        self.spec = model_kinds()[self.kind]
        self.model = self.spec.factory()
        return self

    def __exit__(self, *exc):
        from hyca.adapters.webui.controller import CONTROLLER

        CONTROLLER.reset()
        self._context.__exit__(*exc)

    def run(self, script_args=None, script=None, **settings):
        p = Processing(self.kind, self.model, **settings)
        with torch.no_grad():
            return generate(p, script or self.script, script_args if script_args is not None else args(False)), p

    def reference(self, dim_solvers, interval, warmup, branches=1, compute_last=True, **settings):
        reference = ReferenceHyCa(self.model, self.kind, dim_solvers, interval, warmup, branches,
                                  self.spec.timestep_multiplier, compute_last)
        with reference:
            out, _ = self.run([], ReferenceScript(reference), **settings)
        return out, reference

    def uniform_solvers(self):
        from hyca.adapters.webui.fingerprint import fingerprint
        from hyca.adapters.webui.registry import recognise

        fp = fingerprint(self.model, recognise(self.model))
        return Profile.uniform("taylor-2", sum(fp["blocks"].values()), fp["hidden_size"]).dim_solvers()


def no_hyca_left(model):
    from hyca.adapters.webui import gates
    from hyca.adapters.webui.controller import CONTROLLER

    return CONTROLLER.session is None and not any(gates.is_gated(m) for m in model.modules())


@pytest.mark.parametrize("kind", KINDS)
def test_enabled_matches_per_block_reference_and_disabled_is_untouched(kind):
    with Frontend(kind) as f:
        plain, _ = f.run(args(False), steps=10)
        reference, ref = f.reference(f.uniform_solvers(), interval=3, warmup=2, steps=10)
        cached, p = f.run(args(True, 3, 2), steps=10)
        assert no_hyca_left(f.model)
        after, _ = f.run(args(False), steps=10)
    torch.testing.assert_close(cached.images[0], reference.images[0], rtol=1e-4, atol=1e-4)
    assert (cached.images[0] - plain.images[0]).abs().max() > 1e-2  # forecasting changed the result
    assert torch.equal(after.images[0], plain.images[0])
    assert ref.computed_steps == [i for i, c in enumerate(expected_plan(10, 3, 2)) if c]
    assert p.extra_generation_params["HyCa steps"] == "5 computed, 5 forecast"
    assert p.extra_generation_params["HyCa saving"] == "50%"


@pytest.mark.parametrize("kind", KINDS)
def test_disabled_is_bit_identical_to_the_unpatched_stand_in(kind):
    with Frontend(kind) as f:
        p = Processing(kind, f.model, steps=6)
        with torch.no_grad():
            unpatched = generate(p, ReferenceScript(_NoReference()), [])
        off, p_off = f.run(args(False), steps=6)
    assert torch.equal(off.images[0], unpatched.images[0])
    assert not any(k.startswith("HyCa") for k in p_off.extra_generation_params)


class _NoReference:
    def start_pass(self, schedule):
        pass
