"""Every WebUI hook point HyCa serves, one row each, and which one serves the loaded model
(``None`` leaves the model untouched). A new WebUI model is a row here naming
:mod:`hyca.layouts` layouts; a layout no hook serves yet adds one function to
:mod:`.kinds` (``GATES`` / ``PATCHES``).

Output heads (``head``, :class:`~.adapter.Adapter`): the final linear map of each model, read
in the frontends' sources (Forge main dfdcbab, Forge Neo as vendored in
exo101/sd-webui-forge-neo-v3 5692d2d, A1111 ``modules/models/sd3/mmdit.py``): FLUX and
Chroma ``LastLayer``, SD3 / SD3.5 ``FinalLayer`` and Lumina2 ``FinalLayer`` apply
``self.linear`` to the modulated norm of their input; Qwen-Image runs ``proj_out`` after
``norm_out``; Wan's ``Head`` applies ``self.head`` after its modulated norm. The head named
is that linear map (``final_layer.linear``, ``proj_out``, ``head.head``), whose input is the
tensor diffusers' ``proj_out`` receives."""

from __future__ import annotations

import torch

from ...layouts import CONCAT_TAIL, IMG, IMG_TXT, JOINT, SINGLE, BlockList
from .adapter import Adapter, embedder_width

#: Most specific first: Neo's FLUX (forward_orig) before Forge's (inner_forward).
ADAPTERS: tuple[Adapter, ...] = (
    # Forge Neo FLUX / Flux2: backend/nn/flux.py IntegratedFluxTransformer2DModel with
    # forward_orig and patches_replace["dit"] keys ("double_block", i), ("single_block", i):
    # HyCa is a set of replace patches on the cloned unet.
    Adapter(name="Neo FLUX", frontend="neo", classes=("IntegratedFluxTransformer2DModel",),
            block_lists=(BlockList("double_blocks", IMG_TXT, "double_block"),
                         BlockList("single_blocks", CONCAT_TAIL, "single_block")),
            style="replace", requires=("forward_orig",), head="final_layer.linear"),
    # Forge FLUX: backend/nn/flux.py IntegratedFluxTransformer2DModel, whose inner_forward
    # loops double_blocks then single_blocks over cat(txt, img) and gets no
    # transformer_options: its blocks are gated.
    Adapter(name="Forge FLUX", frontend="forge", classes=("IntegratedFluxTransformer2DModel",),
            block_lists=(BlockList("double_blocks", IMG_TXT), BlockList("single_blocks", CONCAT_TAIL)),
            style="gate", requires=("inner_forward",), refuses=("forward_orig",), head="final_layer.linear"),
    # Forge Chroma: backend/nn/chroma.py IntegratedChromaTransformer2DModel: the FLUX block
    # layout with per-block mod= modulations and no guidance; blocks gated.
    Adapter(name="Forge Chroma", frontend="forge", classes=("IntegratedChromaTransformer2DModel",),
            block_lists=(BlockList("double_blocks", IMG_TXT), BlockList("single_blocks", CONCAT_TAIL)),
            style="gate", requires=("inner_forward",), head="final_layer.linear"),
    # Forge SD3.5: backend/nn/mmditx.py MMDiTX: context, x = block(context, x, c=c_mod) over
    # joint_blocks, the last one pre_only; blocks gated.
    Adapter(name="Forge SD3.5", frontend="forge", classes=("MMDiTX",),
            block_lists=(BlockList("joint_blocks", JOINT),),
            style="gate", requires=("forward_core_with_concat",), dim=embedder_width("x_embedder"),
            head="final_layer.linear"),
    # Forge Neo Qwen-Image: backend/nn/qwen.py QwenImageTransformer2DModel; blocks in
    # transformer_blocks return (txt, img) and honour the dit double_block replace patch.
    Adapter(name="Neo Qwen-Image", frontend="neo", classes=("QwenImageTransformer2DModel",),
            block_lists=(BlockList("transformer_blocks", IMG_TXT, "double_block"),),
            style="replace", head="proj_out"),
    # Forge Neo Wan: backend/nn/wan.py WanModel; x = block(x, e=, freqs=, context=, ...) over
    # blocks, with the dit double_block replace patch.
    Adapter(name="Neo Wan", frontend="neo", classes=("WanModel",),
            block_lists=(BlockList("blocks", IMG, "double_block"),),
            style="replace", requires=("forward_orig",), head="head.head"),
    # Forge Neo Lumina2 / Z-Image: backend/nn/lumina.py NextDiT; x = layer(x, mask, freqs_cis,
    # adaln_input, transformer_options=) over layers with no replace hook: layers gated.
    Adapter(name="Neo Lumina2 / Z-Image", frontend="neo", classes=("NextDiT",),
            block_lists=(BlockList("layers", SINGLE),),
            style="gate", head="final_layer.linear"),
    # A1111 SD3: modules/models/sd3/mmdit.py MMDiT at p.sd_model.model.diffusion_model: no
    # transformer_options and no wrapper slot, so the instance's forward marks each call and
    # its joint_blocks are gated; sigma comes from on_cfg_denoiser. Everything is removed in
    # postprocess.
    Adapter(name="A1111 SD3", frontend="a1111", classes=("MMDiT",),
            block_lists=(BlockList("joint_blocks", JOINT),),
            style="gate", requires=("forward_core_with_concat",), dim=embedder_width("x_embedder"),
            head="final_layer.linear"),
)

#: Class names of quantized variants (Nunchaku SVDQuant) left alone until verified.
UNVERIFIED = ("NunchakuFluxTransformer2dModel", "NunchakuQwenImageTransformer2DModel", "SVDQFluxTransformer2DModel")


def recognise(model: object) -> Adapter | None:
    if not isinstance(model, torch.nn.Module) or type(model).__name__ in UNVERIFIED:
        return None
    return next((a for a in ADAPTERS if a.matches(model)), None)


def supported() -> list[str]:
    return [a.name for a in ADAPTERS]
