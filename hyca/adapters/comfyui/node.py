"""The "HyCa" ComfyUI node (V3 schema, ``comfy_api.latest``): MODEL in, MODEL out, plus a
STRING saying how HyCa was set up on it. The node only clones and patches the model
(:meth:`~.hook.HyCaPatch.install`); what each sampling run did is printed on the console
when the run ends (computed / forecast steps, guard switches, notes).

:func:`apply_hyca` is the node's work without ComfyUI's node machinery (tests call it);
:func:`comfy_entrypoint` is what ComfyUI's loader calls (``nodes.py``
``load_custom_node``: a module with ``comfy_entrypoint`` and no ``NODE_CLASS_MAPPINGS``).
"""

from __future__ import annotations

import os
from typing import Any

from ..webui.profiles import AUTOMATIC, UNIFORM, local_profiles
from ..webui.settings import CACHE_DTYPES, Settings
from .families import REFUSED, recognise, supported
from .hook import HyCaPatch, already_applied, console

CATEGORY = "HyCa"
#: ComfyUI models folder for profiles (``models/hyca``), searched like ``$HYCA_PROFILES``.
MODELS_FOLDER = "hyca"


def apply_hyca(model: Any, settings: Settings) -> tuple[Any, str]:
    """``(patched clone, what was set up)``; an unsupported family gives the model back
    unchanged and says why (console and text). ``model``: a ComfyUI ``ModelPatcher``.
    A model that already has HyCa (two nodes in a row) is given back unchanged, said the
    same way. Raises ``ValueError`` for settings out of range."""
    settings = Settings.from_args(settings.args())  # the same validation as the WebUI's arguments
    diffusion_model = getattr(getattr(model, "model", None), "diffusion_model", None)
    name = type(diffusion_model).__name__
    adapter = recognise(diffusion_model)
    if adapter is None:
        why = REFUSED.get(name, f"{name} is not a model family HyCa knows")
        text = f"HyCa is off: {why}. Supported: {', '.join(supported())}."
        console(text)
        return model, text
    if already_applied(model):  # a second node would patch HyCa's own patches: the first node's settings stay
        text = ("HyCa is off on this node: the model already has HyCa from an earlier HyCa node, whose settings "
                "apply. Remove one of the two nodes.")
        console(text)
        return model, text
    patch = HyCaPatch(settings, adapter)
    patched = patch.install(model)
    counts = ", ".join(f"{len(getattr(diffusion_model, b.attribute))} {b.dit_key}s" for b in adapter.block_lists)
    n = f"target {settings.speedup:g}x (N chosen per run)" if settings.speedup else f"N={settings.interval}"
    text = (f"HyCa on {adapter.name}: replace patches on {counts}; {n}, warm-up {settings.warmup}, "
            f"last step {'computed (unless the profile forecasts it)' if settings.compute_last else 'as scheduled'}, "
            f"profile {settings.profile}"
            f"{' (' + settings.hub_repo + ')' if settings.hub_repo else ''}, guard {'on' if settings.guard else 'off'}, "
            f"LoRA reuse {'on' if settings.lora_reuse else 'off'}, cache {settings.cache_dtype}. "
            "Each sampling run's computed / forecast steps are printed on the console.")
    console(text)
    return patched, text


def register_models_folder() -> None:
    """``models/hyca`` as a ComfyUI model folder, and its paths searched for profiles
    (``$HYCA_PROFILES``, read by :mod:`hyca.profiles.sources`). Only inside ComfyUI."""
    try:
        import folder_paths
    except ImportError:
        return
    folder = os.path.join(folder_paths.models_dir, MODELS_FOLDER)
    if MODELS_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[MODELS_FOLDER] = ([folder], {".safetensors"})
    paths = [p for p in os.environ.get("HYCA_PROFILES", "").split(os.pathsep) if p]
    for path in folder_paths.folder_names_and_paths[MODELS_FOLDER][0]:
        if path not in paths and os.path.isdir(path):  # (a fresh ComfyUI has no models/hyca: nothing to say)
            paths.append(path)
    os.environ["HYCA_PROFILES"] = os.pathsep.join(paths)


def profile_choices() -> list[str]:
    """The node's profile menu: automatic, the one-solver methods, and the profile files made
    for a model class ComfyUI's adapters serve (not the diffusers profiles shipped beside them)."""
    from .families import FAMILIES

    return [AUTOMATIC, *UNIFORM, *local_profiles({c for a in FAMILIES for c in a.classes})]


def build_node() -> tuple[type, type]:
    """The V3 node class and its extension (imports ``comfy_api``: only inside ComfyUI)."""
    from comfy_api.latest import ComfyExtension, io

    class HyCaNode(io.ComfyNode):
        @classmethod
        def define_schema(cls) -> io.Schema:
            return io.Schema(
                node_id="HyCa", display_name="HyCa (hybrid feature caching)", category=CATEGORY,
                description="Skips transformer blocks on most sampling steps and forecasts their output from "
                            "the steps that ran (training-free, per-block solvers).",
                inputs=[
                    io.Model.Input("model", tooltip="A diffusion-transformer model (FLUX, Chroma, SD3, Qwen-Image, "
                                                    "Wan, HunyuanVideo)."),
                    io.Int.Input("interval", default=5, min=1, max=20, tooltip="N: one step in every N runs the "
                                 "transformer blocks, the others are forecast (1 = every step, caching off)."),
                    io.Int.Input("warmup", default=3, min=1, max=20, tooltip="Steps computed in full at the start, "
                                 "before any forecast."),
                    io.Combo.Input("profile", options=profile_choices(), default=AUTOMATIC,
                                   tooltip="Which solver each block uses: automatic (a profile for this model from "
                                           "models/hyca, the cache or the Hub, else probed on the first run), a "
                                           "uniform solver, or a profile file."),
                    io.String.Input("hub_repo", default="", tooltip="Hugging Face Hub repo to look profiles up in "
                                    "(empty: the default)."),
                    io.Boolean.Input("guard", default=True, tooltip="Check each computed step against the forecast "
                                     "and fall back to a lower-order solver where it did better."),
                    io.Float.Input("target_speedup", default=0.0, min=0.0, max=20.0, step=0.25,
                                   tooltip="0: use N. Otherwise N is chosen per run for this many times fewer block "
                                           "passes."),
                    io.Boolean.Input("lora_reuse", default=True, tooltip="Use the base model's profile with LoRAs "
                                     "(off: a LoRA set is probed for its own profile)."),
                    io.Combo.Input("cache_precision", options=list(CACHE_DTYPES), default="model",
                                   tooltip="Precision of the kept residual history (model: the blocks' own dtype)."),
                    io.Boolean.Input("compute_last", default=True, tooltip="Compute the final step (a profile chosen on TaylorSeer lite's schedule forecasts "
                                     "it; the console then says so)."),
                ],
                outputs=[io.Model.Output(tooltip="The model with HyCa."),
                         io.String.Output(display_name="setup", tooltip="How HyCa was set up on this model.")],
            )

        @classmethod
        def execute(cls, model: Any, interval: int, warmup: int, profile: str, hub_repo: str, guard: bool,
                    target_speedup: float, lora_reuse: bool, cache_precision: str, compute_last: bool) -> Any:
            settings = Settings(enabled=True, interval=interval, warmup=warmup, compute_last=compute_last,
                                profile=profile, hub_repo=hub_repo, lora_reuse=lora_reuse,
                                cache_dtype=cache_precision, guard=guard, speedup=target_speedup)
            patched, text = apply_hyca(model, settings)
            return io.NodeOutput(patched, text)

    class HyCaExtension(ComfyExtension):
        async def get_node_list(self) -> list[type[io.ComfyNode]]:
            return [HyCaNode]

    return HyCaNode, HyCaExtension


def comfy_entrypoint() -> Any:
    """ComfyUI's V3 entry point: the extension listing the HyCa node."""
    register_models_folder()
    _, extension = build_node()
    return extension()
