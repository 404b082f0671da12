"""A1111 SD3: ``modules/models/sd3/mmdit.py`` ``MMDiT`` at
``p.sd_model.model.diffusion_model``: no ``transformer_options`` and no wrapper slot, so
the instance's ``forward`` marks each call and its ``joint_blocks`` are gated; sigma comes
from ``on_cfg_denoiser``. Everything is removed in ``postprocess``."""

from .adapter import Adapter, BlockList, embedder_width

ADAPTER = Adapter(
    name="A1111 SD3", frontend="a1111", classes=("MMDiT",),
    block_lists=(BlockList("joint_blocks", "joint"),),
    style="gate", requires=("forward_core_with_concat",), dim=embedder_width("x_embedder"),
)
