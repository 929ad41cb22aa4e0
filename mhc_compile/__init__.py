"""mhc-compile: rewrite residual networks into n-stream manifold-constrained hyper-connections.

Public API: ``MHCConfig``, ``convert``, ``find_residuals``, ``diagnostics``, ``materialize``,
``load``, ``parallelize_mhc`` / ``MHCParallel`` (tensor parallel). The ``torch.compile`` backend ``"mhc"`` is registered through an entry point.

The names are imported on first use (PEP 562), so ``import mhc_compile`` (and ``mhc --help``)
does not import torch. ``mhc_compile.convert`` is the function, also after the submodule
``mhc_compile.convert`` is imported (reach the module with ``importlib.import_module``), as it
was when this file imported everything eagerly.
"""
import importlib
import sys
import types

__version__ = "0.1.0"
_FROM = {"MHCConfig": "config", "MHCConfigError": "config", "convert": "convert", "find_residuals": "convert",
         "MHCCaptureError": "capture", "ResidualReport": "report", "materialize": "backend", "load": "io",
         "parallelize_mhc": "parallel.tp", "MHCParallel": "parallel.tp", "MHCParallelError": "parallel"}
_MODULES = ("reference", "ops", "diagnostics")
__all__ = ["MHCConfig", "MHCConfigError", "convert", "find_residuals", "ResidualReport", "MHCCaptureError", "reference", "ops", "diagnostics", "materialize", "load",
           "parallelize_mhc", "MHCParallel", "MHCParallelError"]


def __getattr__(name):
    if name in _FROM:
        value = getattr(importlib.import_module(f".{_FROM[name]}", __name__), name)
    elif name in _MODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """Importing the submodule ``convert`` would bind ``mhc_compile.convert`` to the module; the
    package's ``convert`` is the function."""

    def __setattr__(self, name, value):
        if name == "convert" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
