"""Stand-in of ``modules/script_callbacks.py`` (AUTOMATIC1111 v1.10.1 82a973c, also in Forge dfdcbab): the
callbacks an extension registers (``on_cfg_denoiser``, ``on_before_ui``,
``on_script_unloaded``, ``on_model_loaded``) and ``CFGDenoiserParams``."""

from __future__ import annotations

from collections import defaultdict

callback_map: dict[str, list] = defaultdict(list)


class CFGDenoiserParams:
    def __init__(self, x, image_cond, sigma, sampling_step, total_sampling_steps, text_cond, text_uncond, denoiser=None):
        self.x, self.image_cond, self.sigma = x, image_cond, sigma
        self.sampling_step, self.total_sampling_steps = sampling_step, total_sampling_steps
        self.text_cond, self.text_uncond, self.denoiser = text_cond, text_uncond, denoiser


def _add(kind, callback, name=None):
    callback_map[kind].append(callback)


def on_cfg_denoiser(callback, *, name=None):
    _add("cfg_denoiser", callback, name)


def on_before_ui(callback, *, name=None):
    _add("before_ui", callback, name)


def on_script_unloaded(callback, *, name=None):
    _add("script_unloaded", callback, name)


def on_model_loaded(callback, *, name=None):
    _add("model_loaded", callback, name)


def on_infotext_pasted(callback, *, name=None):
    _add("infotext_pasted", callback, name)


def infotext_pasted_callback(infotext, params):
    for c in callback_map["infotext_pasted"]:
        c(infotext, params)


def cfg_denoiser_callback(params):
    for c in callback_map["cfg_denoiser"]:
        c(params)


def before_ui_callback():
    for c in callback_map["before_ui"]:
        c()


def script_unloaded_callback():
    for c in callback_map["script_unloaded"]:
        c()
