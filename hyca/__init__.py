"""HyCa: training-free acceleration of diffusion transformers by hybrid feature caching."""

__version__ = "0.1.0"

from .adapters.diffusers import disable, enable, is_enabled, recommended_settings, reset, stats
from .engine import HybridCache, Schedule
from .math.solvers import get_solver, pool
from .profiles import Profile
from .probing import probe

__all__ = [
    "HybridCache", "Profile", "Schedule", "__version__", "disable", "enable", "get_solver",
    "is_enabled", "pool", "probe", "recommended_settings", "reset", "stats",
]
