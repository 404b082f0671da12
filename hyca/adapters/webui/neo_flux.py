"""Forge Neo FLUX / Flux2: ``backend/nn/flux.py`` ``IntegratedFluxTransformer2DModel`` with
``forward_orig`` and ``patches_replace["dit"]`` keys ``("double_block", i)`` and
``("single_block", i)``: HyCa is a set of replace patches on the cloned unet."""

from .adapter import Adapter, BlockList

ADAPTER = Adapter(
    name="Neo FLUX", frontend="neo", classes=("IntegratedFluxTransformer2DModel",),
    block_lists=(BlockList("double_blocks", "img_txt", "double_block"),
                 BlockList("single_blocks", "concat_tail", "single_block")),
    style="replace", requires=("forward_orig",),
)
