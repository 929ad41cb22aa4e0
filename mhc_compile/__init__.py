"""mhc-compile: rewrite residual networks into n-stream manifold-constrained hyper-connections.

Public API: ``MHCConfig``, ``convert``, ``find_residuals``, ``diagnostics``, ``materialize``,
``load``. The ``torch.compile`` backend ``"mhc"`` is registered through an entry point.
"""
from .config import MHCConfig, MHCConfigError
from . import reference, ops
from . import diagnostics
from .backend import materialize

__all__ = ["MHCConfig", "MHCConfigError", "reference", "ops", "diagnostics", "materialize"]
__version__ = "0.1.0"
