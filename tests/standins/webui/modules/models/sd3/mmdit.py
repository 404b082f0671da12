"""Stand-in of A1111's ``modules/models/sd3/mmdit.py`` (AUTOMATIC1111/stable-diffusion-webui
v1.10.1, 82a973c04367123ae98bd9abdf80d9eda9b910e2; see tests/standins/CONFORMANCE.md): ``MMDiT.forward(x, t, y=None, context=None)`` -> ``forward_core_with_concat(x,
c_mod, context=None)`` over ``joint_blocks`` (last one ``pre_only``); no
``transformer_options``. Layout in standin_mmdit.py; tiny random weights."""

from standin_mmdit import JointBlock, MMDiTLayout  # noqa: F401 - JointBlock is part of the module's surface


class MMDiT(MMDiTLayout):
    def forward(self, x, t, y=None, context=None):
        return self._run(x, t, y, context)
