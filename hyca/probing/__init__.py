"""The probe's core: record a fully computed run as sketches, cluster hidden dimensions,
choose solvers. Host-free (torch, numpy, scikit-learn): driving a diffusers pipeline lives
in :mod:`hyca.adapters.diffusers.probe` (``hyca.probe``), a WebUI pass in
:mod:`hyca.adapters.webui.probe`."""

from .analysis import analyse, assign, candidate_solvers, selection_report
from .recorder import SketchRecorder

__all__ = ["SketchRecorder", "analyse", "assign", "candidate_solvers", "selection_report"]
