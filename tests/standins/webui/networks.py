"""Stand-in of A1111's ``extensions-builtin/Lora/networks.py`` (AUTOMATIC1111/stable-diffusion-webui
v1.10.1, 82a973c04367123ae98bd9abdf80d9eda9b910e2), imported by the WebUI as ``networks``
(the extension's folder is on ``sys.path``): the module-level ``loaded_networks`` list that
``load_networks(names, te_multipliers, unet_multipliers, dyn_dims)`` clears and refills on
every ``extra_networks.activate`` (before ``process_batch``), holding ``network.Network``
objects with ``name``, ``te_multiplier``, ``unet_multiplier`` and ``dyn_dim``."""

from __future__ import annotations

loaded_networks: list = []


class Network:  # network.Network, reduced to what load_networks sets
    def __init__(self, name: str, te_multiplier: float = 1.0, unet_multiplier: float = 1.0, dyn_dim=None):
        self.name, self.te_multiplier, self.unet_multiplier, self.dyn_dim = name, te_multiplier, unet_multiplier, dyn_dim


def load_networks(names, te_multipliers=None, unet_multipliers=None, dyn_dims=None):
    loaded_networks.clear()
    for i, name in enumerate(names):
        loaded_networks.append(Network(name, te_multipliers[i] if te_multipliers else 1.0,
                                       unet_multipliers[i] if unet_multipliers else 1.0,
                                       dyn_dims[i] if dyn_dims else None))
