"""Profiles: what the probe chose, as data the engine reads, and where the data lives."""

from .compare import Comparison, compare_profiles
from .hub import DEFAULT_HUB_REPO, HubError, pull_profile, push_profile
from .io import ProfileError, load_profile, save_profile
from .names import profile_filename
from .profile import Profile
from .sources import ResolvedProfile, resolve_profile

__all__ = [
    "DEFAULT_HUB_REPO", "Comparison", "HubError", "Profile", "ProfileError", "ResolvedProfile",
    "compare_profiles", "load_profile", "profile_filename", "pull_profile", "push_profile", "resolve_profile",
    "save_profile",
]
