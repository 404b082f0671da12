"""Every transformer class diffusers ships for the families HyCa lists is either a row of
the family table or refused with a reason; a new class of these families fails here.

The families are named below by class-name prefix, written from diffusers' model
catalogue (not from HyCa's table); the classes are enumerated from the installed
``diffusers.models.transformers`` package.
"""

import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import diffusers
import diffusers.models.transformers as transformers
import pytest
import torch
from diffusers import ModelMixin

import hyca
from hyca.adapters.diffusers.families import FAMILIES, REFUSED

# FLUX (1, Kontext, 2, 3), Qwen-Image (+ edit, 2.1), HunyuanVideo (+ 1.5, FramePack),
# Wan (2.1, 2.2, VACE, Animate) and the Wan-based SkyReels-V2 / ChronoEdit, SD3, Chroma,
# Lumina, Z-Image, CogView, Sana (+ video, world model), HiDream.
FAMILY_PREFIXES = r"^(Flux|QwenImage|HunyuanVideo|Wan|SkyReels|ChronoEdit|SD3|Chroma|Lumina|ZImage|CogView|Sana|HiDream)"


def diffusers_transformer_classes() -> set[str]:
    """Names of the ModelMixin classes defined in diffusers.models.transformers.*."""
    found = set()
    for module_info in pkgutil.iter_modules(transformers.__path__):
        module = importlib.import_module(f"{transformers.__name__}.{module_info.name}")
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, ModelMixin) and obj.__module__ == module.__name__:
                found.add(name)
    return found


def test_every_class_of_the_listed_families_is_supported_or_refused():
    ours = {name for name in diffusers_transformer_classes() if re.match(FAMILY_PREFIXES, name)}
    assert not set(FAMILIES) & set(REFUSED)
    assert ours == set(FAMILIES) | set(REFUSED), (
        f"not in the table nor refused: {sorted(ours - set(FAMILIES) - set(REFUSED))}; "
        f"listed but not in diffusers: {sorted(set(FAMILIES) | set(REFUSED) - ours)}")
    # the ones README promised: VACE, and the Wan-shaped SkyReels-V2
    assert {"WanVACETransformer3DModel", "SkyReelsV2Transformer3DModel"} <= set(FAMILIES)
    assert all(hasattr(diffusers, name) for name in ours)  # top-level exports, as users import them


def test_docs_list_every_supported_and_refused_class():
    text = (Path(__file__).parents[1] / "docs" / "families.md").read_text()
    missing = [name for name in [*FAMILIES, *REFUSED] if f"`{name}`" not in text]
    assert not missing


@pytest.mark.parametrize("make, says", [
    (lambda: diffusers.QwenImage21Transformer2DModel(in_channels=8, out_channels=8, num_layers=1, attention_head_dim=16,
                                                      num_attention_heads=2, context_in_dim=16,
                                                      axes_dims_rope=(4, 6, 6)),
     "key/value cache"),
    (lambda: diffusers.CogView3PlusTransformer2DModel(num_layers=1, attention_head_dim=8, num_attention_heads=2,
                                                      in_channels=4, out_channels=4, text_embed_dim=16,
                                                      time_embed_dim=8, condition_dim=4, pos_embed_max_size=16,
                                                      sample_size=8),
     "generation before CogView4"),
])
def test_enable_refuses_with_the_reason(make, says):
    torch.manual_seed(0)
    transformer = make()
    with pytest.raises(TypeError, match=f"does not support {type(transformer).__name__} yet .*{says}"):
        hyca.enable(transformer, profile="fora")
    assert not hyca.is_enabled(transformer)
