"""``mhc_compile.convert`` and ``mhc_compile.find_residuals``: capture a model with ``torch.export``
(``capture.py``), run the residual passes on its graph, and return the user's model converted (or
just the report; ``capture`` + ``rewrite_captured`` give the rewritten graph and the report from
one capture).

The whole-graph analysis of that capture finds the sites and chains. ``convert`` then keeps the
model's class (``blocks``): the modules holding a chain's sites become stream-carrying
(``blocks.carry``), or, when a chain cannot cross its blocks, the model's forward runs the
rewritten whole graph (``blocks.whole_graph``). Either way the original state-dict keys are kept
and the mHC parameters are ``nn.Parameter``s under ``<module path>.mhc.*``, the names of every
path (backend, CLI), so checkpoints move between them.

``rewrite_captured`` returns the rewritten ``ExportedProgram.module()`` GraphModule. Like every
exported module its train/eval mode is the one it was captured in, except that dropout and batch
norm are re-routed through two tiny mode modules (``mhc_mode_dropout``, ``mhc_mode_batch_norm``,
no state) so ``.train()`` / ``.eval()`` work for those two ops.
"""
from __future__ import annotations

import copy
import inspect
import warnings
from typing import Any, Optional

import torch
from torch import fx, nn

from .bound_args import bound_objects, describe
from .capture import MHCCaptureError, _as_tuple, _warn_sizes, capture  # noqa: F401 (public here too)
from .config import MHCConfig
from .flex_mask import on_device
from .sizes import fixed_sizes
from .passes.mode_switch import _ModeBatchNorm, _ModeDropout, make_mode_switchable  # noqa: F401 (pickles name them here)
from .passes.rewrite import ParamProvider, analyze, build_report, default_param_provider, rewrite_graph
from .passes.native import native_from_modules
from .report import NativeStreamsReport, ResidualReport, rename_symbols, symbol_names


def find_residuals(model: nn.Module, example_inputs: Any, config: Optional[MHCConfig] = None, *,
                   example_kwargs: Optional[dict] = None) -> ResidualReport:
    """Report the residual sites and chains of ``model`` without changing it."""
    config = MHCConfig.from_options(config)
    args, kwargs = _on_model_device(model, _as_tuple(example_inputs), _without_cache(model, dict(example_kwargs or {})))
    native = native_from_modules(model)
    with bound_objects(model, args, kwargs) as (args, kwargs, _):
        gm = capture(model, args, example_kwargs=kwargs) if native is None else _capture_native(model, args, kwargs, native)
    if isinstance(gm, NativeStreamsReport):
        return ResidualReport(streams=config.streams, native=[gm])
    detected, chains = analyze(gm.graph)
    return build_report(detected, chains, config, rewritten=False)


def _capture_native(model: nn.Module, args: tuple, kwargs: dict, native: NativeStreamsReport):
    """For a model whose config and modules say it already has hyper-connections
    (``native_from_modules``): one static capture, whose graph says which axis carries the
    streams, or ``native`` when it cannot be captured (Qwen4-Exp)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return capture(model, args, dynamic=False, example_kwargs=kwargs)
    except MHCCaptureError:
        return native


def _say_native(model: nn.Module, native: list, unchanged: bool) -> None:
    """One warning line per native multi-stream state (which modules, which axis)."""
    for n in native:
        warnings.warn(f"mhc_compile.convert: {type(model).__name__}: {rename_symbols(n.message, symbol_names([n.message]))}"
                      + ("; returning the model unchanged" if unchanged else ""), stacklevel=3)


def rewrite_captured(model: nn.Module, gm: fx.GraphModule, config: MHCConfig,
                     param_provider: Optional[ParamProvider] = None) -> tuple[nn.Module, ResidualReport]:
    """The step of :func:`convert` after the capture: rewrite ``gm`` (the :func:`capture` of
    ``model``) in place and return ``(converted, report)``; ``(model, report)`` with
    ``report.rewritten`` False when no residual site was found (no warning: the caller decides
    what to say). Lets a caller that needs both the report and the module capture once."""
    report = rewrite_graph(gm, config, param_provider or default_param_provider)
    if not report.rewritten:
        return model, report
    make_mode_switchable(gm, model.training)
    gm.mhc_report = report
    gm.mhc_config = config
    return gm, report


FORMS = ("auto", "blocks", "whole-graph")


def _on_model_device(model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The example on the meta device when the model is (meta init): torch 2.11's export refuses
    a meta embedding table looked up with CPU indices; later versions accept both."""
    if next((p.device.type for p in model.parameters()), None) != "meta":
        return args, kwargs
    meta = lambda v: v.to("meta") if isinstance(v, torch.Tensor) else on_device(v, torch.device("meta"))  # noqa: E731
    return tuple(torch.utils._pytree.tree_map(meta, a) for a in args), {
        k: torch.utils._pytree.tree_map(meta, v) for k, v in kwargs.items()}


def _without_cache(model: nn.Module, kwargs: dict) -> dict:
    """The keyword arguments the whole-model capture uses: the example's, with ``use_cache=False``
    when ``forward`` takes ``use_cache`` (a KV cache object in the outputs cannot be exported;
    where the residuals are does not depend on it). The blocks are recorded with the example's
    own arguments, cache included."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return kwargs
    if "use_cache" not in params or kwargs.get("use_cache") is False:
        return kwargs
    return {**kwargs, "use_cache": False}


def convert(
    model: nn.Module,
    config: Optional[MHCConfig] = None,
    example_inputs: Any = None,
    *,
    example_kwargs: Optional[dict] = None,
    param_provider: Optional[ParamProvider] = None,
    inplace: bool = False,
    form: str = "auto",
) -> nn.Module:
    """Return ``model`` with its residual streams turned into n-stream mHC: the same class and
    module tree, the original state-dict keys plus the mHC parameters.

    ``example_inputs`` is a tuple of positional arguments (``example_kwargs`` optional keyword
    arguments, e.g. ``{"attention_mask": mask}``). ``inplace=True`` converts ``model`` itself;
    otherwise a converted copy is returned and ``model`` is not changed (the capture reads the
    model, the copy is made once, after it).

    ``form``: ``"blocks"`` makes the modules that hold a chain's sites carry the n streams (they
    take and return ``(..., n, C)``; the chain's first block expands, its last collapses), so
    per-block FSDP2, checkpointing and ``torch.compile`` work; ``"whole-graph"`` keeps the
    class but runs the rewritten whole graph as ``forward``; ``"auto"`` (default) is blocks when
    every chain can cross its blocks, else whole-graph with the reason in
    ``converted.mhc_report.form_reason``. The report is ``converted.mhc_report``. A model without
    residual sites is returned unchanged with a warning; a model that cannot be captured raises
    :class:`MHCCaptureError`.
    """
    from .blocks import carry_blocks, plan_blocks
    from .blocks.trace import BlockTraceError
    from .blocks.whole_graph import install_whole_graph
    from .passes.rewrite import BlockRewriteError

    if form not in FORMS:
        raise ValueError(f"convert(form={form!r}): must be one of {', '.join(map(repr, FORMS))}")
    config = MHCConfig.from_options(config)
    provider = param_provider or default_param_provider
    args, kwargs = _as_tuple(example_inputs), dict(example_kwargs or {})
    captured = _without_cache(model, kwargs)
    cap_args, cap_kwargs = _on_model_device(model, args, captured)
    native = native_from_modules(model)
    sizes: list = []  # the dims the capture keeps static, checked on the converted model before warning
    with bound_objects(model, cap_args, cap_kwargs) as (cap_args, cap_kwargs, opaque):
        # opaque arguments (bound_args): sizes their example fixes (a BlockMask's length) bind the capture only
        gm = (capture(model, cap_args, example_kwargs=cap_kwargs,
                      on_sizes=lambda *found: None if opaque else sizes.append(found)) if native is None
              else _capture_native(model, cap_args, cap_kwargs, native))
    if isinstance(gm, NativeStreamsReport):
        _say_native(model, [gm], unchanged=True)
        return model
    detected, chains = analyze(gm.graph)
    report = build_report(detected, chains, config, rewritten=False)
    _say_native(model, report.native, unchanged=not chains)
    if report.native and not chains:
        return model
    if not chains:
        reasons = "; ".join(f"{t.node}: {t.reason}" for t in report.not_taken[:5])
        warnings.warn(
            f"mhc_compile.convert: no residual site found in {type(model).__name__}; returning the model unchanged"
            + (f" (adds not taken: {reasons})" if reasons else " (it has no add of x + f(x))"),
            stacklevel=2,
        )
        return model
    target = model if inplace else copy.deepcopy(model)
    plan = plan_blocks(chains)
    reason = "asked for with form='whole-graph'" if form == "whole-graph" else plan.fallback
    names: list = []
    if not reason:
        try:
            names = carry_blocks(target, plan, args, kwargs, config, provider)
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
        report = rewrite_graph(gm, config, provider, analysis=(detected, chains))
        make_mode_switchable(gm, target.training)
        names = install_whole_graph(target, gm, fixed={k: v for k, v in captured.items() if k not in kwargs},
                                    example=(len(args), list(kwargs)))
        report.param_names = names
        report.form, report.form_reason = "whole-graph", reason
    else:
        report = build_report(detected, chains, config, rewritten=True, names=names)
        report.form, report.blocks = "blocks", [b.path for b in plan.blocks]
    target.mhc_report = report
    target.mhc_config = config
    for static, guards in sizes:  # only the dims the converted model really cannot vary
        _warn_sizes(*fixed_sizes(target, args, kwargs, static, guards), stacklevel=3)
    from . import engine_init
    from .io.pretrained import bind_save_pretrained, is_pretrained

    engine_init.install(target)  # the model's own init (torchtitan, HF) resets the mHC parameters

    if is_pretrained(target):
        bind_save_pretrained(target, args, kwargs)
    return target
