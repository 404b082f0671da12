"""The Forge / Forge Neo sampling runtime the stand-ins share (helper of the stand-ins):
``UnetPatcher`` (``backend/patcher/unet.py``), ``KModel`` (``backend/modules/k_model.py``)
and ``calc_cond_uncond_batch`` / ``sampling_function``
(``backend/sampling/sampling_function.py``) of Forge dfdcbab and Forge Neo (vendored tree
5692d2d), reduced to the parts an extension touches (upstream lines in
tests/standins/CONFORMANCE.md):

* ``clone()`` copies ``model_options`` deeply (functions by reference), as the real one does;
* ``set_model_unet_function_wrapper(fn)`` fills the single ``model_function_wrapper`` slot;
* ``set_model_patch_replace(patch, name, block_name, number)`` writes
  ``model_options["transformer_options"]["patches_replace"][name][(block_name, number)]``;
* a sampling call builds ``transformer_options`` with ``cond_or_uncond`` (0 = cond,
  1 = uncond) and ``sigmas``, then calls
  ``wrapper(model.apply_model, {"input", "timestep", "c", "cond_or_uncond"})`` or
  ``model.apply_model(input, timestep, **c)``; cond and uncond go in one batch, or in
  separate calls when memory is short (``split=True``);
* ``KModel.apply_model`` turns sigma into the model's timestep and the flow-matching output
  into the denoised latent (``x - sigma * v``).
"""

from __future__ import annotations

import copy

import torch


class KModel(torch.nn.Module):
    def __init__(self, diffusion_model: torch.nn.Module, timestep_multiplier: float = 1.0):
        super().__init__()
        self.diffusion_model = diffusion_model
        self.timestep_multiplier = timestep_multiplier

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):  # noqa: B006
        sigma = t
        timestep = sigma * self.timestep_multiplier
        out = self.diffusion_model(x, timestep, context=c_crossattn, control=control,
                                   transformer_options=transformer_options, **kwargs).float()
        shape = (-1,) + (1,) * (x.ndim - 1)
        return x - out * sigma.reshape(shape)


class UnetPatcher:
    def __init__(self, model: KModel):
        self.model = model
        self.model_options = {"transformer_options": {}}

    def clone(self) -> "UnetPatcher":
        n = UnetPatcher.__new__(UnetPatcher)
        n.model = self.model
        n.model_options = copy.deepcopy(self.model_options)
        return n

    def set_model_unet_function_wrapper(self, unet_wrapper_function) -> None:
        self.model_options["model_function_wrapper"] = unet_wrapper_function

    def set_model_patch_replace(self, patch, name, block_name, number, transformer_index=None) -> None:
        to = self.model_options["transformer_options"]
        to.setdefault("patches_replace", {}).setdefault(name, {})
        key = (block_name, number, transformer_index) if transformer_index is not None else (block_name, number)
        to["patches_replace"][name][key] = patch


def calc_cond_uncond_batch(model: UnetPatcher, cond: dict, uncond: dict | None, x_in, timestep, model_options: dict,
                           split: bool = False):
    entries = [(cond, 0)] + ([(uncond, 1)] if uncond is not None else [])
    groups = [[e] for e in entries] if split else [entries]
    outputs: dict[int, torch.Tensor] = {}
    for group in groups:
        cond_or_uncond = [which for _, which in group]
        input_x = torch.cat([x_in] * len(group))
        c = {k: torch.cat([entry[k] for entry, _ in group]) for k in group[0][0]}
        transformer_options = copy.copy(model_options.get("transformer_options", {}))
        transformer_options["cond_or_uncond"] = cond_or_uncond[:]
        transformer_options["sigmas"] = timestep
        c["transformer_options"] = transformer_options
        timestep_ = torch.cat([timestep] * len(group))
        if "model_function_wrapper" in model_options:
            output = model_options["model_function_wrapper"](
                model.model.apply_model, {"input": input_x, "timestep": timestep_, "c": c, "cond_or_uncond": cond_or_uncond})
        else:
            output = model.model.apply_model(input_x, timestep_, **c)
        for which, chunk in zip(cond_or_uncond, output.chunk(len(group))):
            outputs[which] = chunk
    return outputs[0], outputs.get(1)


def sampling_function(model: UnetPatcher, x, timestep, uncond, cond, cond_scale, model_options={}, seed=None,  # noqa: B006
                      split: bool = False):
    if uncond is None or cond_scale == 1.0:
        return calc_cond_uncond_batch(model, cond, None, x, timestep, model_options, split)[0]
    cond_pred, uncond_pred = calc_cond_uncond_batch(model, cond, uncond, x, timestep, model_options, split)
    return uncond_pred + (cond_pred - uncond_pred) * cond_scale
