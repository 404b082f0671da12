"""The probe: record a fully computed run, cluster hidden dimensions, choose solvers."""

from .runner import analyse, probe, probe_transformer

__all__ = ["analyse", "probe", "probe_transformer"]
