"""Stand-in of Forge's ``backend/nn/mmditx.py`` (lllyasviel/stable-diffusion-webui-forge,
main branch, 2025): ``MMDiTX.forward(x, t, y=None, context=None, control=None,
transformer_options={}, **kw)`` -> ``forward_core_with_concat`` over ``joint_blocks``
(last one ``pre_only``). Layout in standin_mmdit.py; tiny random weights."""

from standin_mmdit import JointBlock, MMDiTLayout  # noqa: F401 - JointBlock is part of the module's surface


class MMDiTX(MMDiTLayout):
    def forward(self, x, t, y=None, context=None, control=None, transformer_options={}, **kwargs):  # noqa: B006 - the real default
        return self._run(x, t, y, context)
