"""Stand-in of ``modules/shared.py``: the ``state`` (interrupt flags) and ``opts`` parts."""

from types import SimpleNamespace

state = SimpleNamespace(interrupted=False, skipped=False)
opts = SimpleNamespace(img2img_fix_steps=False)
