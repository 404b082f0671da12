"""HyCa for Stable Diffusion WebUI (A1111), Forge and Forge Neo: an always-visible script.

The extension root is this repository, so ``import hyca`` works once the root is on
``sys.path`` (WebUIs put extension roots there; the insert below covers those that do
not). Everything model-specific lives in ``hyca.adapters.webui``; this file is the UI and
the generation lifetime:

* ``process``: drop anything a crashed generation left, write the settings to infotext;
* ``process_before_every_sampling`` (Forge / Neo) or ``process_batch`` / ``before_hr``
  (A1111): set up HyCa for the sampling pass about to run;
* ``post_sample`` / ``postprocess_batch``: console summary and the result infotext keys;
* ``postprocess``: remove every hook, whatever happened during sampling.
"""

from __future__ import annotations

import dataclasses
import os
import sys

EXTENSION_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if EXTENSION_ROOT not in sys.path:
    sys.path.insert(0, EXTENSION_ROOT)

import gradio as gr  # noqa: E402
from modules import script_callbacks, scripts  # noqa: E402

try:  # a broken environment (e.g. a diffusers too old for hyca's core) hides HyCa, never the UI
    from hyca.adapters.webui import profiles
    from hyca.adapters.webui.controller import CONTROLLER, console
    from hyca.adapters.webui.settings import CACHE_DTYPES, Settings, paste_keys
    LOAD_ERROR = None
except Exception as error:  # noqa: BLE001
    LOAD_ERROR = error
    print(f"[HyCa] not loaded ({type(error).__name__}: {error}); the WebUI runs without it. "
          "See the extension's install notes (docs/webui.md).")

try:
    from modules.ui_components import InputAccordion
except ImportError:  # very old A1111: no InputAccordion
    InputAccordion = None
try:
    from modules.infotext_utils import PasteField
except ImportError:  # A1111 < 1.8 used plain tuples
    def PasteField(component, target, *, api=None):  # noqa: N802 - mirrors the class name
        return (component, target)

TITLE = "HyCa"
#: Argument order of ui() = the API's alwayson_scripts["hyca"]["args"] order.
ARGUMENTS = tuple(f.name for f in dataclasses.fields(Settings)) if LOAD_ERROR is None else ()
#: Settings the XYZ grid may override for one cell, read from ``p.hyca_xyz``.
XYZ_ATTRIBUTE = "hyca_xyz"


def element_id(tab: str, name: str) -> str:
    return f"hyca_{tab}_{name}"


class HyCaScript(scripts.Script):
    sorting_priority = 15

    def title(self):
        return TITLE

    def show(self, is_img2img):
        return scripts.AlwaysVisible if LOAD_ERROR is None else False

    def ui(self, is_img2img):
        tab = "img2img" if is_img2img else "txt2img"
        defaults = Settings()
        label = "HyCa: hybrid feature caching"
        if InputAccordion is not None:
            accordion = InputAccordion(defaults.enabled, label=label, elem_id=element_id(tab, "enabled"))
        else:
            accordion = gr.Accordion(label, open=False, elem_id=element_id(tab, "accordion"))
        with accordion:
            enabled = accordion if InputAccordion is not None else gr.Checkbox(
                defaults.enabled, label="Enable", elem_id=element_id(tab, "enabled"))
            with gr.Row():
                interval = gr.Slider(1, 12, value=defaults.interval, step=1, label="N (one computed step in N)",
                                     elem_id=element_id(tab, "interval"))
                warmup = gr.Slider(1, 12, value=defaults.warmup, step=1, label="Warm-up steps",
                                   elem_id=element_id(tab, "warmup"))
            with gr.Row():
                compute_last = gr.Checkbox(defaults.compute_last, label="Compute the last step",
                                           elem_id=element_id(tab, "compute_last"))
                hires = gr.Checkbox(defaults.hires, label="Also on the hires pass", elem_id=element_id(tab, "hires"))
                lora_reuse = gr.Checkbox(defaults.lora_reuse, label="Base profile serves every LoRA",
                                         elem_id=element_id(tab, "lora_reuse"))
                guard = gr.Checkbox(defaults.guard, label="Guard: demote solvers that forecast worse than reuse",
                                    elem_id=element_id(tab, "guard"))
            with gr.Row():
                profile = gr.Dropdown(profiles.choices(), value=defaults.profile, label="Profile",
                                      allow_custom_value=True, elem_id=element_id(tab, "profile"))
                hub_repo = gr.Textbox(defaults.hub_repo, label="Hub repo id (optional)", placeholder="user/repo",
                                      elem_id=element_id(tab, "hub_repo"))
                cache_dtype = gr.Dropdown(list(CACHE_DTYPES), value=defaults.cache_dtype, label="Cache precision",
                                          elem_id=element_id(tab, "cache_dtype"))
                speedup = gr.Slider(0, 8, value=defaults.speedup, step=0.5,
                                    label="Target speed-up (0 = use N as set)", elem_id=element_id(tab, "speedup"))
        components = dict(enabled=enabled, interval=interval, warmup=warmup, compute_last=compute_last,
                          hires=hires, profile=profile, hub_repo=hub_repo, lora_reuse=lora_reuse,
                          cache_dtype=cache_dtype, guard=guard, speedup=speedup)
        # Named and callable targets (settings.PasteKey): "Send to txt2img/img2img" matches
        # fields by name, pasting an infotext calls them; both restore HyCa's settings.
        self.infotext_fields = [PasteField(components[name], key) for name, key in paste_keys()]
        self.paste_field_names = [str(key) for _, key in paste_keys()]
        return [components[name] for name in ARGUMENTS]

    # --- generation lifetime ----------------------------------------------------------

    def _settings(self, p, args) -> Settings:
        try:
            settings = Settings.from_args(args)
            overrides = getattr(p, XYZ_ATTRIBUTE, None) or {}
            return dataclasses.replace(settings, **overrides) if overrides else settings
        except Exception as error:  # noqa: BLE001 - bad arguments turn HyCa off, with the reason
            CONTROLLER.say_once(f"ignoring HyCa's arguments ({error}); generations with them run uncached")
            return Settings(enabled=False)

    def process(self, p, *args):
        CONTROLLER.reset()  # whatever an earlier generation left (OOM skips postprocess)
        settings = self._settings(p, args)
        if settings.enabled:
            p.extra_generation_params.update(settings.infotext())

    def process_batch(self, p, *args, **kwargs):
        if getattr(getattr(p, "sd_model", None), "forge_objects", None) is None:  # A1111
            CONTROLLER.start_pass(p, self._settings(p, args))

    def before_hr(self, p, *args):
        if getattr(getattr(p, "sd_model", None), "forge_objects", None) is None:  # A1111
            CONTROLLER.start_pass(p, self._settings(p, args), hires=True)

    def process_before_every_sampling(self, p, *args, **kwargs):
        CONTROLLER.start_pass(p, self._settings(p, args))

    def post_sample(self, p, ps, *args):
        self._report(p)

    def postprocess_batch(self, p, *args, **kwargs):
        self._report(p)

    def postprocess(self, p, processed, *args):
        CONTROLLER.finish_pass()
        CONTROLLER.reset()

    def _report(self, p) -> None:
        CONTROLLER.finish_pass()
        p.extra_generation_params.update(CONTROLLER.results())
        CONTROLLER.report()


# --- callbacks -------------------------------------------------------------------------

def _note_sigma(params) -> None:
    """A1111: the sampler's sigma for the model calls that follow."""
    if CONTROLLER.session is not None:
        try:
            CONTROLLER.noted_sigma = float(params.sigma.flatten()[0])
        except Exception:  # noqa: BLE001 - the call then uses its own timestep
            CONTROLLER.noted_sigma = None


def _xyz_module():
    for data in scripts.scripts_data:
        if os.path.basename(str(getattr(data, "path", ""))) == "xyz_grid.py" and hasattr(data, "module"):
            return data.module
    return None


def _xyz_setter(name: str, convert):
    def apply(p, value, values):
        overrides = getattr(p, XYZ_ATTRIBUTE, None) or {}
        overrides[name] = convert(value)
        setattr(p, XYZ_ATTRIBUTE, overrides)

    return apply


def add_xyz_axes() -> bool:
    """Add the N, warm-up and on/off axes to the XYZ grid script; ``False`` when absent."""
    xyz = _xyz_module()
    if xyz is None:
        return False
    if any(str(getattr(o, "label", "")).startswith("[HyCa]") for o in xyz.axis_options):
        return True
    xyz.axis_options.extend([
        xyz.AxisOption("[HyCa] N", int, _xyz_setter("interval", int)),
        xyz.AxisOption("[HyCa] Warm-up steps", int, _xyz_setter("warmup", int)),
        xyz.AxisOption("[HyCa] On/off", str, _xyz_setter("enabled", lambda v: str(v).strip().lower() == "on"),
                       choices=lambda: ["on", "off"]),
    ])
    return True


def _before_ui() -> None:
    try:
        add_xyz_axes()
    except Exception as error:  # noqa: BLE001 - the grid is optional
        console(f"could not add XYZ-grid axes ({error})")


if LOAD_ERROR is None:
    script_callbacks.on_cfg_denoiser(_note_sigma)
    script_callbacks.on_before_ui(_before_ui)
    script_callbacks.on_script_unloaded(CONTROLLER.reset)
