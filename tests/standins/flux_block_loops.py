"""The block loops of the frontends' FLUX ``forward`` (one copy for the wiring stand-ins in
``forge/`` and ``neo/`` and for the BFL-weight stand-ins ``bfl_flux_forge.py`` /
``bfl_flux_neo.py``, which differ in the blocks' maths, not in the loop):

* :func:`forge_blocks`: lllyasviel/stable-diffusion-webui-forge ``backend/nn/flux.py``
  ``IntegratedFluxTransformer2DModel.inner_forward`` (commit named in ``forge/backend/nn/flux.py``);
* :func:`neo_blocks`: Haoming02/sd-webui-forge-classic (neo) ``backend/nn/flux.py``
  ``forward_orig`` at 06d6af9a9b98436d013b398ab35f0b0bf8a888ce, with its
  ``patches_replace["dit"]`` block replacement.

Each runs the double-stream blocks, joins ``txt`` and ``img``, runs the single-stream
blocks and returns the image tokens, as upstream's lines do before ``final_layer``."""

from __future__ import annotations

import torch


def forge_blocks(model, img, txt, vec, pe):
    for block in model.double_blocks:
        img, txt = block(img=img, txt=txt, vec=vec, pe=pe)
    img = torch.cat((txt, img), 1)
    for block in model.single_blocks:
        img = block(img, vec=vec, pe=pe)
    return img[:, txt.shape[1]:, ...]


def neo_blocks(model, img, txt, vec, pe, attn_mask, transformer_options):
    blocks_replace = transformer_options.get("patches_replace", {}).get("dit", {})
    for i, block in enumerate(model.double_blocks):
        if ("double_block", i) in blocks_replace:
            def block_wrap(args, block=block):
                out = {}
                out["img"], out["txt"] = block(img=args["img"], txt=args["txt"], vec=args["vec"], pe=args["pe"],
                                               attn_mask=args.get("attn_mask"),
                                               transformer_options=args.get("transformer_options"))
                return out

            out = blocks_replace[("double_block", i)](
                {"img": img, "txt": txt, "vec": vec, "pe": pe, "attn_mask": attn_mask,
                 "transformer_options": transformer_options}, {"original_block": block_wrap})
            txt, img = out["txt"], out["img"]
        else:
            img, txt = block(img=img, txt=txt, vec=vec, pe=pe, attn_mask=attn_mask,
                             transformer_options=transformer_options)
    img = torch.cat((txt, img), 1)
    for i, block in enumerate(model.single_blocks):
        if ("single_block", i) in blocks_replace:
            def block_wrap(args, block=block):
                return {"img": block(args["img"], vec=args["vec"], pe=args["pe"], attn_mask=args.get("attn_mask"),
                                     transformer_options=args.get("transformer_options"))}

            out = blocks_replace[("single_block", i)](
                {"img": img, "vec": vec, "pe": pe, "attn_mask": attn_mask,
                 "transformer_options": transformer_options}, {"original_block": block_wrap})
            img = out["img"]
        else:
            img = block(img, vec=vec, pe=pe, attn_mask=attn_mask, transformer_options=transformer_options)
    return img[:, txt.shape[1]:, ...]
