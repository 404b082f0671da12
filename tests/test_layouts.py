"""The shared layout vocabulary (hyca/layouts.py): every row of the WebUI and ComfyUI tables
has a hook function for each of its layouts, and the "text dropped" rule reads the block
attribute each host's upstream code names."""

from types import SimpleNamespace

import pytest

from hyca import layouts
from hyca.adapters.comfyui.families import FAMILIES as COMFYUI_ROWS
from hyca.adapters.webui import kinds
from hyca.adapters.webui.registry import ADAPTERS as WEBUI_ROWS


@pytest.mark.parametrize("row", WEBUI_ROWS + COMFYUI_ROWS, ids=lambda a: a.name)
def test_every_block_list_of_every_row_has_a_hook_in_its_style(row):
    assert row.style in ("gate", "replace")
    hooks = kinds.GATES if row.style == "gate" else kinds.PATCHES
    for spec in row.block_lists:
        assert spec.layout in hooks, f"{row.name} {spec.attribute}: no {row.style} hook for {spec.layout}"
        # a replace patch needs the patches_replace["dit"] key the frontend answers to
        assert (spec.dit_key is not None) == (row.style == "replace")


def test_text_dropped_follows_the_attribute_path_each_host_names():
    # Forge / A1111 MMDiT(X): JointBlock.context_block.pre_only (backend/nn/mmditx.py)
    last = SimpleNamespace(context_block=SimpleNamespace(pre_only=True))
    inner = SimpleNamespace(context_block=SimpleNamespace(pre_only=False))
    assert layouts.text_dropped(layouts.JOINT, last)
    assert not layouts.text_dropped(layouts.JOINT, inner)
    assert not layouts.text_dropped(layouts.JOINT, SimpleNamespace())  # no context block: nothing dropped
    # diffusers SD3: JointTransformerBlock.context_pre_only
    joint = layouts.Layout(("encoder_hidden_states", "hidden_states"), "hidden_states",
                           text_dropped_if="context_pre_only")
    assert layouts.text_dropped(joint, SimpleNamespace(context_pre_only=True))
    assert not layouts.text_dropped(layouts.IMG_TXT, last)  # a layout without the rule never drops
