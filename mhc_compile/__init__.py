"""mhc-compile: rewrite residual networks into n-stream manifold-constrained hyper-connections.

Public API: ``MHCConfig``, ``convert``, ``find_residuals``, ``diagnostics``, ``materialize``,
``load``, ``parallelize_mhc`` (tensor parallel). The ``torch.compile`` backend ``"mhc"`` is registered through an entry point.
"""
from .config import MHCConfig, MHCConfigError
from . import reference, ops
from .convert import MHCCaptureError, convert, find_residuals
from .report import ResidualReport
from . import diagnostics
from .backend import materialize
from .io import load
from .parallel import MHCParallelError

__all__ = ["MHCConfig", "MHCConfigError", "convert", "find_residuals", "ResidualReport", "MHCCaptureError", "reference", "ops", "diagnostics", "materialize", "load",
           "parallelize_mhc", "MHCParallel", "MHCParallelError"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in ("parallelize_mhc", "MHCParallel"):  # need torch.distributed: imported on first use
        from . import parallel

        return getattr(parallel, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
