"""Capture: ``torch.export`` of a model (non-strict; read, not changed) into an FX GraphModule
for the residual passes, with dynamic sizes where the model allows them.

Dims are ``Dim.AUTO``: batch and sequence dims (dims 0 and 1 of rank 1-3 inputs) and the batch
and every spatial dim of rank-4+ (image) inputs. When the program's size guards would fail at
twice the example's sizes (a fixed number of patches) it exports again with only the batch
dynamic and says which dims stay static (``on_sizes``, else a warning); when export cannot make
them dynamic at all it falls back to static shapes with a warning. A capture that fails is
explained: :func:`capture` first runs the model eagerly on the example, so an example the model
cannot run is told apart from a forward torch.export cannot trace (:class:`MHCCaptureError`).
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Optional, Sequence

import torch
from torch import fx, nn

from . import _torch_internals as _ti
from .example_call import ExampleCall
from .messages import first_line


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


def _guards_failing_at_double(ep: Any, call: ExampleCall) -> list:
    """The size guards of ``ep`` that inputs with their dynamic dims doubled would fail: sizes
    (or relations between sizes) the model's code fixes, such as a fixed number of patches."""
    doubled = {}
    for name, value in call.by_parameter().items():
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


def _dynamic_shapes(call: ExampleCall, level: str = "all"):
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

    if not call.kwargs:
        return tuple(spec(a) for a in call.args)
    if not call.bound:
        raise TypeError(f"the example's keyword arguments {', '.join(call.kwargs)} do not bind to forward")
    return {name: spec(value) for name, value in call.by_parameter().items()}


def capture(model: nn.Module, example_inputs: Any, dynamic: bool = True,
            example_kwargs: Optional[dict] = None, on_sizes: Optional[Callable] = None) -> fx.GraphModule:
    """Export ``model`` (non-strict; the model is read, not changed) and return the unlifted
    GraphModule. Its parameters are the model's own tensors: rewrite a copy of the model's
    parameters, not the model, when the caller keeps using both.

    ``on_sizes(static, guards)`` receives the dims the program keeps static ((input, dim, size)
    triples) and the size guards that fix them, instead of the default warning (``convert``
    checks them on the converted model first). ``example_inputs`` is the positional tuple (with
    ``example_kwargs``) or the :class:`ExampleCall` of the conversion, already bound."""
    call = (example_inputs if isinstance(example_inputs, ExampleCall)
            else ExampleCall.bind(model, _as_tuple(example_inputs), example_kwargs))
    args, kwargs = call.args, call.kwargs
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
            shapes = _dynamic_shapes(call, level) if level else None
            ep = torch.export.export(model, args, kwargs or None, dynamic_shapes=shapes, strict=False)
        except Exception as exc:  # noqa: BLE001 - re-raised below with advice
            errors.append((level, exc))
            continue
        if level == "all":
            failing = _guards_failing_at_double(ep, call)
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
    wrong_inputs = inputs_error(model, args, kwargs)
    if wrong_inputs is not None:  # not a tracing problem: forward fails on these inputs, export or not
        raise wrong_inputs from exc
    raise MHCCaptureError(
        f"mhc_compile could not capture {type(model).__name__} with torch.export(strict=False): "
        f"{type(exc).__name__}: {first}\n"
        "What to try: make forward traceable (no data-dependent Python control flow such as "
        "`if x.sum() > 0`, no .item()/.tolist() on activations; use torch.where / torch.cond), pass "
        "example_inputs as a tuple of the exact positional arguments, or use the torch.compile "
        "backend instead: torch.compile(model, backend='mhc'), which tolerates graph breaks."
    ) from exc


def inputs_error(model: nn.Module, args: tuple, kwargs: dict) -> Optional[MHCCaptureError]:
    """The error to raise when ``model``'s forward fails on the example when simply called (the
    inputs' shapes or dtypes are wrong, not the tracing), or None when it runs. The CLI checks
    inputs made from ``--input-shape``/``--input-dtype`` with it before any capture: some
    mistakes (float indices into ``nn.Embedding``) export without an error on torch 2.11."""
    eager = _eager_error(model, args, kwargs)
    if eager is None:
        return None
    return MHCCaptureError(
        f"mhc_compile could not capture {type(model).__name__}: its forward fails on the example inputs "
        f"when run as plain Python too: {type(eager).__name__}: {first_line(eager, 500)}\n"
        f"What to try: give example inputs with the shapes and dtypes forward expects (example inputs: "
        f"{_describe(args, kwargs)}; on the command line --input-shape/--input-dtype)."
    )


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
