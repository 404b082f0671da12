"""Stand-in of forge's `backend/sampling/sampling_function.py` (see standin_forge_runtime.py)."""

from standin_forge_runtime import calc_cond_uncond_batch, sampling_function  # noqa: F401
