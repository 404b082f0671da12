"""Per model family: which block lists exist, what each block returns, which stream reaches
the output. This table is the only model-specific knowledge the diffusers hooks need.

Read from the diffusers 0.42 sources of each transformer's ``forward``. The rule every
entry obeys: the cached residual is that of the stream which, after the last block,
is the only thing ``norm_out``/``proj_out`` read. At a skip step the first block adds the
forecast of the summed residuals to that stream and every block passes its inputs
through; the other streams (text) then leave the stack unchanged, which is harmless
because no later block runs to read them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...layouts import HEAD, SINGLE, TAIL, BlockList, Layout

TEXT = "encoder_hidden_states"
IMAGE = "hidden_states"


@dataclass(frozen=True)
class Family:
    name: str
    block_lists: tuple[BlockList, ...]
    timestep_arg: str = "timestep"
    input_arg: str = "hidden_states"
    bypass_args: tuple[str, ...] = ()
    #: Which way the transformer's timestep input moves during a run: "down" (noise at the
    #: largest value, as t and sigma do), or "up" where the model is fed 1 - t (Lumina2,
    #: Z-Image). A move the other way starts a new generation.
    timestep_direction: str = "down"
    #: Pipelines that batch both guidance branches into one call: the order of the halves
    #: ("uncond-first": ``torch.cat([negative, positive])``), so the probe can score the
    #: guided output. None: branches are separate calls (or there is no guidance).
    batched_guidance: str | None = None
    #: The output head: the module whose input is the last hidden state of the stream that
    #: reaches the output, after the final norm and modulation (a linear map away from the
    #: model output). Profiles with ``target="output"`` forecast that input instead of the
    #: blocks' residuals (:mod:`hyca.engine.cache`). None: not offered for this family.
    head: str | None = "proj_out"
    notes: str = ""


# The layouts of diffusers' blocks (:mod:`hyca.layouts`), in diffusers' argument names.
# Blocks that return (text, image) and take both by keyword: FLUX's double and single
# blocks, Qwen-Image's, Chroma's double blocks.
TEXT_IMAGE = Layout((TEXT, IMAGE), IMAGE)
# HunyuanVideo and CogView4 return them the other way round.
IMAGE_TEXT = Layout((IMAGE, TEXT), IMAGE)
# SD3's joint blocks: (text, image), the last (context_pre_only) returns (None, image).
JOINT = Layout((TEXT, IMAGE), IMAGE, text_dropped_if="context_pre_only")
# The image stream alone (Wan, Sana; Lumina2's joint sequence, cached whole).
IMAGE_ONLY = Layout(IMAGE, IMAGE)
# One tensor over a concatenated sequence: [text, image] (FLUX.2, Chroma single blocks) and
# [image, text] (HiDream single blocks).
CONCAT_TAIL = Layout(IMAGE, IMAGE, TAIL)
CONCAT_HEAD = Layout(IMAGE, IMAGE, HEAD)

FAMILIES: dict[str, Family] = {
    "FluxTransformer2DModel": Family(
        name="FLUX",
        block_lists=(
            BlockList("transformer_blocks", TEXT_IMAGE),
            BlockList("single_transformer_blocks", TEXT_IMAGE),
        ),
        notes=(
            "double blocks update (text, image) and return (text, image); single blocks take "
            "both streams, attend jointly and return (text, image); only the image stream "
            "reaches norm_out/proj_out, so a skip step forecasts the image stream alone"
        ),
    ),
    "Flux2Transformer2DModel": Family(
        name="FLUX.2",
        block_lists=(
            BlockList("transformer_blocks", TEXT_IMAGE),
            BlockList("single_transformer_blocks", CONCAT_TAIL),
        ),
        notes=(
            "double blocks return (text, image); the forward concatenates [text, image] for the "
            "single blocks, which return that one tensor; the image tokens at its tail (with "
            "reference-image tokens, when the pipeline appends them) reach the output. The Klein "
            "KV pipeline's first call carries the reference tokens and later calls read them from "
            "a key/value cache: the stream shrinks after step 0, so HyCa starts over there (untested)"
        ),
    ),
    "QwenImageTransformer2DModel": Family(
        name="Qwen-Image",
        block_lists=(BlockList("transformer_blocks", TEXT_IMAGE),),
        notes=(
            "one list of dual-stream blocks returning (text, image); the Edit pipelines append "
            "the reference image's latent tokens to the image stream, so the cached residual "
            "covers them too (the pipeline slices them off after the transformer)"
        ),
    ),
    "HunyuanVideoTransformer3DModel": Family(
        name="HunyuanVideo",
        block_lists=(
            BlockList("transformer_blocks", IMAGE_TEXT),
            BlockList("single_transformer_blocks", IMAGE_TEXT),
        ),
        notes=(
            "the token refiner lives inside context_embedder and runs every step (text only); "
            "dual- and single-stream blocks are called positionally and return (image, text); "
            "the image stream's tokens cover every latent frame"
        ),
    ),
    "HunyuanVideo15Transformer3DModel": Family(
        name="HunyuanVideo 1.5",
        block_lists=(BlockList("transformer_blocks", IMAGE_TEXT),),
        notes=(
            "one list of dual-stream blocks called positionally, returning (video, text); the "
            "text side (both text encoders' tokens and the image embedding's, joined before the "
            "blocks) never reaches norm_out/proj_out. The pipeline's guider names its passes "
            "pred_cond / pred_uncond with cache_context"
        ),
    ),
    "WanTransformer3DModel": Family(
        name="Wan",
        block_lists=(BlockList("blocks", IMAGE_ONLY),),
        notes=(
            "cross-attention blocks called positionally, returning the video stream alone; "
            "Wan 2.2 A14B pipelines hold two of these (transformer, transformer_2), each with "
            "its own engine, profile and step count"
        ),
    ),
    "WanVACETransformer3DModel": Family(
        name="Wan VACE",
        block_lists=(BlockList("blocks", IMAGE_ONLY),),
        notes=(
            "Wan's blocks plus vace_blocks, which run first, every step, on the embedded latent "
            "and the control video; after main block i in vace_layers the forward adds hint i "
            "to the stream, outside the block. The hints are not part of any block's residual: "
            "a skip step adds the forecast of the blocks' residuals at the first block and the "
            "forward still adds this step's exact hints, so nothing is counted twice or forecast "
            "that is computed anyway (the VACE blocks are never skipped)"
        ),
    ),
    "SkyReelsV2Transformer3DModel": Family(
        name="SkyReels-V2",
        block_lists=(BlockList("blocks", IMAGE_ONLY),),
        notes=(
            "Wan's design (its blocks take a causal attention mask as a fifth input and return "
            "the video stream alone). The diffusion-forcing pipelines feed a timestep per latent "
            "frame; HyCa positions a call by the largest (the noisiest frame)"
        ),
    ),
    "ChronoEditTransformer3DModel": Family(
        name="ChronoEdit",
        block_lists=(BlockList("blocks", IMAGE_ONLY),),
        notes=(
            "Wan 2.1 image-to-video's design (blocks return the video stream alone; the CLIP "
            "image tokens join the text side). The pipeline runs cond and uncond without a "
            "cache_context. With temporal reasoning it keeps only the first and last frame "
            "part-way through: the input shape changes, so HyCa starts a new generation there "
            "(warm-up computes again); that mode is not tested"
        ),
    ),
    "SD3Transformer2DModel": Family(
        name="SD3 / SD3.5",
        block_lists=(BlockList("transformer_blocks", JOINT),),
        bypass_args=("skip_layers",),
        batched_guidance="uncond-first",
        notes=(
            "joint blocks return (text, image); the last has context_pre_only and returns "
            "(None, image). Skip-layer guidance calls the transformer a second time with "
            "skip_layers set and some blocks never run: HyCa stays out of that call"
        ),
    ),
    "ChromaTransformer2DModel": Family(
        name="Chroma",
        block_lists=(
            BlockList("transformer_blocks", TEXT_IMAGE),
            BlockList("single_transformer_blocks", CONCAT_TAIL),
        ),
        notes=(
            "double blocks return (text, image); the forward concatenates [text, image] for "
            "the single blocks, which return that one tensor; the image tokens at its tail "
            "reach the output. The pipeline runs cond and uncond without a cache_context"
        ),
    ),
    "Lumina2Transformer2DModel": Family(
        name="Lumina2",
        block_lists=(BlockList("layers", IMAGE_ONLY),),
        timestep_direction="up",
        head='norm_out.linear_2',
        notes=(
            "context_refiner and noise_refiner run every step (each on its own stream); the "
            "main layers see one joint [text, image] sequence, cached whole (text and padding "
            "included: the output reads the image part). The pipeline runs cond and uncond "
            "without a cache_context"
        ),
    ),
    "ZImageTransformer2DModel": Family(
        name="Z-Image",
        block_lists=(BlockList("layers", SINGLE),),
        timestep_arg="t",
        input_arg="x",
        timestep_direction="up",
        batched_guidance="cond-first",
        head=None,
        notes=(
            "Lumina2's design with other names: the input is a list of latents, refiners run "
            "every step, the main layers see one padded [image, text] sequence, cached whole. "
            "Its pipeline batches cond and uncond; CFG truncation halves the batch mid-run, "
            "which restarts HyCa's warm-up"
        ),
    ),
    "HiDreamImageTransformer2DModel": Family(
        name="HiDream-I1",
        block_lists=(
            BlockList("double_stream_blocks", IMAGE_TEXT),
            BlockList("single_stream_blocks", CONCAT_HEAD),
        ),
        timestep_arg="timesteps",
        batched_guidance="uncond-first",
        head='final_layer.linear',
        notes=(
            "double blocks (MoE feed-forward) return (image, text) and get a fresh Llama layer "
            "appended to the text each block; the forward concatenates [image, text] for the "
            "single blocks, which return one tensor whose leading image tokens reach the output"
        ),
    ),
    "CogView4Transformer2DModel": Family(
        name="CogView4",
        block_lists=(BlockList("transformer_blocks", IMAGE_TEXT),),
        notes="dual-stream blocks called positionally, returning (image, text)",
    ),
    "SanaTransformer2DModel": Family(
        name="Sana",
        block_lists=(BlockList("transformer_blocks", IMAGE_ONLY),),
        batched_guidance="uncond-first",
        notes="linear-attention blocks with cross-attention, returning the image stream alone",
    ),
    "SanaVideoTransformer3DModel": Family(
        name="Sana-Video",
        block_lists=(BlockList("transformer_blocks", IMAGE_ONLY),),
        batched_guidance="uncond-first",
        notes=(
            "Sana's linear-attention blocks over video tokens, returning the video stream alone. "
            "ControlNet samples, when given, are added after blocks outside them, like Wan VACE's "
            "hints: exact every step and in no cached residual"
        ),
    ),
}


#: Transformer classes diffusers 0.42 ships for the families above that HyCa refuses, with
#: the reason (read from each class's ``forward`` in diffusers 0.42.1). ``hyca.enable`` quotes
#: it; docs/families.md lists the same.
REFUSED: dict[str, str] = {
    "Flux3Transformer2DModel": (
        "FLUX.3 runs text, image and image-condition tokens through separate per-mode block "
        "lists before joint single blocks; which residual reaches the output is not mapped"),
    "QwenImage21Transformer2DModel": (
        "Qwen-Image 2.1 runs one joint sequence through its blocks and its pipeline keeps a "
        "prefix key/value cache per block ('extract' / 'cached' passes); a passed-through block "
        "would leave its part of the cache unfilled, and which tokens reach the output is not mapped"),
    "HunyuanVideoFramepackTransformer3DModel": (
        "FramePack prepends clean and 2x/4x-compressed history latents to the image stream, a "
        "different number per video section, and only the stream's tail reaches the output; its "
        "pipeline (SigLIP image encoder, one denoising loop per section) has no tiny test"),
    "WanAnimateTransformer3DModel": (
        "Wan-Animate adds a face adapter's output after every few blocks, computed from the "
        "stream between blocks; a skip step does not compute that stream, so the adapter would "
        "read a wrong input"),
    "WanAnimate2Transformer3DModel": (
        "Wan-Animate 2's blocks fill a per-block key/value cache in a reference pass that the "
        "generation pass reads; a passed-through block would leave its cache unfilled"),
    "SanaWMTransformer3DModel": (
        "Sana-WM, a world model with its own block design and frame-chunked rollout; not mapped"),
    "SanaWMLTX2RefinerTransformer3DModel": (
        "Sana-WM's refiner (LTX-2 blocks with a key/value cache carried across chunks); not mapped"),
    "LuminaNextDiT2DModel": "Lumina-Next, the generation before Lumina2, has other blocks; not mapped",
    "CogView3PlusTransformer2DModel": "CogView3-Plus, the generation before CogView4, has other blocks; not mapped",
}


def family_of(transformer: torch.nn.Module) -> Family:
    """The table entry for ``transformer``'s class.

    Raises:
        TypeError: the class is refused (the message gives :data:`REFUSED`'s reason) or
            unknown; either way the message lists the supported classes.
    """
    name = type(transformer).__name__
    if name not in FAMILIES:
        supported = ", ".join(sorted(FAMILIES))
        why = f" ({REFUSED[name]})" if name in REFUSED else ""
        raise TypeError(f"HyCa does not support {name} yet{why}; supported transformers: {supported}")
    return FAMILIES[name]


def blocks_of(transformer: torch.nn.Module, family: Family) -> list[tuple[BlockList, torch.nn.Module]]:
    """Every block in execution order, with the description of its list."""
    return [(spec, block) for spec in family.block_lists for block in getattr(transformer, spec.attribute)]


def head_of(transformer: torch.nn.Module, family: Family) -> torch.nn.Linear | None:
    """The family's output head on this transformer (see :attr:`Family.head`), or None."""
    if family.head is None:
        return None
    module = transformer
    for part in family.head.split("."):
        module = getattr(module, part, None)
    return module if isinstance(module, torch.nn.Linear) else None


def hidden_size(transformer: torch.nn.Module) -> int:
    config = transformer.config
    if "num_attention_heads" in config and "attention_head_dim" in config:
        return config.num_attention_heads * config.attention_head_dim
    return config["hidden_size"] if "hidden_size" in config else config["dim"]
