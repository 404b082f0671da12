"""Forge FLUX: ``backend/nn/flux.py`` ``IntegratedFluxTransformer2DModel``, whose
``inner_forward`` loops ``double_blocks`` then ``single_blocks`` over ``cat(txt, img)``
and gets no ``transformer_options``: its blocks are gated."""

from .adapter import Adapter, BlockList

ADAPTER = Adapter(
    name="Forge FLUX", frontend="forge", classes=("IntegratedFluxTransformer2DModel",),
    block_lists=(BlockList("double_blocks", "img_txt"), BlockList("single_blocks", "concat_tail")),
    style="gate", requires=("inner_forward",), refuses=("forward_orig",),
)
