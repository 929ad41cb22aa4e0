"""Running ``mhc_compile.convert`` / ``find_residuals`` on a :class:`~mhc_compile.io.registry.Source`:
its model with its example inputs, in the mode it was read in (eval).

:func:`convert_source_with_report` captures the model once and returns a typed
:class:`Conversion` (the converted module, its :class:`~mhc_compile.ResidualReport`, and on
request a copy of the captured graph before the rewrite), for callers such as ``mhc convert``
and ``mhc inspect`` that need more than the module.
"""
from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from typing import Optional

from torch import fx, nn

from ..config import MHCConfig
from ..report import ResidualReport
from .examples import positional_inputs
from .registry import Source


@dataclass
class Conversion:
    """What one capture and rewrite of a source gave."""

    converted: nn.Module  # the source's model itself when the report has no site
    report: ResidualReport
    original_graph: Optional[fx.Graph] = None  # the capture before the rewrite (keep_graph=True)

    @property
    def rewritten(self) -> bool:
        return self.report.rewritten


def source_inputs(source: Source) -> tuple:
    """The source's example inputs as the positional tuple ``convert`` takes."""
    return positional_inputs(source.model, source.args, source.kwargs)


def _capture_kwargs(model: nn.Module, num_args: int) -> dict:
    """``use_cache=False`` where ``forward`` takes it and the positional example does not reach it,
    as ``mhc_compile.convert`` captures: a model rebuilt with its config's ``use_cache=True`` (a
    converted HF decoder) would return a KV cache object, which torch.export cannot capture."""
    from ..convert import _without_cache

    kwargs = _without_cache(model, {})
    if kwargs:
        names = list(inspect.signature(model.forward).parameters)
        if names.index("use_cache") < num_args:
            return {}
    return kwargs


def convert_source_with_report(source: Source, config: MHCConfig, *, keep_graph: bool = False) -> Conversion:
    """Capture the source's model once and rewrite it (``mhc_compile.convert`` without its
    no-site warning). ``keep_graph`` keeps a copy of the captured graph before the rewrite
    (the same graph ``capture`` gives, node names included), for drawing it."""
    from ..convert import capture, rewrite_captured

    args = source_inputs(source)
    gm = capture(source.model, args, example_kwargs=_capture_kwargs(source.model, len(args)))
    graph = copy.deepcopy(gm.graph) if keep_graph else None
    converted, report = rewrite_captured(source.model, gm, config)
    return Conversion(converted, report, graph)


def convert_source(source: Source, config: MHCConfig) -> nn.Module:
    """``mhc_compile.convert`` on a source's model with its example inputs (in the source's mode)."""
    from ..convert import convert

    return convert(source.model, config, source_inputs(source))


def find_source_residuals(source: Source, config: Optional[MHCConfig] = None) -> ResidualReport:
    """``mhc_compile.find_residuals`` on a source's model with its example inputs."""
    from ..convert import find_residuals

    return find_residuals(source.model, source_inputs(source), config)
