"""The diffusers adapter: hooks on diffusers transformers through ``diffusers.hooks``."""

from .api import disable, enable, is_enabled, recommended_settings, reset, stats
from .families import FAMILIES

__all__ = ["FAMILIES", "disable", "enable", "is_enabled", "recommended_settings", "reset", "stats"]
