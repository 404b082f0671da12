"""What a diffusers pipeline call runs at: its guidance scale and its scheduler's shift."""

from __future__ import annotations

import inspect
from typing import Any


def guidance_name(pipe: Any) -> str | None:
    """The call argument that sets ``pipe``'s classifier-free guidance scale (see :func:`guidance_of`):
    ``true_cfg_scale`` where the pipeline has it; ``guidance_scale`` only where the pipeline
    class says it is classifier-free guidance (a ``do_classifier_free_guidance`` property, as
    SD3's, Wan's, Chroma's, ... have). Elsewhere ``guidance_scale`` is distilled guidance, a
    model input with one call per step (FLUX.2's ``Flux2Pipeline``), and there is no CFG scale."""
    parameters = inspect.signature(type(pipe).__call__).parameters
    if "true_cfg_scale" in parameters:
        return "true_cfg_scale"
    if "guidance_scale" in parameters and hasattr(type(pipe), "do_classifier_free_guidance"):
        return "guidance_scale"
    return None


def guidance_of(pipe: Any, call: dict[str, Any]) -> float | None:
    """The classifier-free guidance scale a call of ``pipe`` with arguments ``call`` runs at:
    ``true_cfg_scale`` where the pipeline has it (FLUX, Qwen-Image, HunyuanVideo: their
    ``guidance_scale`` is distilled guidance, an input of the model), else ``guidance_scale``;
    the pipeline's default when the call does not set it. 1.0 where ``guidance_scale`` is only
    distilled guidance (:func:`guidance_name`); a pipeline that guides through a ``guider``
    component (``diffusers.guiders``, e.g. HunyuanVideo 1.5) runs at the guider's
    ``guidance_scale`` when it adds an unconditional pass (``num_conditions`` > 1). None when
    none of these tells.
    Diffusers pipelines guide only above 1 (``do_classifier_free_guidance``: scale > 1), so
    any scale up to 1 is 1.0, no guidance; and true CFG runs only with a negative prompt
    (``negative_prompt`` or ``negative_prompt_embeds``: ``has_neg_prompt`` in FLUX's,
    Qwen-Image's and HunyuanVideo's ``__call__``), so without one it is 1.0 too."""
    name = guidance_name(pipe)
    parameters = inspect.signature(type(pipe).__call__).parameters
    if name is None:
        guider = getattr(pipe, "guider", None)  # diffusers' guider component (HunyuanVideo 1.5)
        if guider is not None and isinstance(getattr(guider, "guidance_scale", None), (int, float)):
            return max(float(guider.guidance_scale), 1.0) if guider.num_conditions > 1 else 1.0
        return 1.0 if "guidance_scale" in parameters else None  # distilled guidance only (FLUX.2): no CFG
    value = call.get(name, parameters[name].default)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    negative = [n for n in ("negative_prompt", "negative_prompt_embeds") if n in parameters]
    if name == "true_cfg_scale" and negative and all(call.get(n) is None for n in negative):
        return 1.0
    return max(float(value), 1.0)


def schedule_shift(scheduler: Any) -> float | None:
    """A flow-matching scheduler's fixed sigma shift; None when unknown or resolution-dependent
    (``use_dynamic_shifting``: FLUX's shift follows the image size)."""
    config = getattr(scheduler, "config", None)
    if config is None or config.get("use_dynamic_shifting") or config.get("shift") is None:
        return None
    return float(config["shift"])


def guidance_argument(pipe: Any, scale: float) -> dict[str, Any]:
    """The call arguments that run ``pipe`` at classifier-free guidance ``scale``:
    ``true_cfg_scale`` (with an empty ``negative_prompt``, which FLUX needs for true CFG)
    or ``guidance_scale``; nothing when the pipeline has neither."""
    name = guidance_name(pipe)
    if name is None:
        return {}
    out: dict[str, Any] = {name: float(scale)}
    if name == "true_cfg_scale" and scale > 1 and "negative_prompt" in inspect.signature(type(pipe).__call__).parameters:
        out["negative_prompt"] = ""
    return out
