"""Stand-in of ``backend/nn/qwen.py`` of Forge Neo (Haoming02/sd-webui-forge-classic, neo branch; compared with the Neo tree vendored in
exo101/sd-webui-forge-neo-v3 at 5692d2d1e6c293faf5486f7cb18c27c9a3faa758, see tests/standins/CONFORMANCE.md): ``QwenImageTransformer2DModel.forward(x, timesteps, context,
attention_mask=None, guidance=None, ref_latents=None, transformer_options={},
control=None, **kw)`` with a 5-D ``x``; blocks in ``transformer_blocks`` are called with
``hidden_states=, encoder_hidden_states=, encoder_hidden_states_mask=, temb=,
image_rotary_emb=`` and return ``(txt, img)``; the ``dit`` ``("double_block", i)``
replace patch is honoured. Out of place, like upstream. Tiny random weights; block
internals simplified."""

from __future__ import annotations

import torch
from torch import nn

from standin_layers import JointPair, Modulated, scale_gates, timestep_embedding


class QwenImageTransformerBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.pair = JointPair(dim)

    def forward(self, hidden_states, encoder_hidden_states, encoder_hidden_states_mask=None, temb=None,
                image_rotary_emb=None, transformer_options={}):  # noqa: B006
        img, txt = self.pair(hidden_states, encoder_hidden_states, temb, image_rotary_emb)
        return txt, img


class QwenImageTransformer2DModel(nn.Module):
    def __init__(self, in_channels=16, joint_attention_dim=16, num_layers=4, inner_dim=32, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.inner_dim, self.patch_size = inner_dim, 2
        self.img_in = nn.Linear(in_channels * 4, inner_dim)
        self.txt_norm = nn.LayerNorm(joint_attention_dim)
        self.txt_in = nn.Linear(joint_attention_dim, inner_dim)
        self.time_text_embed = nn.Linear(256, inner_dim)
        self.transformer_blocks = nn.ModuleList([QwenImageTransformerBlock(inner_dim) for _ in range(num_layers)])
        self.norm_out = Modulated(inner_dim)
        self.proj_out = nn.Linear(inner_dim, in_channels * 4)
        scale_gates(self)

    def forward(self, x, timesteps, context, attention_mask=None, guidance=None, ref_latents=None,
                transformer_options={}, control=None, **kwargs):  # noqa: B006
        bs, c, t, h, w = x.shape
        hidden_states = x[:, :, 0].reshape(bs, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
        hidden_states = self.img_in(hidden_states.reshape(bs, (h // 2) * (w // 2), c * 4))
        encoder_hidden_states = self.txt_in(self.txt_norm(context))
        temb = self.time_text_embed(timestep_embedding(timesteps, 256))
        image_rotary_emb = None
        blocks_replace = transformer_options.get("patches_replace", {}).get("dit", {})
        for i, block in enumerate(self.transformer_blocks):
            if ("double_block", i) in blocks_replace:
                def block_wrap(args, block=block):
                    out = {}
                    out["txt"], out["img"] = block(hidden_states=args["img"], encoder_hidden_states=args["txt"],
                                                   encoder_hidden_states_mask=attention_mask, temb=args["vec"],
                                                   image_rotary_emb=args["pe"],
                                                   transformer_options=args["transformer_options"])
                    return out

                out = blocks_replace[("double_block", i)](
                    {"img": hidden_states, "txt": encoder_hidden_states, "vec": temb, "pe": image_rotary_emb,
                     "transformer_options": transformer_options}, {"original_block": block_wrap})
                hidden_states, encoder_hidden_states = out["img"], out["txt"]
            else:
                encoder_hidden_states, hidden_states = block(
                    hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                    encoder_hidden_states_mask=attention_mask, temb=temb, image_rotary_emb=image_rotary_emb,
                    transformer_options=transformer_options)
        out = self.proj_out(self.norm_out(hidden_states, temb)[0])
        out = out.reshape(bs, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(bs, c, h, w)
        return out.unsqueeze(2)
