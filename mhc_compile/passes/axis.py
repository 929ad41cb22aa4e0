"""The channel axis of a residual stream, derived from what the graph does with it, never from the rank.

A site mixes its n streams over the channel axis C, one position at a time. Which dim of the
stream that is, is read off the ops that use the stream:

* a ``linear`` / ``matmul`` / ``mm`` / ``addmm`` / ``bmm`` / attention contracts its input's last
  dim (the right operand of a matmul: its dim -2);
* a conv, ``batch_norm``, ``group_norm`` or ``instance_norm`` reads dim 1;
* ``layer_norm`` / ``rms_norm`` normalize the trailing ``len(normalized_shape)`` dims.

Between the stream and such an op the walk follows the ops that move dims without mixing them
(elementwise ops and broadcasts, casts, dropout, ``permute`` / ``transpose`` / ``movedim``,
``view`` / ``reshape`` / ``flatten`` / ``unflatten`` / ``(un)squeeze`` / ``expand`` / ``pad``,
slicing), keeping for every dim the stream dims it came from. So HF ConvNeXt's permute to
channels-last and SAM's window partition are seen through. A path ends at its first such op.

Evidence comes from the branch (walking from ``x`` inside the site's region), from the skip side
(what the op producing ``x`` writes, and what the consumers after the add read) and must name one
dim, the same everywhere; :func:`decide` returns it, or a reason when the branch names several
dims at once (a flattened ``(n, C)`` state contracted together), the uses disagree, or nothing
tells (a branch that tells nothing, such as an FFT, takes the skip side's word).
"""
from __future__ import annotations

import operator
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from torch import fx, nn

from .nodes import node_val, same_dim, target_name

_LAST = {"linear", "scaled_dot_product_attention", "_scaled_dot_product_flash_attention",
         "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention"}
_MATMUL = {"matmul", "mm", "bmm", "__matmul__"}
_DIM1 = {"conv1d", "conv2d", "conv3d", "convolution", "_convolution", "conv_transpose1d", "conv_transpose2d",
         "conv_transpose3d", "batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training",
         "_native_batch_norm_legit_functional", "native_batch_norm", "cudnn_batch_norm", "instance_norm",
         "group_norm", "native_group_norm"}
_TRAILING = {"layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm"}
_SAME = {
    "relu", "relu_", "gelu", "silu", "sigmoid", "tanh", "elu", "leaky_relu", "hardtanh", "relu6", "mish",
    "hardswish", "hardsigmoid", "softplus", "dropout", "dropout_", "feature_dropout", "alpha_dropout", "neg",
    "exp", "log", "pow", "rsqrt", "sqrt", "abs", "square", "reciprocal", "erf", "sin", "cos", "clamp", "clamp_min",
    "clamp_max", "clone", "contiguous", "to", "_to_copy", "float", "half", "bfloat16", "double", "type", "type_as",
    "detach", "alias", "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "truediv", "__add__", "__radd__",
    "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__", "__rtruediv__", "__iadd__", "rsub", "where",
    "maximum", "minimum", "masked_fill", "softmax", "_softmax", "log_softmax", "roll", "identity", "native_dropout",
    "lerp", "addcmul", "expand_as",
}
_MODULE_LAST = (nn.Linear, nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm), nn.MultiheadAttention)
_MODULE_DIM1 = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.GroupNorm,
                nn.modules.instancenorm._InstanceNorm)
_MODULE_SAME = (nn.Dropout, nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Identity, nn.LeakyReLU)

DimMap = tuple  # per dim of a value: frozenset of the stream dims it holds
UNKNOWN = "the channel axis cannot be known"


@dataclass
class Evidence:
    """What the walks found: (stream dims read as channels, the op that read them) per path."""

    branch: list = field(default_factory=list)
    skip: list = field(default_factory=list)


def _shape(node: Any) -> Optional[tuple]:
    shape = getattr(node_val(node), "shape", None)
    return tuple(shape) if shape is not None else None


def _norm(d: Any, rank: int) -> Optional[int]:
    if not isinstance(d, int) or isinstance(d, bool):
        return None
    return d + rank if d < 0 else d if 0 <= d < rank else None


def _arg(node: fx.Node, i: int, kw: str, default: Any = None) -> Any:
    return node.args[i] if len(node.args) > i else node.kwargs.get(kw, default)


def _module(node: fx.Node) -> Optional[nn.Module]:
    gm = getattr(node.graph, "owning_module", None)
    try:
        return gm.get_submodule(node.target) if gm is not None else None
    except AttributeError:
        return None


def _reads(node: fx.Node, src: fx.Node, dmap: DimMap) -> Optional[frozenset]:
    """The stream dims ``node`` reads as channels when it takes ``src`` (mapped by ``dmap``), else None."""
    rank = len(dmap)
    if node.op == "call_module":
        mod = _module(node)
        if not node.args or node.args[0] is not src:
            return None
        if isinstance(mod, _MODULE_DIM1) and rank >= 2:
            return dmap[1]
        if isinstance(mod, (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm))):
            k = len(mod.normalized_shape)
            return frozenset().union(*dmap[rank - k:])
        return dmap[-1] if isinstance(mod, _MODULE_LAST) else None
    if node.op not in ("call_function", "call_method") or not rank:
        return None
    name = target_name(node)
    first = node.args[0] if node.args else None
    if name in _LAST and src in node.args[:3]:
        return dmap[-1]
    if name in _MATMUL or name in ("addmm", "baddbmm"):
        left, right = (node.args[1], node.args[2]) if name in ("addmm", "baddbmm") else node.args[:2]
        if src is left:
            return dmap[-1]
        if src is right and rank >= 2:
            return dmap[-2]
        return None
    if name in _DIM1 and first is src and rank >= 2:
        return dmap[1]
    if name in _TRAILING and first is src:
        shape = _arg(node, 1, "normalized_shape")
        k = len(shape) if isinstance(shape, (list, tuple)) else 1
        return frozenset().union(*dmap[rank - k:])
    return None


def _group(sin: tuple, sout: tuple, dmap: DimMap) -> Optional[DimMap]:
    """The map of a reshape from ``sin`` to ``sout``: dims grouped where their products agree."""
    out, i, j = [], 0, 0
    while i < len(sin) or j < len(sout):
        if j < len(sout) and (i == len(sin) or (same_dim(sout[j], 1) and not same_dim(sin[i], 1))):
            out.append(frozenset())
            j += 1
            continue
        if i < len(sin) and same_dim(sin[i], 1) and (j == len(sout) or not same_dim(sout[j], 1)):
            i += 1
            continue
        if i == len(sin) or j == len(sout):
            return None
        pi, pj, gi, gj = sin[i], sout[j], [i], [j]
        for _ in range(16):
            if same_dim(pi, pj):
                break
            if _le(pi, pj) and gi[-1] + 1 < len(sin):
                gi.append(gi[-1] + 1)
                pi = pi * sin[gi[-1]]
            elif gj[-1] + 1 < len(sout):
                gj.append(gj[-1] + 1)
                pj = pj * sout[gj[-1]]
            else:
                return None
        else:
            return None
        held = frozenset().union(*(dmap[k] for k in gi))
        out += [held] * len(gj)
        i, j = gi[-1] + 1, gj[-1] + 1
    return tuple(out)


def _le(a: Any, b: Any) -> bool:
    try:
        return bool(a <= b)
    except Exception:  # noqa: BLE001 - a symbolic size torch cannot order: assume the smaller side grows
        return True


def _moves(node: fx.Node, src: fx.Node, dmap: DimMap) -> Optional[DimMap]:
    """The map of ``node``'s output when it moves ``src``'s dims without mixing them, else None."""
    if node.op == "call_module":
        ok = isinstance(_module(node), _MODULE_SAME) and node.args and node.args[0] is src
        return dmap if ok else None
    if node.op not in ("call_function", "call_method"):
        return None
    name, rank = target_name(node), len(dmap)
    if node.target is operator.getitem:
        return dmap if node.args[1] == 0 and target_name(src) in ("native_dropout", "native_layer_norm") else None
    sout = _shape(node)
    if sout is None or any(isinstance(a, fx.Node) and a is src for a in node.args[1:]) and name not in _SAME:
        return None
    if name in _SAME:
        if len(sout) < rank:
            return None
        sin = _shape(src) or ()
        kept = tuple(frozenset() if (k < len(sin) and same_dim(sin[k], 1) and not same_dim(sout[len(sout) - rank + k], 1))
                     else d for k, d in enumerate(dmap))
        return (frozenset(),) * (len(sout) - rank) + kept
    if node.args[0] is not src:
        return None
    rest = node.args[1:]
    if name == "permute":
        dims = list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else list(rest)
        dims = [_norm(d, rank) for d in dims]
        return tuple(dmap[d] for d in dims) if None not in dims and len(dims) == rank else None
    if name in ("transpose", "swapaxes", "movedim", "t"):
        if name == "t":
            return tuple(reversed(dmap))
        a, b = _norm(_arg(node, 1, "dim0"), rank), _norm(_arg(node, 2, "dim1"), rank)
        if a is None or b is None:
            return None
        out = list(dmap)
        if name == "movedim":
            out.insert(b, out.pop(a))
        else:
            out[a], out[b] = out[b], out[a]
        return tuple(out)
    if name == "unsqueeze":
        d = _norm(_arg(node, 1, "dim"), rank + 1)
        return None if d is None else dmap[:d] + (frozenset(),) + dmap[d:]
    if name in ("slice", "narrow", "constant_pad_nd", "pad", "expand", "select", "squeeze", "unflatten", "flatten",
                "view", "reshape", "_unsafe_view"):
        sin = _shape(src)
        if name in ("slice", "narrow", "constant_pad_nd", "pad"):
            return dmap if len(sout) == rank else None
        if name == "expand" and len(sout) >= rank:
            return _moves_expand(sin, sout, dmap)
        if name == "select":
            d = _norm(_arg(node, 1, "dim"), rank)
            return None if d is None else dmap[:d] + dmap[d + 1:]
        return _group(sin, sout, dmap) if sin is not None else None
    return None


def _moves_expand(sin: tuple, sout: tuple, dmap: DimMap) -> DimMap:
    lead = len(sout) - len(sin)
    kept = tuple(frozenset() if same_dim(sin[k], 1) and not same_dim(sout[lead + k], 1) else d
                 for k, d in enumerate(dmap))
    return (frozenset(),) * lead + kept


def walk_reads(start: fx.Node, allowed: Optional[set] = None, max_nodes: int = 400) -> list:
    """[(stream dims, op node)] for every path from ``start`` that ends at an op reading channels;
    paths stay inside ``allowed`` (all of the graph when None)."""
    shape = _shape(start)
    if shape is None:
        return []
    found, seen = [], {start}
    queue = deque([(start, tuple(frozenset({k}) for k in range(len(shape))))])
    while queue and len(seen) < max_nodes:
        v, dmap = queue.popleft()
        for u in list(v.users):
            if u in seen or (allowed is not None and u not in allowed):
                continue
            read = _reads(u, v, dmap)
            if read is not None:
                found.append((read, u))
                continue
            moved = _moves(u, v, dmap)
            if moved is not None:
                seen.add(u)
                queue.append((u, moved))
    return found


def _written(x: fx.Node) -> list:
    """[(stream dims, op)] from the op that produced ``x``, seen back through casts and permutes."""
    perm: Optional[list] = None
    node = x
    for _ in range(6):
        rank = len(_shape(node) or ())
        if not rank or node.op not in ("call_function", "call_method", "call_module"):
            return []
        name = target_name(node)
        if name in _LAST or name in _MATMUL or name in ("addmm", "embedding"):
            dim = rank - 1
        elif name in _DIM1 or (node.op == "call_module" and isinstance(_module(node), _MODULE_DIM1)):
            dim = 1
        elif name in _TRAILING and node.op != "call_module":
            shape = _arg(node, 1, "normalized_shape")
            if isinstance(shape, (list, tuple)) and len(shape) != 1:
                return []
            dim = rank - 1
        elif name == "permute" and node.args and isinstance(node.args[0], fx.Node):
            rest = node.args[1:]
            dims = list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else list(rest)
            step = [_norm(d, rank) for d in dims]
            if None in step:
                return []
            perm = step if perm is None else [step[p] for p in perm]
            node = node.args[0]
            continue
        elif name in _SAME and node.args and isinstance(node.args[0], fx.Node) and _shape(node.args[0]) is not None \
                and len(_shape(node.args[0])) == rank:
            node = node.args[0]
            continue
        else:
            return []
        if perm is not None:
            if dim not in perm:
                return []
            dim = perm.index(dim)
        return [(frozenset({dim}), node)]
    return []


def gather(x: fx.Node, skip: fx.Node, add: fx.Node, region: set) -> Evidence:
    """The evidence of one site: the branch's reads of ``x``, and on the skip side what wrote
    ``skip`` and what the consumers after ``add`` read (the stream's dims, ``skip``'s rank)."""
    ev = Evidence(branch=walk_reads(x, allowed=region))
    ev.skip = _written(skip) + walk_reads(add, max_nodes=120)
    return ev


def decide(ev: Evidence) -> Union[int, str]:
    """The channel axis the evidence names, or why it names none."""
    def say(items):
        return ", ".join(f"{target_name(n)} {n.name} reads {_dims(d)}" for d, n in items[:4])

    joint = [(d, n) for d, n in ev.branch if len(d) > 1]
    if joint:
        return f"the branch reads several stream dims as one feature axis ({say(joint)}): a multi-stream state?"
    named = {next(iter(d)) for d, _ in ev.branch + ev.skip if len(d) == 1}
    if not named:
        return (UNKNOWN + ": neither the branch nor the uses of the stream reach an op "
                "that tells it (a linear, matmul, conv or norm) through ops that keep the dims apart")
    if len(named) != 1:
        return f"the channel axis is ambiguous: the uses of the stream disagree ({say(ev.branch + ev.skip)})"
    return next(iter(named))


def _dims(d: frozenset) -> str:
    return "dim " + "+".join(str(k) for k in sorted(d)) if d else "no stream dim"
