"""The probe's core: record a fully computed run as sketches, cluster hidden dimensions,
choose solvers closed loop. Host-free (torch, numpy, scikit-learn): a host (diffusers in
:mod:`hyca.adapters.diffusers.probe`, a WebUI pass in :mod:`hyca.adapters.webui.probe`,
the app, ComfyUI) implements :class:`ProbeHost` and calls :func:`probe_host`."""

from .analysis import analyse, assign, candidate_solvers, selection_report
from .host import ProbeHost, euler_sample
from .probe import CALIBRATION_SAMPLES, SINGLES, check_options, probe_host
from .recorder import SketchRecorder

__all__ = ["CALIBRATION_SAMPLES", "ProbeHost", "SINGLES", "SketchRecorder", "analyse", "assign", "candidate_solvers",
           "check_options", "euler_sample", "probe_host", "selection_report"]
