"""ComfyUI's diffusion-transformer families as rows of data, in the WebUI adapter's
vocabulary (:class:`~hyca.adapters.webui.adapter.BlockList` kinds): the model class
(``ModelPatcher.model.diffusion_model``), its block lists in the order they run, and the
``patches_replace["dit"]`` key each list answers to (``comfy/ldm/<family>/model.py``).

One layout is new to ComfyUI: HunyuanVideo's single blocks run over ``cat(img, txt)``
(image tokens first, ``comfy/ldm/hunyuan_video/model.py``), where FLUX and Chroma run over
``cat(txt, img)``; :func:`patch_concat_head` serves it. HiDream and Lumina2 / Z-Image
call their blocks without a replace hook: they are refused (:data:`REFUSED`), see
docs/comfyui.md.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..webui import kinds
from ..webui.adapter import Adapter, BlockList
from ..webui.kinds import SessionOf

_FLUX_LISTS = (BlockList("double_blocks", "img_txt", "double_block"),
               BlockList("single_blocks", "concat_tail", "single_block"))

#: Most specific first; class names as ComfyUI 0.3.75 and the newest source spell them.
FAMILIES: tuple[Adapter, ...] = (
    Adapter(name="ComfyUI FLUX / Kontext", frontend="comfyui", classes=("Flux",), block_lists=_FLUX_LISTS,
            style="replace"),
    Adapter(name="ComfyUI Chroma", frontend="comfyui", classes=("Chroma", "ChromaRadiance"), block_lists=_FLUX_LISTS,
            style="replace", dim=lambda m: m.params.hidden_size),
    # joint blocks answer to ("double_block", i); the last one is pre_only (its txt is unused after it)
    Adapter(name="ComfyUI SD3 / SD3.5", frontend="comfyui", classes=("OpenAISignatureMMDITWrapper", "MMDiT"),
            block_lists=(BlockList("joint_blocks", "img_txt", "double_block"),), style="replace",
            dim=lambda m: m.x_embedder.proj.out_channels),
    Adapter(name="ComfyUI Qwen-Image / Edit", frontend="comfyui", classes=("QwenImageTransformer2DModel",),
            block_lists=(BlockList("transformer_blocks", "img_txt", "double_block"),), style="replace",
            dim=lambda m: m.inner_dim),
    Adapter(name="ComfyUI Wan 2.1 / 2.2", frontend="comfyui", classes=("WanModel", "CameraWanModel", "VaceWanModel"),
            block_lists=(BlockList("blocks", "img", "double_block"),), style="replace"),
    Adapter(name="ComfyUI HunyuanVideo", frontend="comfyui", classes=("HunyuanVideo",),
            block_lists=(BlockList("double_blocks", "img_txt", "double_block"),
                         BlockList("single_blocks", "concat_head", "single_block")), style="replace"),
)

#: Families ComfyUI runs whose blocks have no replace hook: class name -> why HyCa stays out.
REFUSED: dict[str, str] = {
    "HiDreamImageTransformer2DModel": "HiDream calls its double and single stream blocks directly (no "
                                      "patches_replace['dit'] key) and feeds every single block a fresh slice of "
                                      "the LLaMA layers, so a skipped block list cannot be handed on unchanged",
    "NextDiT": "Lumina2 / Z-Image call their layers directly (no patches_replace['dit'] key); HyCa would have to "
               "wrap the layers' forward, which ComfyUI offers no supported hook for",
}


def patch_concat_head(session_of: SessionOf, index: int, previous: Callable | None) -> Callable[[dict, dict], dict]:
    """``{"img": cat(img, txt), ...} -> {"img"}`` (HunyuanVideo single blocks): only the
    image tokens at the head reach the output, so only their residual is kept. The image
    length is the double blocks' image stream (noted by :func:`kinds.patch_img_txt`)."""

    def head(call) -> int:
        if call.image_tokens is None:
            raise kinds.HyCaFailure(f"block {index} found no image-stream length (no dual-stream block ran first)")
        return call.image_tokens

    def passthrough(args: dict, stream: torch.Tensor | None) -> dict:
        x = args["img"]
        return {"img": x if stream is None else torch.cat((stream, x[:, stream.shape[1]:]), 1)}

    return kinds._patch(session_of, index, previous, lambda a, c: a["img"][:, :head(c)],
                        lambda o, c: o["img"][:, :head(c)], passthrough)


#: Which replace patch serves a block of each kind.
PATCHES = {"img_txt": kinds.patch_img_txt, "concat_tail": kinds.patch_concat_tail, "img": kinds.patch_img,
           "concat_head": patch_concat_head}


def recognise(model: object) -> Adapter | None:
    """The family row serving ``model`` (a ``diffusion_model``), else ``None``."""
    if not isinstance(model, torch.nn.Module):
        return None
    return next((a for a in FAMILIES if a.matches(model)), None)


def supported() -> list[str]:
    return [a.name for a in FAMILIES]
