"""The runtime engine: schedule, per-branch state, aggregated history, forecast kernel, and
the contract hosts drive it through (:mod:`hyca.engine.contract`)."""

from .cache import BranchState, HybridCache, RunStats
from .contract import Engine
from .forecast import forecast
from .schedule import Schedule

__all__ = ["BranchState", "Engine", "HybridCache", "RunStats", "Schedule", "forecast"]
