"""Forge SD3.5: ``backend/nn/mmditx.py`` ``MMDiTX``: ``context, x = block(context, x,
c=c_mod)`` over ``joint_blocks``, the last one ``pre_only``; blocks gated."""

from .adapter import Adapter, BlockList, embedder_width

ADAPTER = Adapter(
    name="Forge SD3.5", frontend="forge", classes=("MMDiTX",),
    block_lists=(BlockList("joint_blocks", "joint"),),
    style="gate", requires=("forward_core_with_concat",), dim=embedder_width("x_embedder"),
)
