"""What one frontend hook point looks like: the model class, its block lists in the order
they run (each with its :class:`~hyca.layouts.Layout`), and whether the frontend offers
``patches_replace["dit"]`` keys for them. Every WebUI hook point is one :class:`Adapter`
row of ``registry.ADAPTERS`` (ComfyUI's are rows of ``comfyui.families.FAMILIES``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ...layouts import BlockList


@dataclass(frozen=True)
class Adapter:
    name: str                             # shown in the console, e.g. "Forge FLUX"
    frontend: str                         # "forge", "neo" or "a1111"
    classes: tuple[str, ...]              # class names of the diffusion model
    block_lists: tuple[BlockList, ...]
    style: str                            # "gate" (kinds.GATES wrap block forwards) or "replace" (kinds.PATCHES)
    requires: tuple[str, ...] = ()        # methods the model must have (duck-typed version check)
    refuses: tuple[str, ...] = ()         # methods whose presence means another variant
    dim: Callable[[torch.nn.Module], int] | None = None
    #: The output head, a dotted attribute path from the diffusion model: the final linear
    #: map whose input is the last hidden state after the final norm and modulation, the
    #: module diffusers' families table names (``proj_out``; ``hyca.adapters.diffusers.families``),
    #: so a profile with ``target="output"`` forecasts the same tensor on both hosts. None:
    #: output-head profiles are not offered for this model.
    head: str | None = None

    def matches(self, model: torch.nn.Module) -> bool:
        return (type(model).__name__ in self.classes
                and all(isinstance(getattr(model, b.attribute, None), torch.nn.ModuleList) for b in self.block_lists)
                and all(callable(getattr(model, m, None)) for m in self.requires)
                and not any(callable(getattr(model, m, None)) for m in self.refuses))

    def blocks(self, model: torch.nn.Module) -> list[tuple[BlockList, int, torch.nn.Module]]:
        """``(list, index within the list, block)`` in the order the blocks run."""
        return [(spec, i, block) for spec in self.block_lists for i, block in enumerate(getattr(model, spec.attribute))]

    def head_module(self, model: torch.nn.Module) -> torch.nn.Module | None:
        """The module :attr:`head` names on ``model``, or None (no head named, or the model
        has no module there). Any ``nn.Module``: Forge's ``ForgeOperations.Linear``
        (``backend/operations.py``) is not a ``torch.nn.Linear``."""
        if self.head is None:
            return None
        module: object = model
        for part in self.head.split("."):
            module = getattr(module, part, None)
        return module if isinstance(module, torch.nn.Module) else None

    def hidden_size(self, model: torch.nn.Module) -> int:
        if self.dim is not None:
            return int(self.dim(model))
        for name in ("hidden_size", "inner_dim", "dim"):
            value = getattr(model, name, None)
            if isinstance(value, int):
                return value
        raise TypeError(f"cannot tell the hidden size of {type(model).__name__}")


def embedder_width(attribute: str) -> Callable[[torch.nn.Module], int]:
    """Hidden size read off a patch embedder's output channels (SD3 has no attribute)."""

    def width(model: torch.nn.Module) -> int:
        layer = getattr(model, attribute)
        proj = getattr(layer, "proj", layer)
        return int(getattr(proj, "out_channels", None) or proj.out_features)

    return width
