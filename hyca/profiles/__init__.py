"""Profiles: what the probe chose, as data the engine reads."""

from .profile import Profile

__all__ = ["Profile"]
