"""ComfyUI's diffusion-transformer families as rows of data, in the layout vocabulary every
host shares (:mod:`hyca.layouts`): the model class (``ModelPatcher.model.diffusion_model``),
its block lists in the order they run, and the ``patches_replace["dit"]`` key each list
answers to (``comfy/ldm/<family>/model.py``). Each layout's replace patch is
:data:`hyca.adapters.webui.kinds.PATCHES` (Forge Neo and ComfyUI share the dict-in,
dict-out patch convention).

One layout only ComfyUI uses: HunyuanVideo's single blocks run over ``cat(img, txt)``
(image tokens first, ``comfy/ldm/hunyuan_video/model.py``, :data:`~hyca.layouts.CONCAT_HEAD`),
where FLUX and Chroma run over ``cat(txt, img)``. HiDream and Lumina2 / Z-Image call their
blocks without a replace hook: they are refused (:data:`REFUSED`), see docs/comfyui.md.
"""

from __future__ import annotations

import torch

from ...layouts import CONCAT_HEAD, CONCAT_TAIL, IMG, IMG_TXT, BlockList
from ..webui.adapter import Adapter

_FLUX_LISTS = (BlockList("double_blocks", IMG_TXT, "double_block"),
               BlockList("single_blocks", CONCAT_TAIL, "single_block"))

#: Most specific first; class names as ComfyUI 0.3.75 and the newest source spell them.
FAMILIES: tuple[Adapter, ...] = (
    Adapter(name="ComfyUI FLUX / Kontext", frontend="comfyui", classes=("Flux",), block_lists=_FLUX_LISTS,
            style="replace"),
    Adapter(name="ComfyUI Chroma", frontend="comfyui", classes=("Chroma", "ChromaRadiance"), block_lists=_FLUX_LISTS,
            style="replace", dim=lambda m: m.params.hidden_size),
    # joint blocks answer to ("double_block", i); the last one is pre_only (its txt is unused after it)
    Adapter(name="ComfyUI SD3 / SD3.5", frontend="comfyui", classes=("OpenAISignatureMMDITWrapper", "MMDiT"),
            block_lists=(BlockList("joint_blocks", IMG_TXT, "double_block"),), style="replace",
            dim=lambda m: m.x_embedder.proj.out_channels),
    Adapter(name="ComfyUI Qwen-Image / Edit", frontend="comfyui", classes=("QwenImageTransformer2DModel",),
            block_lists=(BlockList("transformer_blocks", IMG_TXT, "double_block"),), style="replace",
            dim=lambda m: m.inner_dim),
    Adapter(name="ComfyUI Wan 2.1 / 2.2", frontend="comfyui", classes=("WanModel", "CameraWanModel", "VaceWanModel"),
            block_lists=(BlockList("blocks", IMG, "double_block"),), style="replace"),
    Adapter(name="ComfyUI HunyuanVideo", frontend="comfyui", classes=("HunyuanVideo",),
            block_lists=(BlockList("double_blocks", IMG_TXT, "double_block"),
                         BlockList("single_blocks", CONCAT_HEAD, "single_block")), style="replace"),
)

#: Families ComfyUI runs whose blocks have no replace hook: class name -> why HyCa stays out.
REFUSED: dict[str, str] = {
    "HiDreamImageTransformer2DModel": "HiDream calls its double and single stream blocks directly (no "
                                      "patches_replace['dit'] key) and feeds every single block a fresh slice of "
                                      "the LLaMA layers, so a skipped block list cannot be handed on unchanged",
    "NextDiT": "Lumina2 / Z-Image call their layers directly (no patches_replace['dit'] key); HyCa would have to "
               "wrap the layers' forward, which ComfyUI offers no supported hook for",
}


def recognise(model: object) -> Adapter | None:
    """The family row serving ``model`` (a ``diffusion_model``), else ``None``."""
    if not isinstance(model, torch.nn.Module):
        return None
    return next((a for a in FAMILIES if a.matches(model)), None)


def supported() -> list[str]:
    return [a.name for a in FAMILIES]
