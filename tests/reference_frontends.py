"""The shipped reference model inside the WebUI frontends' own FLUX class, driven the way a
WebUI generation runs (tests/webui_harness.py ``generate``: the extension script's hooks,
Forge / Neo sampling function, k-diffusion Euler over flow sigmas, CFG by cond / uncond).

A helper of the tests and of ``python -m hyca.bench.webui_path`` (which puts ``tests/`` on
``sys.path``), not a test module. The frontend classes are the weight-carrying stand-ins
``tests/standins/bfl_flux_forge.py`` / ``bfl_flux_neo.py``; the weights come from
:func:`hyca.reference.webui.to_bfl_state_dict`.

Kinds registered here (``webui_harness.OVERRIDES``): ``forge_flux_reference`` and
``neo_flux_reference``: latent ``(12, 16, 16)`` per 32 x 32 image (the model's 8 x 8 tokens of
48 channels, laid out by :func:`hyca.reference.webui.tokens_to_latent`), conditioning the
caption encoder's ``c_crossattn`` (16 x 64) and ``y`` (64).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

import torch

import webui_harness as H
from hyca.reference import data
from hyca.reference.model import patch_of, unpack
from hyca.reference.webui import bfl_config, latent_to_tokens, to_bfl_state_dict

KINDS = {"forge": "forge_flux_reference", "neo": "neo_flux_reference"}
#: Neo's FLUX ``forward`` divides the timestep by 1000 (its KModel hands sigma x 1000); Forge's takes sigma.
TIMESTEP_MULTIPLIER = {"forge": 1.0, "neo": 1000.0}


def frontend_model(transformer: Any, flavour: str) -> torch.nn.Module:
    """``IntegratedFluxTransformer2DModel`` of ``flavour`` ("forge" / "neo") with the diffusers
    ``transformer``'s weights converted; every parameter loaded (strict)."""
    cls = importlib.import_module(f"bfl_flux_{flavour}").IntegratedFluxTransformer2DModel
    model = cls(**bfl_config(transformer))
    model.load_state_dict(to_bfl_state_dict(transformer), strict=True)
    return model.to(transformer.dtype).eval()


def register(transformer: Any) -> None:
    """Add the reference kinds to the harness (their factory converts ``transformer``)."""
    tokens = (data.SIZE // patch_of(transformer)) ** 2
    side = 2 * int(round(tokens ** 0.5))
    channels = transformer.config.in_channels // 4
    conds = {"c_crossattn": (16, transformer.config.joint_attention_dim), "y": (transformer.config.pooled_projection_dim,)}
    for flavour, kind in KINDS.items():
        H.OVERRIDES[kind] = H.ModelKind(flavour, lambda f=flavour: frontend_model(transformer, f),
                                        (channels, side, side), conds, TIMESTEP_MULTIPLIER[flavour])


@dataclass
class CaptionProcessing(H.Processing):
    """``Processing`` whose conditioning is the caption encoder's, one (cond, uncond) pair per
    iteration (``p.iteration``, set before the conditioning is drawn), uncond the empty caption."""

    captions: list = field(default_factory=list)

    def conditioning(self, seed: int) -> tuple[dict, dict]:
        return self.captions[self.iteration]


def encode(pipe: Any, prompts: list[str]) -> tuple[dict, dict]:
    """(cond, uncond) dicts for one batch of ``prompts``, as the frontend's text encoder would."""
    hidden, pooled = pipe.encode_prompt(prompts)
    empty_hidden, empty_pooled = pipe.encode_prompt([""] * len(prompts))
    return {"c_crossattn": hidden, "y": pooled}, {"c_crossattn": empty_hidden, "y": empty_pooled}


def harness_noise(batches: int, batch_size: int, latent: tuple[int, ...]) -> list[torch.Tensor]:
    """The noise ``webui_harness.generate`` draws for iteration n (generator seeded 100 + n)."""
    return [torch.randn(batch_size, *latent, generator=torch.Generator().manual_seed(100 + n)) for n in range(batches)]


def webui_images(pipe: Any, frontend: Any, batches: list[list[str]], steps: int, cfg_scale: float,
                 script_args: list, script: Any = None, shift: float = 3.0) -> tuple[torch.Tensor, list[str]]:
    """One WebUI generation (``n_iter = len(batches)``, batch size ``len(batches[0])``) through
    ``frontend`` (a ``webui_harness.Frontend`` of a reference kind) on the flow sigmas of
    ``shift``: images ``(n, 3, H, W)`` in [0, 1] as the diffusers pipeline returns them, and the
    infotext of each batch."""
    p = CaptionProcessing(frontend.kind, frontend.model, steps=steps, cfg_scale=cfg_scale, batch_size=len(batches[0]),
                          n_iter=len(batches), captions=[encode(pipe, b) for b in batches], shift=shift)
    with torch.no_grad():
        out = H.generate(p, script or frontend.script, script_args)
    return to_images(pipe, torch.cat(out.images)), out.infotexts


def to_images(pipe: Any, latent: torch.Tensor) -> torch.Tensor:
    patch = patch_of(pipe.transformer)
    return (unpack(latent_to_tokens(latent).float(), patch, data.SIZE, data.SIZE).clamp(-1, 1) + 1) / 2
