"""Stand-in of Forge Neo's ``backend/nn/flux.py`` ``IntegratedFluxTransformer2DModel`` that
carries real FLUX weights (Haoming02/sd-webui-forge-classic, neo branch, as stored at
06d6af9a9b98436d013b398ab35f0b0bf8a888ce; interface checked in tests/standins/CONFORMANCE.md).
Upstream's module names (BFL state-dict keys) and maths (bfl_flux_layers.py), blocks that
update ``img`` / ``txt`` / ``x`` in place; ``forward(x, timestep, context, y=None,
guidance=None, ref_latents=None, control=None, transformer_options={}, **kwargs)`` patchifies
2x2 and calls ``forward_orig(img, img_ids, txt, txt_ids, timestep / 1000.0, y, guidance,
control, transformer_options, attn_mask=None)`` (Neo's KModel hands FLUX a timestep of
sigma x 1000), where ``transformer_options["patches_replace"]["dit"]`` entries
``("double_block", i)`` / ``("single_block", i)`` replace a block call with
``patch(args, {"original_block": block_wrap})``. Not modelled: reference latents (Kontext),
ControlNet inputs, Flux2's global modulation and text ids, ``post_input`` patches.
``tests/standins/neo/backend/nn/flux.py`` is the wiring stand-in; this one is for loading a
trained model (hyca.reference.webui)."""

from __future__ import annotations

import torch

from bfl_flux_layers import FluxBody, patchify, unpatchify
from flux_block_loops import neo_blocks


class IntegratedFluxTransformer2DModel(FluxBody):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, in_place=True, **kwargs)

    def forward_orig(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None, control=None,
                     transformer_options={}, attn_mask=None):  # noqa: B006 - upstream's signature
        img, txt, vec = self.embed(img, txt, timesteps, y, guidance)
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))
        img = neo_blocks(self, img, txt, vec, pe, attn_mask, transformer_options)
        return self.final_layer(img, vec)

    def forward(self, x, timestep, context, y=None, guidance=None, ref_latents=None, control=None,
                transformer_options={}, **kwargs):  # noqa: B006 - upstream's signature
        img, img_ids, h_len, w_len = patchify(x)
        txt_ids = torch.zeros((x.shape[0], context.shape[1], 3), dtype=torch.float32)
        out = self.forward_orig(img, img_ids, context, txt_ids, timestep / 1000.0, y, guidance, control,
                                transformer_options, attn_mask=kwargs.get("attention_mask"))
        return unpatchify(out, h_len, w_len)
