"""Shape and dtype ops a residual stream survives: recognise them on a value, restate them on n streams.

A channel-last stream value ``x`` of shape ``(*lead, C)`` becomes the n-stream tensor
``X: (*lead, n, C)``. An op that only rearranges the leading dims and keeps ``C`` last can be
applied to every stream at once by restating it on ``X`` with the stream axis kept just before
``C``:

* ``view`` / ``reshape`` / ``_unsafe_view`` to ``(*lead', C)``  ->  ``(*lead', n, C)``
  (row-major order keeps every row of C elements whole, so this is exact);
* ``flatten`` / ``unflatten`` / ``transpose`` / ``roll`` over leading dims only -> the same dims;
* ``permute`` that keeps the last dim last -> the leading permutation, then ``(n, C)``;
* ``contiguous`` / ``clone`` / ``alias`` and casts (``to``, ``_to_copy``, ``float``, ...) -> as is.

This covers a decoder layer that flattens its hidden states to ``(B*T, C)`` for the MLP, and the
window partition / reverse (and shift) of windowed attention. A stream whose channel axis (read
from the graph, ``axis``) is not last, such as a conv net's (N, C, H, W), only gets the
shape-preserving ops. Works on aten (export) and
torch-level (Dynamo) spellings.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import fx

from .nodes import node_val, target_name

_RESHAPES = {"view", "reshape", "_unsafe_view"}
_SAME_ARGS = {"contiguous", "clone", "alias", "detach"}
CASTS = {"to", "_to_copy", "float", "half", "bfloat16", "double", "type", "type_as"}
# op: the (position after the tensor, keyword) of each dim argument that must be a leading dim
_LEADING_DIM_OPS = {"flatten": ((0, "start_dim"), (1, "end_dim")), "unflatten": ((0, "dim"),),
                    "transpose": ((0, "dim0"), (1, "dim1")), "swapaxes": ((0, "axis0"), (1, "axis1"))}
_KNOWN_KWARGS = {"start_dim", "end_dim", "dim", "sizes", "dim0", "dim1", "axis0", "axis1", "shifts", "dims"}


def _shape(v: Any) -> Optional[tuple]:
    shape = getattr(v, "shape", None)
    return tuple(str(d) for d in shape) if shape is not None else None


def _rest(node: fx.Node) -> list:
    """The arguments after the tensor, with ``x.view(a, b)`` and ``x.view((a, b))`` alike."""
    rest = list(node.args[1:])
    if len(rest) == 1 and isinstance(rest[0], (list, tuple)):
        return list(rest[0])
    return rest


def _positional(node: fx.Node) -> list:
    """The node's arguments after the tensor, with the dim keywords of the ops below made positional."""
    args = list(node.args[1:])
    name = target_name(node)
    names = [kw for _, kw in _LEADING_DIM_OPS.get(name, ())]
    if name == "unflatten":
        names = ["dim", "sizes"]
    elif name == "roll":
        names = ["shifts", "dims"]
    for i, kw in enumerate(names):
        if kw in node.kwargs:
            while len(args) < i:
                args.append(None)
            args[i:i + 1] = [node.kwargs[kw]]
    return args


def _norm(d: Any, rank: int) -> Optional[int]:
    if not isinstance(d, int) or isinstance(d, bool):
        return None
    return d + rank if d < 0 else d


def view_kind(node: fx.Node, stream: fx.Node) -> Optional[str]:
    """'reshape', 'permute', 'leading', 'roll', 'same' or 'cast' when ``node`` applied to the
    channel-last ``stream`` keeps every row of C channels whole and last; None otherwise."""
    if node.op not in ("call_function", "call_method") or not node.args or node.args[0] is not stream:
        return None
    vin, vout = node_val(stream), node_val(node)
    sin, sout = _shape(vin), _shape(vout)
    if sin is None or sout is None or not sin or not sout:
        return None
    if not getattr(getattr(vout, "dtype", None), "is_floating_point", False):
        return None
    if any(isinstance(a, fx.Node) and a is not stream and node_val(a) is not None
           and isinstance(node_val(a), torch.Tensor) for a in node.all_input_nodes):
        return None  # reads another tensor (type_as / view_as of something else)
    name, rank = target_name(node), len(sin)
    if name in _SAME_ARGS or name in CASTS:
        return ("cast" if name in CASTS else "same") if sout == sin else None
    if set(node.kwargs) - _KNOWN_KWARGS or sout[-1] != sin[-1]:
        return None
    if name in _RESHAPES:
        if node.kwargs:
            return None
        shape = _rest(node)
        return "reshape" if shape and all(not isinstance(s, torch.dtype) for s in shape) else None
    if name == "permute":
        if node.kwargs:
            return None
        dims = [_norm(d, rank) for d in _rest(node)]
        return "permute" if len(dims) == rank and dims[-1] == rank - 1 and None not in dims else None
    args = _positional(node)
    if name in _LEADING_DIM_OPS:
        # flatten to the end (end_dim omitted) would swallow the channels: dims missing are refused
        dims = [_norm(args[i], rank) if len(args) > i else None for i, _ in _LEADING_DIM_OPS[name]]
        return "leading" if all(d is not None and d < rank - 1 for d in dims) else None
    if name == "roll" and len(args) >= 2 and args[1] is not None:
        dims = args[1] if isinstance(args[1], (list, tuple)) else [args[1]]
        dims = [_norm(d, rank) for d in dims]
        return "roll" if dims and all(d is not None and d < rank - 1 for d in dims) else None
    return None


def restate(node: fx.Node, X: fx.Node, n: int) -> tuple[tuple, dict]:
    """(args, kwargs) that apply ``node``'s op to the n-stream tensor ``X`` (stream axis before C)."""
    kind = view_kind(node, node.args[0])
    rank = len(_shape(node_val(node.args[0])))
    if kind in ("same", "cast"):
        return (X, *node.args[1:]), dict(node.kwargs)
    if kind == "reshape":
        shape = _rest(node)
        return (X, [*shape[:-1], n, shape[-1]]), {}
    if kind == "permute":
        dims = [_norm(d, rank) for d in _rest(node)]
        return (X, [*dims[:-1], rank - 1, rank]), {}
    args = _positional(node)
    if kind == "leading":
        for i, _ in _LEADING_DIM_OPS[target_name(node)]:
            args[i] = _norm(args[i], rank)
        return (X, *args), {}
    if kind == "roll":
        dims = args[1] if isinstance(args[1], (list, tuple)) else [args[1]]
        return (X, args[0], [_norm(d, rank) for d in dims]), {}
    raise ValueError(f"{node.name} ({target_name(node)}) is not an op the stream survives")

