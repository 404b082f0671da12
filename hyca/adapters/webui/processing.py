"""What the extension reads from a WebUI generation's processing object ``p``: the
diffusion model (and Forge's unet patcher), the sigmas a pass walks, the LoRA set it runs
with. Each reader names the frontend source it follows."""

from __future__ import annotations

import ast
import hashlib
import logging
from pathlib import PurePath
from typing import Any

import torch

logger = logging.getLogger("hyca.webui")


def diffusion_model_of(p: Any) -> tuple[str, Any, torch.nn.Module | None]:
    """``("forge", unet patcher, model)`` or ``("a1111", None, model)``."""
    sd_model = getattr(p, "sd_model", None)
    forge_objects = getattr(sd_model, "forge_objects", None)
    if forge_objects is not None:
        unet = forge_objects.unet
        return "forge", unet, getattr(getattr(unet, "model", None), "diffusion_model", None)
    return "a1111", None, getattr(getattr(sd_model, "model", None), "diffusion_model", None)


def pass_sigmas(p: Any, hires: bool) -> list[float] | None:
    """The sigmas this pass walks: the full schedule, cut where img2img (denoising
    strength) or the hires pass starts. ``None`` when the frontend does not tell."""
    try:
        if hires:
            steps, img2img = int(getattr(p, "hr_second_pass_steps", 0) or p.steps), True
        else:
            steps, img2img = int(p.steps), getattr(p, "init_images", None) is not None
        if not img2img:
            return [float(s) for s in p.sampler.get_sigmas(p, steps)]
        from modules import sd_samplers_common

        total, t_enc = sd_samplers_common.setup_img2img_steps(p, steps if hires else None)
        sigmas = p.sampler.get_sigmas(p, total)
        return [float(s) for s in sigmas[total - t_enc - 1:]]
    except Exception as error:  # noqa: BLE001 - steps are then told apart by sigma alone
        logger.info("HyCa: could not read the sigma schedule (%s); counting steps by sigma", error)
        return None


def pass_steps(p: Any, hires: bool) -> int:
    """The pass's step count: its sigmas' when the frontend tells them, else the settings'."""
    sigmas = pass_sigmas(p, hires)
    return len(sigmas) - 1 if sigmas else int(getattr(p, "hr_second_pass_steps", 0) or p.steps if hires else p.steps)


#: Forge / Forge Neo ``current_lora_hash`` with no LoRA loaded: ``str([])``
#: (``backend/diffusion_engine/base.py``; ``extensions-builtin/sd_forge_lora/networks.py``
#: sets ``str(compiled_lora_targets)``, ``"[]"`` again when the LoRA set is empty).
NO_LORA_HASH = str([])


def lora_identity(p: Any) -> str:
    """Which LoRA set the pass runs with; ``""`` for none (the base profile).

    Forge / Forge Neo: ``p.sd_model.current_lora_hash`` (``"[]"`` means none). A1111 has no
    such attribute: its built-in Lora extension's ``networks.loaded_networks`` (filled by
    ``extra_networks.activate`` before ``process_batch``) names the set, keyed as A1111
    itself keys applied weights: ``(name, te_multiplier, unet_multiplier, dyn_dim)`` per
    network (``network_apply_weights``)."""
    sd_model = getattr(p, "sd_model", None)
    if getattr(sd_model, "forge_objects", None) is not None:
        value = str(getattr(sd_model, "current_lora_hash", "") or "")
        return "" if value.strip() in ("", NO_LORA_HASH) else value
    import sys

    networks = sys.modules.get("networks")
    loaded = getattr(networks, "loaded_networks", None) or []
    names = tuple((str(getattr(n, "name", n)), getattr(n, "te_multiplier", 1.0), getattr(n, "unet_multiplier", 1.0),
                   getattr(n, "dyn_dim", None)) for n in loaded)
    return repr(names) if names else ""


def lora_label(key: str) -> str:
    """A LoRA set's key (:func:`lora_identity`) in a user's words: the names of its files or
    networks (Forge: ``str([['/models/Lora/a.safetensors', 1.0, 1.0, ...]])``; A1111:
    ``repr((('a', 1.0, 1.0, None),))``), with an 8-digit hash of the whole key, which tells
    apart sets of the same files at other weights; the hash alone for a key read otherwise."""
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:8]
    try:
        entries = ast.literal_eval(key)
        names = [PurePath(str(entry[0]).replace("\\", "/")).stem for entry in entries]
    except (ValueError, SyntaxError, TypeError, IndexError, MemoryError, RecursionError):
        return digest
    return f"{', '.join(dict.fromkeys(n for n in names if n))} ({digest})" if any(names) else digest
