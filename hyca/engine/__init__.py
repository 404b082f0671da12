"""The runtime engine: schedule, per-branch state, aggregated history, forecast kernel."""

from .cache import BranchState, HybridCache, RunStats
from .forecast import forecast
from .schedule import Schedule

__all__ = ["BranchState", "HybridCache", "RunStats", "Schedule", "forecast"]
