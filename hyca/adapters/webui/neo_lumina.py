"""Forge Neo Lumina2 / Z-Image: ``backend/nn/lumina.py`` ``NextDiT``; ``x = layer(x, mask,
freqs_cis, adaln_input, transformer_options=)`` over ``layers`` with no replace hook, so
the layers are gated."""

from .adapter import Adapter, BlockList

ADAPTER = Adapter(
    name="Neo Lumina2 / Z-Image", frontend="neo", classes=("NextDiT",),
    block_lists=(BlockList("layers", "single"),),
    style="gate",
)
