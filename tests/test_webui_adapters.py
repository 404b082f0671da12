"""HyCa in every WebUI hook point, driven through the stand-ins (tests/standins): enabled
output equals the independent per-block reference (webui_reference.py) for the same
profile and schedule; disabled output is bit-identical to the unpatched stand-in; and
nothing is left on the model afterwards."""

import pytest
import torch

from references import expected_plan
from webui_harness import Frontend, Processing, ReferenceScript, args, generate, no_hyca_left

KINDS = ["forge_flux", "forge_chroma", "forge_mmditx", "neo_flux", "neo_qwen", "neo_wan", "neo_lumina", "a1111_sd3"]


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
