"""Forge Neo Wan: ``backend/nn/wan.py`` ``WanModel``; ``x = block(x, e=, freqs=, context=,
...)`` over ``blocks``, with the ``dit`` ``double_block`` replace patch."""

from .adapter import Adapter, BlockList

ADAPTER = Adapter(
    name="Neo Wan", frontend="neo", classes=("WanModel",),
    block_lists=(BlockList("blocks", "img", "double_block"),),
    style="replace", requires=("forward_orig",),
)
