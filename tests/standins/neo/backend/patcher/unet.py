"""Stand-in of neo's `backend/patcher/unet.py` `UnetPatcher` (see standin_forge_runtime.py)."""

from standin_forge_runtime import UnetPatcher  # noqa: F401
