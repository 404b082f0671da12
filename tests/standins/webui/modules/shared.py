"""Stand-in of ``modules/shared.py`` (A1111 v1.10.1 82a973c, Forge dfdcbab): the ``state``
(interrupt flags) and ``opts`` parts."""

from types import SimpleNamespace

state = SimpleNamespace(interrupted=False, skipped=False)
opts = SimpleNamespace(img2img_fix_steps=False)
