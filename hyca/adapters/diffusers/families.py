"""Per model family: which block lists exist, what each block returns, which stream reaches
the output. This table is the only model-specific knowledge the diffusers hooks need."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BlockList:
    """``attribute``: the ``nn.ModuleList`` on the transformer, run in table order.
    ``returns``: for each output position of a block, the name of the input argument it
    updates (a plain string when the block returns one tensor). ``"hidden_states"`` is
    the stream that reaches the output; its residual is what HyCa caches."""

    attribute: str
    returns: tuple[str, ...] | str
    stream: str = "hidden_states"


@dataclass(frozen=True)
class Family:
    name: str
    block_lists: tuple[BlockList, ...]
    timestep_arg: str = "timestep"
    input_arg: str = "hidden_states"
    notes: str = ""


FAMILIES: dict[str, Family] = {
    "FluxTransformer2DModel": Family(
        name="FLUX",
        block_lists=(
            BlockList("transformer_blocks", ("encoder_hidden_states", "hidden_states")),
            BlockList("single_transformer_blocks", ("encoder_hidden_states", "hidden_states")),
        ),
        notes=(
            "double blocks update (text, image) and return (text, image); single blocks take "
            "both streams, attend jointly and return (text, image); only the image stream "
            "reaches norm_out/proj_out, so a skip step forecasts the image stream alone"
        ),
    ),
}


def family_of(transformer: torch.nn.Module) -> Family:
    name = type(transformer).__name__
    if name not in FAMILIES:
        supported = ", ".join(sorted(FAMILIES))
        raise TypeError(f"HyCa does not support {name} yet; supported transformers: {supported}")
    return FAMILIES[name]


def blocks_of(transformer: torch.nn.Module, family: Family) -> list[tuple[BlockList, torch.nn.Module]]:
    """Every block in execution order, with the description of its list."""
    return [(spec, block) for spec in family.block_lists for block in getattr(transformer, spec.attribute)]


def hidden_size(transformer: torch.nn.Module) -> int:
    config = transformer.config
    if "num_attention_heads" in config and "attention_head_dim" in config:
        return config.num_attention_heads * config.attention_head_dim
    return config.hidden_size
