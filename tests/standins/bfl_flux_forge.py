"""Stand-in of Forge's ``backend/nn/flux.py`` ``IntegratedFluxTransformer2DModel`` that carries
real FLUX weights (lllyasviel/stable-diffusion-webui-forge, read at
10e4a3779d436cb4a1c75308bfd7b7e7e0903f30; the interface is the one
tests/standins/CONFORMANCE.md checks at dfdcbab6). Upstream's constructor arguments, module
names (BFL state-dict keys) and maths (bfl_flux_layers.py); ``forward(x, timestep, context, y,
guidance, **kwargs)`` patchifies 2x2 and calls ``inner_forward(img, img_ids, txt, txt_ids,
timesteps, y, guidance=None)``, which loops ``img, txt = block(img=img, txt=txt, vec=vec,
pe=pe)`` over ``double_blocks`` and ``img = block(img, vec=vec, pe=pe)`` over
``single_blocks`` on ``cat((txt, img), 1)``. Blocks are out of place, like upstream.
``tests/standins/forge/backend/nn/flux.py`` is the wiring stand-in (random weights,
simplified maths); this one is for loading a trained model (hyca.reference.webui)."""

from __future__ import annotations

import torch

from bfl_flux_layers import FluxBody, patchify, unpatchify
from flux_block_loops import forge_blocks


class IntegratedFluxTransformer2DModel(FluxBody):
    def inner_forward(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None):
        img, txt, vec = self.embed(img, txt, timesteps, y, guidance)
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))
        img = forge_blocks(self, img, txt, vec, pe)
        return self.final_layer(img, vec)

    def forward(self, x, timestep, context, y, guidance=None, **kwargs):
        img, img_ids, h_len, w_len = patchify(x)
        txt_ids = torch.zeros((x.shape[0], context.shape[1], 3), dtype=x.dtype)
        out = self.inner_forward(img, img_ids.to(x.dtype), context, txt_ids, timestep, y, guidance)
        return unpatchify(out, h_len, w_len)
