"""Forge Chroma: ``backend/nn/chroma.py`` ``IntegratedChromaTransformer2DModel``: the
FLUX block layout with per-block ``mod=`` modulations and no guidance; blocks gated."""

from .adapter import Adapter, BlockList

ADAPTER = Adapter(
    name="Forge Chroma", frontend="forge", classes=("IntegratedChromaTransformer2DModel",),
    block_lists=(BlockList("double_blocks", "img_txt"), BlockList("single_blocks", "concat_tail")),
    style="gate", requires=("inner_forward",),
)
