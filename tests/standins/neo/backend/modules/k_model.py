"""Stand-in of neo's `backend/modules/k_model.py` `KModel` (see standin_forge_runtime.py)."""

from standin_forge_runtime import KModel  # noqa: F401
