"""Forge Neo Qwen-Image: ``backend/nn/qwen.py`` ``QwenImageTransformer2DModel``; blocks in
``transformer_blocks`` return ``(txt, img)`` and honour the ``dit`` ``double_block``
replace patch."""

from .adapter import Adapter, BlockList

ADAPTER = Adapter(
    name="Neo Qwen-Image", frontend="neo", classes=("QwenImageTransformer2DModel",),
    block_lists=(BlockList("transformer_blocks", "img_txt", "double_block"),),
    style="replace",
)
