"""Run as a script: the reference model's converted weights in Forge's *own*
``backend/nn/flux.py`` ``IntegratedFluxTransformer2DModel`` (from a checkout of
lllyasviel/stable-diffusion-webui-forge; nothing of it is in this repository), against the
diffusers transformer on the same inputs. Prints one JSON line. Used by
tests/test_webui_reference_model.py when ``HYCA_FORGE_CHECKOUT`` names a checkout.

``backend.attention`` and ``backend.utils`` import the whole frontend (its memory manager,
gguf); the model file needs two of their names, given here as upstream defines them for
fp32 on the CPU: ``attention_function(q, k, v, heads, skip_reshape=True)`` is PyTorch's
scaled-dot-product attention on ``(B, H, L, D)`` returning ``(B, L, H * D)``
(``attention_pytorch``), ``fp16_fix`` clamps fp16 only, ``tensor2parameter`` wraps a tensor.

    python tests/real_forge_flux.py /path/to/stable-diffusion-webui-forge
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import torch
from torch.nn import functional as F


def load_forge_flux(checkout: str):
    package = types.ModuleType("backend")
    package.__path__ = [f"{checkout}/backend"]
    attention = types.ModuleType("backend.attention")

    def attention_function(q, k, v, heads, skip_reshape=False, **kwargs):
        b, h, length, d = q.shape
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, length, h * d)

    attention.attention_function = attention_function
    utils = types.ModuleType("backend.utils")
    utils.fp16_fix = lambda x: x.clip(-32768.0, 32768.0) if x.dtype == torch.float16 else x
    utils.tensor2parameter = lambda x: x if isinstance(x, torch.nn.Parameter) else torch.nn.Parameter(x, requires_grad=False)
    sys.modules.update({"backend": package, "backend.attention": attention, "backend.utils": utils})
    spec = importlib.util.spec_from_file_location("backend.nn.flux", f"{checkout}/backend/nn/flux.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.IntegratedFluxTransformer2DModel


def main(checkout: str) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from hyca.reference import load_pipeline
    from hyca.reference.model import pack, velocity
    from hyca.reference.webui import bfl_config, latent_to_tokens, to_bfl_state_dict, tokens_to_latent

    pipe = load_pipeline()
    model = load_forge_flux(checkout)(**bfl_config(pipe.transformer))
    model.load_state_dict(to_bfl_state_dict(pipe.transformer), strict=True)
    x = pack(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)), 4)
    sigma = torch.tensor([0.9, 0.3])
    hidden, pooled = pipe.encode_prompt(["a large red circle at the center on a white background",
                                         "a small blue square at the top left on a black and white background"])
    with torch.no_grad():
        expected = velocity(pipe.transformer, x, sigma, hidden, pooled, 32, 32)
        out = latent_to_tokens(model.eval()(tokens_to_latent(x, 8, 8), sigma, context=hidden, y=pooled, guidance=None))
    print(json.dumps({"max_abs_diff": float((out - expected).abs().max()), "scale": float(expected.abs().max())}))


if __name__ == "__main__":
    main(sys.argv[1])
