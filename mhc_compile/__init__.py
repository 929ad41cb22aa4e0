"""mhc-compile: rewrite residual networks into n-stream manifold-constrained hyper-connections.

Public API: ``MHCConfig``, ``convert``, ``find_residuals``, ``diagnostics``, ``materialize``,
``load``. The ``torch.compile`` backend ``"mhc"`` is registered through an entry point.
"""
from .config import MHCConfig, MHCConfigError
from . import reference, ops
from .convert import MHCCaptureError, convert, find_residuals
from .report import ResidualReport
from . import diagnostics
from .backend import materialize
from .io import load

__all__ = ["MHCConfig", "MHCConfigError", "convert", "find_residuals", "ResidualReport", "MHCCaptureError", "reference", "ops", "diagnostics", "materialize", "load"]
__version__ = "0.1.0"
