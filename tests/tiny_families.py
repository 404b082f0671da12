"""Tiny pipelines of every supported DiT family, for tests.

Each :class:`Case` builds the real diffusers pipeline class around real transformers
made from small configs (nothing mocked, nothing downloaded). Text encoders play no part
in caching: prompts go in as random ``prompt_embeds``; the VAE is left out and the
pipelines return latents, except Qwen-Image-Edit, whose reference image goes through a
tiny ``AutoencoderKLQwenImage``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from diffusers import (Flux2Pipeline, Flux2Transformer2DModel, ChronoEditPipeline, ChronoEditTransformer3DModel, AutoencoderKLHunyuanVideo15, HunyuanVideo15Pipeline, HunyuanVideo15Transformer3DModel,
                       FluxKontextPipeline, SanaVideoPipeline, SanaVideoTransformer3DModel, SkyReelsV2Pipeline, SkyReelsV2Transformer3DModel, AutoencoderKL, AutoencoderKLQwenImage, AutoencoderKLWan, WanVACEPipeline, WanVACETransformer3DModel, FluxImg2ImgPipeline, StableDiffusion3Img2ImgPipeline, ChromaPipeline, ChromaTransformer2DModel, CogView4Pipeline,
                       CogView4Transformer2DModel, FlowMatchEulerDiscreteScheduler, FluxPipeline,
                       FluxTransformer2DModel, HiDreamImagePipeline,
                       HiDreamImageTransformer2DModel, HunyuanVideoPipeline, HunyuanVideoTransformer3DModel,
                       Lumina2Pipeline, Lumina2Transformer2DModel, QwenImageEditPipeline, QwenImagePipeline,
                       QwenImageTransformer2DModel, SanaPipeline, SanaTransformer2DModel, SD3Transformer2DModel,
                       StableDiffusion3Pipeline, WanPipeline, WanTransformer3DModel, ZImagePipeline,
                       ZImageTransformer2DModel)
from diffusers.guiders import ClassifierFreeGuidance
from PIL import Image
from transformers import CLIPVisionConfig, CLIPVisionModel
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

TEXT_TOKENS = 5


@dataclass
class Case:
    """One family's tiny pipeline; ``extra`` call arguments override the test's.
    ``streams``: per block list, written out here from diffusers' sources
    independently of HyCa's table, ``(attribute, index of the
    output stream in the block's returned tuple or None for a lone tensor, which of the
    stream's tokens reach the output: False all, True the tail, "head" the head)``."""

    name: str
    transformer: Callable[[int], torch.nn.Module]
    pipeline: Callable[..., object]
    call: Callable[..., torch.Tensor]
    streams: list[tuple[str, int | None, bool]]
    experts: tuple[str, ...] = ("transformer",)
    extra: dict = field(default_factory=dict)

    def build(self, seed: int = 0):
        """A pipeline with fresh transformers (identical weights for equal seeds)."""
        models = {name: self.transformer(seed + i) for i, name in enumerate(self.experts)}
        return self.pipeline(**models)

    def copy_of(self, pipe):
        models = {name: copy.deepcopy(getattr(pipe, name)) for name in self.experts}
        return self.pipeline(**models)

    def run(self, pipe, steps: int, **extra) -> torch.Tensor:
        with torch.no_grad():
            return self.call(pipe, steps, **{**extra, **self.extra})


def _seeded(cls, seed: int, gain: float = 1.0, **config):
    torch.manual_seed(seed)
    model = cls(**config).eval()
    if gain != 1.0:  # random init leaves modulation gates small: make block residuals matter
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ("norm" in name or "mod" in name) and name.endswith("linear.weight"):
                    p.mul_(gain)
    return model


def _embeds(dim: int, seed: int, batch: int = 1, tokens: int = TEXT_TOKENS) -> torch.Tensor:
    return torch.randn(batch, tokens, dim, generator=torch.Generator().manual_seed(seed))


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(1)


def _scheduler(**config) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(**config)


# --- FLUX.1 -----------------------------------------------------------------------------

FLUX = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=3, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=24, axes_dims_rope=[4, 6, 6])


def _flux_call(pipe, steps, cfg=False, **extra):
    negative = dict(negative_prompt_embeds=_embeds(32, 7), negative_pooled_prompt_embeds=torch.ones(1, 24),
                    true_cfg_scale=3.0) if cfg else {}
    return pipe(prompt_embeds=_embeds(32, 3), pooled_prompt_embeds=torch.zeros(1, 24), height=64, width=64,
                num_inference_steps=steps, output_type="latent", generator=_generator(), **negative, **extra).images


def _flux_pipeline(transformer):
    return FluxPipeline(scheduler=_scheduler(), vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=transformer)


# --- FLUX.2 -----------------------------------------------------------------------------

FLUX2 = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=3, attention_head_dim=16,
             num_attention_heads=2, joint_attention_dim=32, timestep_guidance_channels=16, axes_dims_rope=(4, 4, 4, 4))


def _flux2_call(pipe, steps, **extra):
    """Flux2Pipeline has no classifier-free guidance (its guidance_scale is a model input),
    so this call takes no ``cfg``; the tests that pass ``cfg=False`` to every case may."""
    if extra.pop("cfg", False):
        raise ValueError("Flux2Pipeline has no classifier-free guidance")
    return pipe(prompt_embeds=_embeds(32, 3), height=64, width=64, num_inference_steps=steps, guidance_scale=4.0,
                output_type="latent", generator=_generator(), **extra).images


def _flux2_pipeline(transformer):
    return Flux2Pipeline(scheduler=_scheduler(), vae=None, text_encoder=None, tokenizer=None, transformer=transformer)


# --- Qwen-Image (and Edit) ------------------------------------------------------------

QWEN = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(4, 6, 6))


def _qwen_cfg(cfg: bool) -> dict:
    if not cfg:
        return {}
    return dict(negative_prompt_embeds=_embeds(16, 7), negative_prompt_embeds_mask=torch.ones(1, TEXT_TOKENS),
                true_cfg_scale=3.0)


def _qwen_call(pipe, steps, cfg=False, **extra):
    return pipe(prompt_embeds=_embeds(16, 3), prompt_embeds_mask=torch.ones(1, TEXT_TOKENS), height=64, width=64,
                num_inference_steps=steps, output_type="latent", generator=_generator(),
                **_qwen_cfg(cfg), **extra).images


def _qwen_pipeline(transformer):
    return QwenImagePipeline(scheduler=_scheduler(shift=3.0), vae=None, text_encoder=None, tokenizer=None,
                             transformer=transformer)


def _tiny_qwen_vae() -> AutoencoderKLQwenImage:
    torch.manual_seed(5)
    # five down-sampling levels (32x): the 1024 x 1024 reference image becomes 256 tokens
    return AutoencoderKLQwenImage(base_dim=4, z_dim=4, dim_mult=[1] * 6, num_res_blocks=1,
                                  temperal_downsample=[False, False, False, True, True], latents_mean=[0.0] * 4,
                                  latents_std=[1.0] * 4).eval()


def _remember_encodings(vae: AutoencoderKLQwenImage) -> AutoencoderKLQwenImage:
    """The Edit pipeline resizes every reference image to about 1024 x 1024 pixels, which
    costs even a tiny VAE seconds on a CPU. Every test encodes the same image, so keep
    the real encoder's result per input instead of recomputing it."""
    encode, seen = vae.encode, {}

    def remembered(x, *args, **kwargs):
        key = (tuple(x.shape), x.dtype, hash(x.numpy().tobytes()))
        if key not in seen:
            seen[key] = encode(x, *args, **kwargs)
        return seen[key]

    vae.encode = remembered
    return vae


QWEN_EDIT_VAE = _remember_encodings(_tiny_qwen_vae())


def _qwen_edit_pipeline(transformer):
    return QwenImageEditPipeline(scheduler=_scheduler(shift=3.0), vae=QWEN_EDIT_VAE, text_encoder=None,
                                 tokenizer=None, processor=None, transformer=transformer)


def _reference_image(side: int) -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 255, (side, side, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _qwen_edit_call(pipe, steps, cfg=False, **extra):
    # The pipeline resizes the reference image to about 1024 x 1024 before encoding it;
    # a small source image keeps the tiny VAE's work to that one resize target.
    return pipe(image=_reference_image(32), prompt_embeds=_embeds(16, 3),
                prompt_embeds_mask=torch.ones(1, TEXT_TOKENS), height=256, width=256, num_inference_steps=steps,
                output_type="latent", generator=_generator(), **_qwen_cfg(cfg), **extra).images


# --- HunyuanVideo -----------------------------------------------------------------------

HUNYUAN = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
               num_single_layers=2, num_refiner_layers=1, patch_size=1, text_embed_dim=16,
               pooled_projection_dim=8, rope_axes_dim=(4, 6, 6))


def _hunyuan_call(pipe, steps, cfg=False, **extra):
    negative = dict(negative_prompt_embeds=_embeds(16, 7), negative_pooled_prompt_embeds=torch.ones(1, 8),
                    negative_prompt_attention_mask=torch.ones(1, TEXT_TOKENS), true_cfg_scale=3.0) if cfg else {}
    return pipe(prompt_embeds=_embeds(16, 3), pooled_prompt_embeds=torch.zeros(1, 8),
                prompt_attention_mask=torch.ones(1, TEXT_TOKENS), height=32, width=32, num_frames=5,
                num_inference_steps=steps, output_type="latent", generator=_generator(),
                **negative, **extra).frames


def _hunyuan_pipeline(transformer):
    return HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=transformer, vae=None,
                                scheduler=_scheduler(shift=7.0), text_encoder_2=None, tokenizer_2=None)


# --- HunyuanVideo 1.5 ----------------------------------------------------------------------

# in_channels: the pipeline feeds latents, zero condition latents and a mask (4 + 4 + 1)
HUNYUAN15 = dict(in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
                 num_refiner_layers=1, text_embed_dim=16, text_embed_2_dim=8, image_embed_dim=8,
                 rope_axes_dim=(4, 6, 6), target_size=64, task_type="t2v")


def _tiny_hunyuan15_vae() -> AutoencoderKLHunyuanVideo15:
    torch.manual_seed(8)  # the pipeline reads its compression ratios and latent channels; it decodes nothing here
    return AutoencoderKLHunyuanVideo15(latent_channels=4, block_out_channels=(8, 8, 8, 8, 8), layers_per_block=1).eval()


TINY_HUNYUAN15_VAE = _tiny_hunyuan15_vae()


def _hunyuan15_pipeline(transformer):
    pipe = HunyuanVideo15Pipeline(text_encoder=None, tokenizer=None, transformer=transformer, vae=TINY_HUNYUAN15_VAE,
                                  scheduler=_scheduler(shift=7.0), text_encoder_2=None, tokenizer_2=None,
                                  guider=ClassifierFreeGuidance(guidance_scale=1.0))
    pipe.vision_num_semantic_tokens = 16  # zero image tokens for text-to-video: 729 in the release, fewer here
    return pipe


def _hunyuan15_call(pipe, steps, cfg=False, **extra):
    pipe.guider = ClassifierFreeGuidance(guidance_scale=3.0 if cfg else 1.0)
    second = dict(prompt_embeds_2=_embeds(8, 4, tokens=3), prompt_embeds_mask_2=torch.ones(1, 3),
                  negative_prompt_embeds_2=_embeds(8, 8, tokens=3), negative_prompt_embeds_mask_2=torch.ones(1, 3))
    return pipe(prompt_embeds=_embeds(16, 3), prompt_embeds_mask=torch.ones(1, TEXT_TOKENS),
                negative_prompt_embeds=_embeds(16, 7), negative_prompt_embeds_mask=torch.ones(1, TEXT_TOKENS),
                height=64, width=64, num_frames=5, num_inference_steps=steps, output_type="latent",
                generator=_generator(), **second, **extra).frames


# --- Wan 2.1 / 2.2 ----------------------------------------------------------------------

WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
           text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32)


def _wan_call(pipe, steps, cfg=False, **extra):
    guidance = dict(guidance_scale=3.0, negative_prompt_embeds=_embeds(16, 7)) if cfg else dict(guidance_scale=1.0)
    if getattr(pipe, "transformer_2", None) is not None:
        guidance["guidance_scale_2"] = guidance["guidance_scale"]
    return pipe(prompt_embeds=_embeds(16, 3), height=32, width=32, num_frames=5, num_inference_steps=steps,
                output_type="latent", generator=_generator(), **guidance, **extra).frames


def _wan_pipeline(transformer, transformer_2=None):
    return WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=_scheduler(shift=5.0),
                       transformer=transformer, transformer_2=transformer_2,
                       boundary_ratio=0.85 if transformer_2 is not None else None)


# --- Wan VACE ----------------------------------------------------------------------------

# vace_in_channels: the pipeline stacks two VAE latents (inactive, reactive: 2 x z_dim) and
# the mask folded into 8 x 8 = 64 channels (pipeline_wan_vace.py, prepare_masks).
WAN_VACE = dict(WAN, num_layers=3, vace_layers=[0, 2], vace_in_channels=2 * 4 + 64)


def _tiny_wan_vae() -> AutoencoderKLWan:
    torch.manual_seed(7)
    return AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True], latents_mean=[0.0] * 4,
                            latents_std=[1.0] * 4).eval()


TINY_WAN_VAE = _tiny_wan_vae()


def _vace_pipeline(transformer):
    return WanVACEPipeline(tokenizer=None, text_encoder=None, vae=TINY_WAN_VAE, scheduler=_scheduler(shift=5.0),
                           transformer=transformer)


def _vace_call(pipe, steps, cfg=False, **extra):
    """A control video whose first two frames are kept (mask 0) and the rest generated."""
    rng = np.random.default_rng(0)
    video = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(5)]
    mask = [Image.fromarray(np.full((32, 32), 0 if i < 2 else 255, dtype=np.uint8)) for i in range(5)]
    guidance = dict(guidance_scale=3.0, negative_prompt_embeds=_embeds(16, 7)) if cfg else dict(guidance_scale=1.0)
    return pipe(prompt_embeds=_embeds(16, 3), video=video, mask=mask, height=32, width=32, num_frames=5,
                num_inference_steps=steps, output_type="latent", generator=_generator(), **guidance,
                **extra).frames


# --- SkyReels-V2 (text-to-video; Wan's design) -----------------------------------------


def _skyreels_call(pipe, steps, cfg=False, **extra):
    guidance = dict(guidance_scale=3.0, negative_prompt_embeds=_embeds(16, 7)) if cfg else dict(guidance_scale=1.0)
    return pipe(prompt_embeds=_embeds(16, 3), height=32, width=32, num_frames=5, num_inference_steps=steps,
                output_type="latent", generator=_generator(), **guidance, **extra).frames


def _skyreels_pipeline(transformer):
    return SkyReelsV2Pipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=_scheduler(shift=5.0),
                              transformer=transformer)


# --- ChronoEdit (Wan 2.1 image-to-video's design) ----------------------------------------

# in_channels: latents (4) + the first-frame condition: a mask over 4 temporal sub-frames (4)
# and its VAE latent (4), as pipeline_chronoedit.py prepare_latents stacks them;
# added_kv_proj_dim: the image cross-attention's width, the transformer's (2 x 12)
CHRONOEDIT = dict(WAN, in_channels=12, image_dim=8, added_kv_proj_dim=24)


def _tiny_clip_vision() -> CLIPVisionModel:
    torch.manual_seed(3)
    return CLIPVisionModel(CLIPVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                                            num_attention_heads=2, image_size=32, patch_size=8,
                                            projection_dim=8)).eval()


TINY_CLIP_VISION = _tiny_clip_vision()


def _chronoedit_pipeline(transformer):
    return ChronoEditPipeline(tokenizer=None, text_encoder=None, image_encoder=TINY_CLIP_VISION,
                              image_processor=CLIPImageProcessorPil(size={"shortest_edge": 32},
                                                                    crop_size={"height": 32, "width": 32}),
                              transformer=transformer, vae=TINY_WAN_VAE, scheduler=_scheduler(shift=5.0))


def _chronoedit_call(pipe, steps, cfg=False, **extra):
    guidance = dict(guidance_scale=3.0, negative_prompt_embeds=_embeds(16, 7)) if cfg else dict(guidance_scale=1.0)
    return pipe(image=_reference_image(32), prompt_embeds=_embeds(16, 3), height=32, width=32,
                num_inference_steps=steps, output_type="latent", generator=_generator(), **guidance, **extra).frames


# --- SD3 / SD3.5 ------------------------------------------------------------------------

SD3 = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=2,
           joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
           pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm")


def _sd3_call(pipe, steps, cfg=False, **extra):
    negative = dict(negative_prompt_embeds=_embeds(16, 7), negative_pooled_prompt_embeds=torch.ones(1, 8))
    guidance = dict(guidance_scale=3.0, **negative) if cfg else dict(guidance_scale=1.0)
    return pipe(prompt_embeds=_embeds(16, 3), pooled_prompt_embeds=torch.zeros(1, 8), height=64, width=64,
                num_inference_steps=steps, output_type="latent", generator=_generator(),
                **guidance, **extra).images


def _sd3_pipeline(transformer):
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=_scheduler(shift=3.0), vae=None,
                                    text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                    text_encoder_3=None, tokenizer_3=None)


# --- Chroma -----------------------------------------------------------------------------

CHROMA = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
              num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(4, 6, 6),
              approximator_num_channels=16, approximator_hidden_dim=32, approximator_layers=1)


def _chroma_call(pipe, steps, cfg=False, **extra):
    negative = dict(guidance_scale=3.0, negative_prompt_embeds=_embeds(16, 7),
                    negative_prompt_attention_mask=torch.ones(1, TEXT_TOKENS)) if cfg else dict(guidance_scale=1.0)
    return pipe(prompt_embeds=_embeds(16, 3), prompt_attention_mask=torch.ones(1, TEXT_TOKENS), height=64, width=64,
                num_inference_steps=steps, output_type="latent", generator=_generator(), **negative, **extra).images


def _chroma_pipeline(transformer):
    return ChromaPipeline(scheduler=_scheduler(), vae=None, text_encoder=None, tokenizer=None, transformer=transformer)


# --- Lumina2 ----------------------------------------------------------------------------

LUMINA2 = dict(sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_layers=2, num_refiner_layers=1,
               num_attention_heads=2, num_kv_heads=1, multiple_of=16, axes_dim_rope=(4, 6, 6),
               axes_lens=(32, 32, 32), cap_feat_dim=16)


def _lumina2_call(pipe, steps, cfg=False, **extra):
    negative = dict(guidance_scale=3.0, negative_prompt_embeds=_embeds(16, 7),
                    negative_prompt_attention_mask=torch.ones(1, TEXT_TOKENS, dtype=torch.long)) if cfg \
        else dict(guidance_scale=1.0)
    return pipe(prompt_embeds=_embeds(16, 3), prompt_attention_mask=torch.ones(1, TEXT_TOKENS, dtype=torch.long),
                height=64, width=64, num_inference_steps=steps, output_type="latent", generator=_generator(),
                system_prompt="", **negative, **extra).images


def _lumina2_pipeline(transformer):
    return Lumina2Pipeline(transformer=transformer, scheduler=_scheduler(), vae=None, text_encoder=None, tokenizer=None)


# --- Z-Image ----------------------------------------------------------------------------

ZIMAGE = dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2, n_refiner_layers=1,
              n_heads=2, n_kv_heads=2, cap_feat_dim=16, axes_dims=[4, 6, 6], axes_lens=[128, 32, 32])


def _zimage_call(pipe, steps, cfg=False, **extra):
    guidance = dict(guidance_scale=3.0, negative_prompt_embeds=[_embeds(16, 7)[0]]) if cfg \
        else dict(guidance_scale=1.0)
    return pipe(prompt_embeds=[_embeds(16, 3)[0]], height=64, width=64, num_inference_steps=steps,
                output_type="latent", generator=_generator(), **guidance, **extra).images


def _zimage_pipeline(transformer):
    return ZImagePipeline(scheduler=_scheduler(shift=3.0), vae=None, text_encoder=None, tokenizer=None,
                          transformer=transformer)


# --- HiDream ----------------------------------------------------------------------------

HIDREAM = dict(patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=2, attention_head_dim=8,
               num_attention_heads=2, caption_channels=[16, 16], text_emb_dim=16, num_routed_experts=2,
               num_activated_experts=1, axes_dims_rope=(4, 2, 2), max_resolution=(16, 16), llama_layers=[0, 1, 2])


def _hidream_call(pipe, steps, cfg=False, **extra):
    g = torch.Generator().manual_seed(9)
    guidance = dict(guidance_scale=3.0, negative_prompt_embeds_t5=_embeds(16, 7),
                    negative_prompt_embeds_llama3=torch.randn(3, 1, TEXT_TOKENS, 16, generator=g),
                    negative_pooled_prompt_embeds=torch.ones(1, 16)) if cfg else dict(guidance_scale=1.0)
    return pipe(prompt_embeds_t5=_embeds(16, 3), prompt_embeds_llama3=torch.randn(3, 1, TEXT_TOKENS, 16, generator=g),
                pooled_prompt_embeds=torch.zeros(1, 16), height=64, width=64, num_inference_steps=steps,
                output_type="latent", generator=_generator(), **guidance, **extra).images


def _hidream_pipeline(transformer):
    pipe = HiDreamImagePipeline(scheduler=_scheduler(shift=3.0), vae=None, text_encoder=None, tokenizer=None,
                                text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
                                text_encoder_4=None, tokenizer_4=None, transformer=transformer)
    # The pipeline rescales every request to the area of its default size (1024 x 1024
    # pixels); the tiny model gets a 64 x 64 default instead.
    pipe.default_sample_size = 8
    return pipe


# --- CogView4 ---------------------------------------------------------------------------

COGVIEW4 = dict(patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
                num_attention_heads=2, text_embed_dim=16, time_embed_dim=8, condition_dim=4, pos_embed_max_size=16,
                sample_size=8, rope_axes_dim=(4, 4))


def _cogview4_call(pipe, steps, cfg=False, **extra):
    negative = dict(guidance_scale=3.0, negative_prompt_embeds=_embeds(16, 7)) if cfg else dict(guidance_scale=1.0)
    return pipe(prompt_embeds=_embeds(16, 3), height=64, width=64, num_inference_steps=steps, output_type="latent",
                generator=_generator(), **negative, **extra).images


def _cogview4_pipeline(transformer):
    return CogView4Pipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                            scheduler=_scheduler(base_shift=0.25, max_shift=0.75, base_image_seq_len=256,
                                                 use_dynamic_shifting=True, time_shift_type="linear"))


# --- Sana -------------------------------------------------------------------------------

SANA = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
            num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16,
            sample_size=8, patch_size=1)


def _sana_call(pipe, steps, cfg=False, **extra):
    negative = dict(guidance_scale=3.0, negative_prompt_embeds=_embeds(16, 7),
                    negative_prompt_attention_mask=torch.ones(1, TEXT_TOKENS)) if cfg else dict(guidance_scale=1.0)
    return pipe(prompt_embeds=_embeds(16, 3), prompt_attention_mask=torch.ones(1, TEXT_TOKENS), height=128,
                width=128, num_inference_steps=steps, output_type="latent", generator=_generator(),
                use_resolution_binning=False, negative_prompt=None, **negative, **extra).images


def _sana_pipeline(transformer):
    return SanaPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                        scheduler=_scheduler(shift=3.0))


# --- Sana-Video ---------------------------------------------------------------------------

SANA_VIDEO = dict(SANA, patch_size=(1, 2, 2), rope_max_seq_len=32)


def _sana_video_call(pipe, steps, cfg=False, **extra):
    negative = dict(guidance_scale=3.0, negative_prompt_embeds=_embeds(16, 7),
                    negative_prompt_attention_mask=torch.ones(1, TEXT_TOKENS)) if cfg else dict(guidance_scale=1.0)
    return pipe(prompt_embeds=_embeds(16, 3), prompt_attention_mask=torch.ones(1, TEXT_TOKENS), height=64,
                width=64, frames=5, num_inference_steps=steps, output_type="latent", generator=_generator(),
                use_resolution_binning=False, negative_prompt=None, **negative, **extra).frames


def _sana_video_pipeline(transformer):
    return SanaVideoPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                             scheduler=_scheduler(shift=3.0))


# --- FLUX.1 Kontext (the FLUX transformer; the reference image's tokens join the image stream) ---


def _flux_kontext_pipeline(transformer):
    return FluxKontextPipeline(scheduler=_scheduler(), vae=TINY_VAE, text_encoder=None, tokenizer=None,
                               text_encoder_2=None, tokenizer_2=None, transformer=transformer)


def _flux_kontext_call(pipe, steps, cfg=False, **extra):
    negative = dict(negative_prompt_embeds=_embeds(32, 7), negative_pooled_prompt_embeds=torch.ones(1, 24),
                    true_cfg_scale=3.0) if cfg else {}
    # max_area: the pipeline otherwise rescales every request to about 1024 x 1024 pixels
    return pipe(image=_init_image(), prompt_embeds=_embeds(32, 3), pooled_prompt_embeds=torch.zeros(1, 24),
                height=64, width=64, max_area=64 * 64, _auto_resize=False, num_inference_steps=steps,
                output_type="latent", generator=_generator(), **negative, **extra).images


def _maker(cls, config, gain):
    return lambda seed: _seeded(cls, seed, gain, **config)


CASES: dict[str, Case] = {
    "flux": Case("flux", _maker(FluxTransformer2DModel, FLUX, 20.0), _flux_pipeline, _flux_call,
                 [("transformer_blocks", 1, False), ("single_transformer_blocks", 1, False)]),
    "flux2": Case("flux2", _maker(Flux2Transformer2DModel, FLUX2, 20.0), _flux2_pipeline, _flux2_call,
                  [("transformer_blocks", 1, False), ("single_transformer_blocks", None, True)]),
    "qwenimage": Case("qwenimage", _maker(QwenImageTransformer2DModel, QWEN, 20.0), _qwen_pipeline, _qwen_call,
                      [("transformer_blocks", 1, False)]),
    "qwenimage-edit": Case("qwenimage-edit", _maker(QwenImageTransformer2DModel, QWEN, 20.0), _qwen_edit_pipeline,
                           _qwen_edit_call, [("transformer_blocks", 1, False)]),
    "hunyuanvideo": Case("hunyuanvideo", _maker(HunyuanVideoTransformer3DModel, HUNYUAN, 20.0), _hunyuan_pipeline,
                         _hunyuan_call, [("transformer_blocks", 0, False), ("single_transformer_blocks", 0, False)]),
    "hunyuanvideo15": Case("hunyuanvideo15", _maker(HunyuanVideo15Transformer3DModel, HUNYUAN15, 20.0),
                           _hunyuan15_pipeline, _hunyuan15_call, [("transformer_blocks", 0, False)]),
    "wan2.1": Case("wan2.1", _maker(WanTransformer3DModel, WAN, 1.0), _wan_pipeline, _wan_call,
                   [("blocks", None, False)]),
    "wan2.2": Case("wan2.2", _maker(WanTransformer3DModel, WAN, 1.0), _wan_pipeline, _wan_call,
                   [("blocks", None, False)], experts=("transformer", "transformer_2")),
    "wan-vace": Case("wan-vace", _maker(WanVACETransformer3DModel, WAN_VACE, 1.0), _vace_pipeline, _vace_call,
                     [("blocks", None, False)]),
    "skyreels-v2": Case("skyreels-v2", _maker(SkyReelsV2Transformer3DModel, WAN, 1.0), _skyreels_pipeline,
                        _skyreels_call, [("blocks", None, False)]),
    "chronoedit": Case("chronoedit", _maker(ChronoEditTransformer3DModel, CHRONOEDIT, 1.0), _chronoedit_pipeline,
                       _chronoedit_call, [("blocks", None, False)]),
    "sd3": Case("sd3", _maker(SD3Transformer2DModel, SD3, 20.0), _sd3_pipeline, _sd3_call,
                [("transformer_blocks", 1, False)]),
    # batched CFG plus skip-layer guidance: a second call per step with skip_layers set
    "sd3-slg": Case("sd3-slg", _maker(SD3Transformer2DModel, SD3, 20.0), _sd3_pipeline, _sd3_call,
                    [("transformer_blocks", 1, False)],
                    extra=dict(cfg=True, skip_guidance_layers=[1], skip_layer_guidance_start=0.0,
                               skip_layer_guidance_stop=1.0)),
    "chroma": Case("chroma", _maker(ChromaTransformer2DModel, CHROMA, 20.0), _chroma_pipeline, _chroma_call,
                   [("transformer_blocks", 1, False), ("single_transformer_blocks", None, True)]),
    "lumina2": Case("lumina2", _maker(Lumina2Transformer2DModel, LUMINA2, 20.0), _lumina2_pipeline, _lumina2_call,
                    [("layers", None, False)]),
    "zimage": Case("zimage", _maker(ZImageTransformer2DModel, ZIMAGE, 20.0), _zimage_pipeline, _zimage_call,
                   [("layers", None, False)], extra=dict(cfg=True)),
    "hidream": Case("hidream", _maker(HiDreamImageTransformer2DModel, HIDREAM, 20.0), _hidream_pipeline,
                    _hidream_call, [("double_stream_blocks", 0, False), ("single_stream_blocks", None, "head")],
                    extra=dict(cfg=True)),
    "cogview4": Case("cogview4", _maker(CogView4Transformer2DModel, COGVIEW4, 20.0), _cogview4_pipeline,
                     _cogview4_call, [("transformer_blocks", 0, False)]),
    "sana": Case("sana", _maker(SanaTransformer2DModel, SANA, 1.0), _sana_pipeline, _sana_call,
                 [("transformer_blocks", None, False)]),
    "flux-kontext": Case("flux-kontext", _maker(FluxTransformer2DModel, FLUX, 20.0), _flux_kontext_pipeline,
                         _flux_kontext_call, [("transformer_blocks", 1, False), ("single_transformer_blocks", 1, False)]),
    "sana-video": Case("sana-video", _maker(SanaVideoTransformer3DModel, SANA_VIDEO, 1.0), _sana_video_pipeline,
                       _sana_video_call, [("transformer_blocks", None, False)]),
}


# --- img2img: the same transformers in their families' image-to-image pipelines ---------------


def _tiny_vae() -> AutoencoderKL:
    """8x down-sampling to 4 latent channels, the layout both tiny FLUX (16 = 4 x 2 x 2 packed)
    and tiny SD3 transformers take."""
    torch.manual_seed(6)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                         up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[4, 4, 4, 4],
                         layers_per_block=1, latent_channels=4, norm_num_groups=2, shift_factor=0.0,
                         scaling_factor=1.0).eval()


TINY_VAE = _tiny_vae()


def _init_image() -> torch.Tensor:
    return torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(8))


def _flux_img2img_pipeline(transformer):
    return FluxImg2ImgPipeline(scheduler=_scheduler(), vae=TINY_VAE, text_encoder=None, tokenizer=None,
                               text_encoder_2=None, tokenizer_2=None, transformer=transformer)


def _flux_img2img_call(pipe, steps, strength, **extra):
    return pipe(image=_init_image(), strength=strength, prompt_embeds=_embeds(32, 3),
                pooled_prompt_embeds=torch.zeros(1, 24), height=64, width=64, num_inference_steps=steps,
                output_type="latent", generator=_generator(), **extra).images


def _sd3_img2img_pipeline(transformer):
    return StableDiffusion3Img2ImgPipeline(transformer=transformer, scheduler=_scheduler(shift=3.0), vae=TINY_VAE,
                                           text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                           text_encoder_3=None, tokenizer_3=None)


def _sd3_img2img_call(pipe, steps, strength, **extra):
    return pipe(image=_init_image(), strength=strength, prompt_embeds=_embeds(16, 3),
                pooled_prompt_embeds=torch.zeros(1, 8), num_inference_steps=steps, output_type="latent",
                generator=_generator(), guidance_scale=1.0, **extra).images


#: family case -> (img2img pipeline around a transformer, call(pipe, steps, strength, **extra))
IMG2IMG: dict[str, tuple[Callable, Callable]] = {
    "flux": (_flux_img2img_pipeline, _flux_img2img_call),
    "sd3": (_sd3_img2img_pipeline, _sd3_img2img_call),
}
