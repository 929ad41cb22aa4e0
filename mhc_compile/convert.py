"""``mhc_compile.convert`` and ``mhc_compile.find_residuals``: capture a model with ``torch.export``,
run the residual passes on its graph, and return the user's model converted (or just the report;
``capture`` + ``rewrite_captured`` give the rewritten graph and the report from one capture, for
the CLI's saved programs).

Capture: ``torch.export.export(strict=False)`` of the model itself (read, not changed), in the
mode the model is in (``model.training``). Dims are ``Dim.AUTO``: batch and sequence dims (dims 0
and 1 of rank 1-3 inputs) and the batch dim of rank-4+ (image) inputs, so other batch and
sequence sizes work; when export cannot make them dynamic it falls back to static shapes with a
warning.

The whole-graph analysis of that capture finds the sites and chains. ``convert`` then keeps the
model's class (``forms``): the modules holding a chain's sites become stream-carrying
(``forms.blocks.carry``), or, when a chain cannot cross its blocks, the model's forward runs the
rewritten whole graph (``forms.whole_graph``); the model's ``ConvertedState`` (``forms.state``,
``model.mhc_state``) says which. Either way the original state-dict keys are kept
and the mHC parameters are ``nn.Parameter``s under ``<module path>.mhc.*``, the names of every
path (backend, CLI), so checkpoints move between them.

``rewrite_captured`` returns the rewritten ``ExportedProgram.module()`` GraphModule (the form the
CLI saves as ``.pt2``). Like every exported module its train/eval mode is the one it was
captured in, except that dropout and batch norm are re-routed through two tiny mode modules
(``mhc_mode_dropout``, ``mhc_mode_batch_norm``, no state) so ``.train()`` / ``.eval()`` work for
those two ops.
"""
from __future__ import annotations

import copy
import inspect
import warnings
from typing import Any, Callable, Optional, Sequence

import torch
from torch import fx, nn

from . import _torch_internals as _ti
from .bound_args import bound_objects, describe
from .config import MHCConfig
from .flex_mask import on_device
from .messages import first_line
from .sizes import fixed_sizes
from .graph_pipeline import analyze, build_report, rewrite_graph
from .mode_switch import _ModeBatchNorm, _ModeDropout, make_mode_switchable  # noqa: F401 (pickles name them here)
from .passes.rewrite import ParamProvider, default_param_provider
from .passes.native import native_from_modules
from .report import NativeStreamsReport, ResidualReport, rename_symbols, symbol_names


class MHCCaptureError(RuntimeError):
    """The model could not be captured as a graph with ``torch.export``."""


def _as_tuple(example_inputs: Any) -> tuple:
    if example_inputs is None:
        raise TypeError("convert/find_residuals need example_inputs: a tuple of positional arguments for model(...)")
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    if not isinstance(example_inputs, tuple):
        return (example_inputs,)
    return example_inputs


def _dynamic_dims(t: torch.Tensor, level: str = "all") -> tuple:
    """The dims a model is usually generic over (``level="all"``): batch and sequence for tokens
    and hidden states (rank <= 3), batch and every spatial dim for images and volumes (rank >= 4:
    all but channels). ``level="batch"``: the batch dim only."""
    if t.dim() == 0:
        return ()
    if level == "batch":
        return (0,)
    if t.dim() <= 3:
        return tuple(range(min(2, t.dim())))
    return (0, *range(2, t.dim()))


def _tensor_leaves(args: Sequence[Any], kwargs: dict) -> list:
    return torch.utils._pytree.tree_leaves((tuple(args), kwargs))


def _static_dims(ep: Any, args: Sequence[Any], kwargs: dict, level: str) -> list:
    """(input I, dim D, size S) for every dim of ``level`` that export kept static anyway."""
    leaves = _tensor_leaves(args, kwargs)
    user = set(ep.graph_signature.user_inputs)
    vals = [n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder" and n.name in user]
    if len(vals) != len(leaves):
        return []
    out = []
    for i, (leaf, val) in enumerate(zip(leaves, vals)):
        if not isinstance(leaf, torch.Tensor) or not isinstance(val, torch.Tensor):
            continue
        for d in _dynamic_dims(leaf, level):
            if d < val.dim() and not isinstance(val.shape[d], torch.SymInt) and int(val.shape[d]) != 1:
                out.append((i, d, int(val.shape[d])))
    return out


def _kept_static(args: Sequence[Any], kwargs: dict) -> list:
    """(input I, dim D, size S) for the dims dynamic at level 'all' but not at level 'batch'."""
    out = []
    for i, leaf in enumerate(_tensor_leaves(args, kwargs)):
        if isinstance(leaf, torch.Tensor):
            batch = set(_dynamic_dims(leaf, "batch"))
            out += [(i, d, int(leaf.shape[d])) for d in _dynamic_dims(leaf) if d not in batch]
    return out


def _guards_failing_at_double(model: nn.Module, ep: Any, args: Sequence[Any], kwargs: dict) -> list:
    """The size guards of ``ep`` that inputs with their dynamic dims doubled would fail: sizes
    (or relations between sizes) the model's code fixes, such as a fixed number of patches."""
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs).arguments
    except TypeError:
        return []
    doubled = {}
    for name, value in bound.items():
        if isinstance(value, torch.Tensor):
            dims = set(_dynamic_dims(value))
            doubled[name] = [2 * s if d in dims else s for d, s in enumerate(value.shape)]
    return _ti.export_guards_failing(ep, doubled)


def _warn_sizes(static: list, guards: list, stacklevel: int = 4) -> None:
    """Warn, naming them, about the input dims the converted model cannot vary."""
    if not static and not guards:
        return
    static = [f"input {i} dim {d} (size {size})" for i, d, size in static]
    parts = ([f"static: {', '.join(static)}"] if static else []) + (
        [f"because of the size guards {'; '.join(g[:160] for g in guards[:3])}"] if guards else [])
    warnings.warn(
        "mhc_compile: the model's code fixes some input sizes (a literal size in a view, a fixed "
        "number of patches, ...), so the converted model accepts only the example's sizes there: "
        f"{' '.join(parts)}. The other batch, sequence and spatial dims are dynamic.",
        stacklevel=stacklevel,
    )


def _dynamic_shapes(model: nn.Module, args: Sequence[Any], kwargs: Optional[dict] = None, level: str = "all"):
    auto = torch.export.Dim.AUTO

    def spec(a):
        if isinstance(a, torch.Tensor):
            if a.dim() == 0:
                return None
            return {d: auto for d in _dynamic_dims(a, level)}
        if isinstance(a, (list, tuple)):
            return type(a)(spec(x) for x in a)
        if isinstance(a, dict):
            return {k: spec(v) for k, v in a.items()}
        return None

    if not kwargs:
        return tuple(spec(a) for a in args)
    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    return {name: spec(value) for name, value in bound.arguments.items()}


def capture(model: nn.Module, example_inputs: Any, dynamic: bool = True,
            example_kwargs: Optional[dict] = None, on_sizes: Optional[Callable] = None) -> fx.GraphModule:
    """Export ``model`` (non-strict; the model is read, not changed) and return the unlifted
    GraphModule. Its parameters are the model's own tensors: rewrite a copy of the model's
    parameters, not the model, when the caller keeps using both.

    ``on_sizes(static, guards)`` receives the dims the program keeps static ((input, dim, size)
    triples) and the size guards that fix them, instead of the default warning (``convert``
    checks them on the converted model first)."""
    args = _as_tuple(example_inputs)
    kwargs = dict(example_kwargs or {})
    if dynamic and any(isinstance(a, torch.Tensor) and a.dim() and a.shape[0] == 1 for a in (*args, *kwargs.values())):
        warnings.warn(
            "mhc_compile: an example input has batch size 1; torch.export specialises size-1 dims, so the "
            "converted model will only accept batch size 1. Use example inputs with batch size >= 2.",
            stacklevel=3,
        )
    # an already-captured program (a .pt2's module) keeps the sizes it was exported with: no news
    say = (on_sizes or _warn_sizes) if not isinstance(model, fx.GraphModule) else (lambda static, guards: None)
    errors: list = []
    tied = None  # (program, failing guards) of an all-dynamic export the model's code ties down
    for level in (["all", "batch", None] if dynamic else [None]):
        try:
            shapes = _dynamic_shapes(model, args, kwargs, level) if level else None
            ep = torch.export.export(model, args, kwargs or None, dynamic_shapes=shapes, strict=False)
        except Exception as exc:  # noqa: BLE001 - re-raised below with advice
            errors.append((level, exc))
            continue
        if level == "all":
            failing = _guards_failing_at_double(model, ep, args, kwargs)
            if failing:
                tied = (ep, failing)
                continue  # the code fixes some sequence/spatial sizes: capture those static
            say(_static_dims(ep, args, kwargs, level), [])
        elif level == "batch":
            say(_kept_static(args, kwargs) + _static_dims(ep, args, kwargs, level), tied[1] if tied else [])
        elif dynamic:
            if tied is not None:  # batch-only export failed: keep the all-dynamic program, say what ties it
                say(_static_dims(tied[0], args, kwargs, "all"), tied[1])
                return tied[0].module()
            warnings.warn(
                "mhc_compile: the model could not be exported with dynamic batch/sequence dims "
                f"({type(errors[0][1]).__name__}: {first_line(errors[0][1], 200)}); "
                "captured with static shapes, so the converted model only accepts the example input shapes.",
                stacklevel=3,
            )
        return ep.module()
    _, exc = errors[-1]
    first = first_line(exc, 500)
    eager = _eager_error(model, args, kwargs)
    if eager is not None:  # not a tracing problem: forward fails on these inputs, export or not
        raise MHCCaptureError(
            f"mhc_compile could not capture {type(model).__name__}: its forward fails on the example inputs "
            f"when run as plain Python too: {type(eager).__name__}: {first_line(eager, 500)}\n"
            f"What to try: give example inputs with the shapes and dtypes forward expects (example inputs: "
            f"{_describe(args, kwargs)}; on the command line --input-shape/--input-dtype)."
        ) from exc
    raise MHCCaptureError(
        f"mhc_compile could not capture {type(model).__name__} with torch.export(strict=False): "
        f"{type(exc).__name__}: {first}\n"
        "What to try: make forward traceable (no data-dependent Python control flow such as "
        "`if x.sum() > 0`, no .item()/.tolist() on activations; use torch.where / torch.cond), pass "
        "example_inputs as a tuple of the exact positional arguments, or use the torch.compile "
        "backend instead: torch.compile(model, backend='mhc'), which tolerates graph breaks."
    ) from exc


def _eager_error(model: nn.Module, args: tuple, kwargs: dict) -> Optional[BaseException]:
    """The error ``model`` raises on the example when simply called (eval mode, no grad), or None."""
    training = model.training
    try:
        model.eval()
    except Exception:  # noqa: BLE001 - an exported module refuses .eval(); call it as it is
        pass
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - reported as the cause
        return exc
    finally:
        try:
            model.train(training)
        except Exception:  # noqa: BLE001
            pass
    return None


def _describe(args: tuple, kwargs: dict) -> str:
    """``(2, 16) int64, mask=(2, 16) bool``: the example's tensors, for messages."""
    def one(v) -> str:
        if isinstance(v, torch.Tensor):
            return f"{tuple(v.shape)} {str(v.dtype).replace('torch.', '')}"
        return type(v).__name__

    return ", ".join([one(a) for a in args] + [f"{k}={one(v)}" for k, v in kwargs.items()]) or "none"


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
    from .forms.blocks import carry_blocks, plan_blocks
    from .forms.blocks.trace import BlockTraceError
    from .forms.state import ConvertedState, set_state
    from .forms.whole_graph import install_whole_graph
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
    carried: dict = {}
    if not reason:
        try:
            names, carried = carry_blocks(target, plan, args, kwargs, config, provider)
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
        names, whole = install_whole_graph(target, gm, fixed={k: v for k, v in captured.items() if k not in kwargs},
                                           example=(len(args), list(kwargs)))
        report.param_names = names
        report.form, report.form_reason = "whole-graph", reason
        set_state(target, ConvertedState("whole-graph", report, config, whole_graph=whole))
    else:
        report = build_report(detected, chains, config, rewritten=True, names=names)
        report.form, report.blocks = "blocks", [b.path for b in plan.blocks]
        set_state(target, ConvertedState("blocks", report, config, blocks=carried))
    for static, guards in sizes:  # only the dims the converted model really cannot vary
        _warn_sizes(*fixed_sizes(target, args, kwargs, static, guards), stacklevel=3)
    from . import engine_init
    from .io.pretrained import bind_save_pretrained, is_pretrained

    engine_init.install(target)  # the model's own init (torchtitan, HF) resets the mHC parameters

    if is_pretrained(target):
        bind_save_pretrained(target, args, kwargs)
    return target
