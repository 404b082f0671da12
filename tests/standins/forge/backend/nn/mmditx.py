"""Stand-in of Forge's ``backend/nn/mmditx.py`` (lllyasviel/stable-diffusion-webui-forge,
main branch at dfdcbab685e57677014f05a3309b48cc87383167; see tests/standins/CONFORMANCE.md):
``MMDiTX.forward(x, t, y=None, context=None, control=None, transformer_options={}, **kw)``
reads ``transformer_options["skip_layers"]`` and calls
``forward_core_with_concat(x, c_mod, context, skip_layers, controlnet_hidden_states)``,
which runs ``context, x = block(context, x, c=c_mod)`` over ``joint_blocks`` except the
listed ones (the last block is ``pre_only``). Out of place, like upstream. Layout in
standin_mmdit.py; tiny random weights."""

from standin_mmdit import JointBlock, MMDiTLayout  # noqa: F401 - JointBlock is part of the module's surface


class MMDiTX(MMDiTLayout):
    def forward_core_with_concat(self, x, c_mod, context=None, skip_layers=[], controlnet_hidden_states=None):  # noqa: B006 - the real default
        for i, block in enumerate(self.joint_blocks):
            if i in skip_layers:
                continue
            context, x = block(context, x, c=c_mod)
        return self.final_layer(x, c_mod)

    def forward(self, x, t, y=None, context=None, control=None, transformer_options={}, **kwargs):  # noqa: B006 - the real default
        return self._run(x, t, y, context, transformer_options.get("skip_layers", []), control)
