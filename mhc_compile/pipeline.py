"""The conversion pipeline, written once, on a model: bind the example (``example_call.py``), capture
(``capture.py``), analyse the graph (``graph_pipeline.py``, the graph analysis pipeline on an FX
graph: detect, chains, names, report), then the form that keeps the model's class (``forms``:
stream-carrying blocks, or the rewritten whole graph as ``forward``) and its ``ConvertedState``.
``mhc_compile.convert``, ``mhc convert``, ``mhc_compile.load`` and the ``converted`` source kind all
run :func:`run` (:func:`analyze_example`, then :func:`convert_analyzed`; ``mhc convert`` shows the
two as progress stages); ``mhc inspect`` runs :func:`rewrite_whole` (the same capture and
analysis, the whole graph rewritten, to draw it); ``find_residuals`` stops after the analysis. It
imports nothing from ``io`` (persistence sits above it and calls it).

The whole-graph analysis of that capture finds the sites and chains. The modules holding a chain's
sites become stream-carrying (``forms.blocks.carry``), or, when a chain cannot cross its blocks, the
model's forward runs the rewritten whole graph (``forms.whole_graph``); the model's
``ConvertedState`` (``forms.state``, ``model.mhc_state``) says which. Either way the original
state-dict keys are kept and the mHC parameters are ``nn.Parameter``s under ``<module
path>.mhc.*``, the names of every path (backend, CLI), so checkpoints move between them.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import fx, nn

from .bound_args import bound_objects, describe
from .capture import MHCCaptureError, _as_tuple, _warn_sizes, capture
from .config import MHCConfig
from .example_call import ExampleCall
from .flex_mask import on_device
from .graph_pipeline import analyze, build_report, rewrite_graph
from .mode_switch import make_mode_switchable
from .passes.native import native_from_modules
from .passes.rewrite import ParamProvider, default_param_provider
from .report import NativeStreamsReport, ResidualReport, rename_symbols, symbol_names
from .sizes import fixed_sizes

if TYPE_CHECKING:
    from .io.registry import Source

FORMS = ("auto", "blocks", "whole-graph")


@dataclass
class Conversion:
    """What one capture and conversion of a model gave."""

    converted: nn.Module  # the model itself (unchanged) when the report has no site
    report: ResidualReport
    original_graph: Optional[fx.Graph] = None  # the capture before the rewrite (keep_graph=True)
    call: Optional[ExampleCall] = None  # the example call it was converted with

    @property
    def rewritten(self) -> bool:
        return self.report.rewritten


def _on_model_device(model: nn.Module, call: ExampleCall) -> ExampleCall:
    """The example on the meta device when the model is (meta init): torch 2.11's export refuses
    a meta embedding table looked up with CPU indices; later versions accept both."""
    if next((p.device.type for p in model.parameters()), None) != "meta":
        return call
    meta = lambda v: v.to("meta") if isinstance(v, torch.Tensor) else on_device(v, torch.device("meta"))  # noqa: E731
    return call.map(lambda v: torch.utils._pytree.tree_map(meta, v))


def _without_cache(call: ExampleCall) -> ExampleCall:
    """The call the whole-model capture uses: the example's, with ``use_cache=False`` when
    ``forward`` takes ``use_cache`` and the example does not pass it positionally (a KV cache in
    the outputs cannot be exported; where the residuals are does not depend on it). The blocks are
    recorded with the example's own arguments, cache included."""
    at = call.position_of("use_cache")
    if not call.takes("use_cache") or call.kwargs.get("use_cache") is False or (at is not None and at < len(call.args)):
        return call
    return call.with_keyword("use_cache", False)


def _capture_native(model: nn.Module, call: ExampleCall, native: NativeStreamsReport):
    """For a model whose config and modules say it already has hyper-connections
    (``native_from_modules``): one static capture, whose graph says which axis carries the
    streams, or ``native`` when it cannot be captured (Qwen4-Exp)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return capture(model, call, dynamic=False)
    except MHCCaptureError:
        return native


def _capture_example(model: nn.Module, call: ExampleCall, sizes: Optional[list] = None):
    """``(graph module, or the NativeStreamsReport of a model that cannot be captured; the opaque
    arguments)``: the one whole-model capture, on the example without a KV cache. ``sizes``
    collects the dims the capture keeps static (checked on the converted model before warning)."""
    native = native_from_modules(model)
    with bound_objects(model, _on_model_device(model, _without_cache(call))) as (captured, opaque):
        if native is not None:
            return _capture_native(model, captured, native), opaque
        # opaque arguments (bound_args): sizes their example fixes (a BlockMask's length) bind the capture only
        keep = None if sizes is None else (lambda *found: None if opaque else sizes.append(found))
        return capture(model, captured, on_sizes=keep), opaque


def _say_native(model: nn.Module, native: list, unchanged: bool) -> None:
    """One warning line per native multi-stream state (which modules, which axis)."""
    for n in native:
        warnings.warn(f"mhc_compile.convert: {type(model).__name__}: {rename_symbols(n.message, symbol_names([n.message]))}"
                      + ("; returning the model unchanged" if unchanged else ""), stacklevel=5)


def find_residuals(model: nn.Module, example_inputs: Any, config: Optional[MHCConfig] = None, *,
                   example_kwargs: Optional[dict] = None) -> ResidualReport:
    """Report the residual sites and chains of ``model`` without changing it."""
    config = MHCConfig.from_options(config)
    return analyze_example(model, config, _as_tuple(example_inputs), example_kwargs, check_sizes=False).report


def rewrite_whole(model: nn.Module, config: MHCConfig, args: tuple, kwargs: Optional[dict] = None, *,
                  keep_graph: bool = False, param_provider: Optional[ParamProvider] = None) -> Conversion:
    """The capture of :func:`run` with its whole graph rewritten in place: the converted module is
    that ``GraphModule`` (what ``mhc inspect`` draws), or ``model`` when no site was found (no
    warning). ``keep_graph`` keeps a copy of the graph before the rewrite."""
    an = analyze_example(model, config, args, kwargs)
    gm = an.graph_module
    if gm is None:
        return Conversion(model, an.report, call=an.call)
    graph = copy.deepcopy(gm.graph) if keep_graph else None
    report = rewrite_graph(gm, config, param_provider or default_param_provider)
    if not report.rewritten:
        return Conversion(model, report, graph, an.call)
    make_mode_switchable(gm, model.training)
    gm.mhc_report = report
    gm.mhc_config = config
    return Conversion(gm, report, graph, an.call)


@dataclass
class Analysis:
    """The first half of :func:`run`: the one capture of the example and where its residuals are."""

    model: nn.Module
    call: ExampleCall
    graph_module: Optional[fx.GraphModule]  # None for a model with native streams only
    opaque: dict        # arguments bound into the capture (bound_args), by name
    sizes: list         # (static dims, guards) the capture reported, checked before warning
    report: ResidualReport
    detected: Any = None
    chains: list = field(default_factory=list)


def analyze_example(model: nn.Module, config: MHCConfig, args: Any, kwargs: Optional[dict] = None, *,
                    check_sizes: bool = True) -> Analysis:
    """Bind the example once, capture the model and find its residual sites and chains.
    ``check_sizes=False``: the capture warns about the dims it keeps static at once, instead of
    leaving them to be checked on the converted model (``find_residuals`` converts nothing)."""
    call = ExampleCall.bind(model, args, kwargs)  # the one binding of the example
    sizes: list = []
    gm, opaque = _capture_example(model, call, sizes if check_sizes else None)
    if isinstance(gm, NativeStreamsReport):
        return Analysis(model, call, None, opaque, sizes, ResidualReport(streams=config.streams, native=[gm]))
    detected, chains = analyze(gm.graph)
    report = build_report(detected, chains, config, rewritten=False)
    return Analysis(model, call, gm, opaque, sizes, report, detected, chains)


def run(model: nn.Module, config: MHCConfig, args: tuple, kwargs: Optional[dict] = None, *,
        param_provider: Optional[ParamProvider] = None, inplace: bool = False, form: str = "auto") -> Conversion:
    """Convert ``model`` (the body of ``mhc_compile.convert``, which documents the arguments):
    :func:`analyze_example`, then :func:`convert_analyzed`."""
    if form not in FORMS:
        raise ValueError(f"convert(form={form!r}): must be one of {', '.join(map(repr, FORMS))}")
    return convert_analyzed(analyze_example(model, config, args, kwargs), config,
                            param_provider=param_provider, inplace=inplace, form=form)


def convert_analyzed(an: Analysis, config: MHCConfig, *, param_provider: Optional[ParamProvider] = None,
                     inplace: bool = False, form: str = "auto") -> Conversion:
    """The blocks or the whole-graph form of an analysed model. A model without residual sites
    (or with native streams only) comes back unchanged in the :class:`Conversion`, without a
    warning about it: the caller says what to."""
    from .forms.blocks import carry_blocks, plan_blocks
    from .forms.blocks.trace import BlockTraceError
    from .forms.state import ConvertedState, set_state
    from .forms.whole_graph import install_whole_graph
    from .passes.rewrite import BlockRewriteError

    model, call, gm, opaque, report = an.model, an.call, an.graph_module, an.opaque, an.report
    _say_native(model, report.native, unchanged=not an.chains)
    if not an.chains:
        return Conversion(model, report, call=call)
    provider = param_provider or default_param_provider
    target = model if inplace else copy.deepcopy(model)
    plan = plan_blocks(an.chains)
    reason = "asked for with form='whole-graph'" if form == "whole-graph" else plan.fallback
    names: list = []
    carried: dict = {}
    if not reason:
        try:
            names, carried = carry_blocks(target, plan, call.args, call.kwargs, config, provider)
        except (BlockTraceError, BlockRewriteError) as exc:
            reason = str(exc)
    if reason and form == "blocks":
        raise MHCCaptureError(f"mhc_compile.convert(form='blocks'): {type(model).__name__} cannot carry the "
                              f"streams through its blocks: {reason}. Use form='auto' for the whole-graph form.")
    if reason and opaque:
        raise MHCCaptureError(f"mhc_compile.convert: {type(model).__name__} cannot carry the streams through its "
                              f"blocks ({reason}), and the whole-graph form cannot take the argument(s) "
                              f"{describe(opaque)}: it would bake the example's value into the graph. Make "
                              "the blocks traceable alone, or pass such arguments as tensors.")
    if reason:
        report = rewrite_graph(gm, config, provider, analysis=(an.detected, an.chains))
        make_mode_switchable(gm, target.training)
        captured = _without_cache(call).kwargs
        names, whole = install_whole_graph(target, gm, fixed={k: v for k, v in captured.items() if k not in call.kwargs},
                                           example=call)
        report.param_names = names
        report.form, report.form_reason = "whole-graph", reason
        set_state(target, ConvertedState("whole-graph", report, config, whole_graph=whole))
    else:
        report = build_report(an.detected, an.chains, config, rewritten=True, names=names)
        report.form, report.blocks = "blocks", [b.path for b in plan.blocks]
        set_state(target, ConvertedState("blocks", report, config, blocks=carried))
    for static, guards in an.sizes:  # only the dims the converted model really cannot vary
        _warn_sizes(*fixed_sizes(target, call, static, guards), stacklevel=5)
    from . import engine_init

    engine_init.install(target)  # the model's own init (torchtitan, HF) resets the mHC parameters
    return Conversion(target, report, call=call)


# ------------------------------------------------------------------ sources (read by ``io``)
def convert_source(source: "Source", config: MHCConfig) -> nn.Module:
    """``mhc_compile.convert`` on a source's model with its example inputs (in the source's mode),
    without the no-site warning: the model itself when it has no residual site."""
    return run(source.model, config, source.args, source.kwargs).converted


def find_source_residuals(source: "Source", config: Optional[MHCConfig] = None) -> ResidualReport:
    """``mhc_compile.find_residuals`` on a source's model with its example inputs."""
    return find_residuals(source.model, source.args, config, example_kwargs=source.kwargs)
