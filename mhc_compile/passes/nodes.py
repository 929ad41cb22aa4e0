"""What an FX node is, in the words the passes use: its operation's short name
(:func:`target_name`), its recorded example value (:func:`node_val`, :func:`tensor_info`), whether
it carries tensor data (:func:`carries_tensor`), and the module path it runs in
(:func:`module_path`, from ``nn_module_stack`` with Dynamo's spellings made dotted).

One home for node naming: detection, streams, rewrite and rendering read nodes through these.
Works on export (aten), Dynamo (torch-level) and ``symbolic_trace`` + ShapeProp graphs.
"""
from __future__ import annotations

import re
from typing import Any, Optional

import torch
from torch import fx

# Ops whose outputs do not depend on the *values* of their tensor inputs (shape/dtype only).
_SHAPE_ONLY_NAMES = {
    "size", "dim", "sym_size", "sym_numel", "sym_stride", "numel", "stride", "zeros_like",
    "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "randint_like",
    "new_zeros", "new_ones", "new_empty", "new_full", "_assert_tensor_metadata", "sym_storage_offset",
    "_guards_fn", "is_floating_point", "is_contiguous", "get_device", "_local_scalar_dense",
}


def target_name(node: fx.Node) -> str:
    """A short, flavour-independent name for a node's operation: 'add', 'linear', 'layer_norm', ..."""
    t = node.target
    if node.op == "call_method":
        return str(t)
    if node.op == "call_module":
        return "call_module"
    if node.op != "call_function":
        return node.op
    packet = getattr(t, "overloadpacket", None)  # torch.ops.<ns>.<op>.<overload>
    if packet is not None:
        return packet.__name__
    return getattr(t, "__name__", str(t))



def node_val(node: Any) -> Any:
    """The example/fake value recorded on a node (export: meta['val'], Dynamo: meta['example_value'])."""
    if not isinstance(node, fx.Node):
        return None
    for key in ("val", "example_value"):
        if key in node.meta:
            return node.meta[key]
    tm = node.meta.get("tensor_meta")
    return tm


def tensor_info(node: Any) -> Optional[tuple[tuple[str, ...], Any, int]]:
    """(shape as strings, dtype, rank) when the node is known to hold one tensor, else None."""
    v = node_val(node)
    if v is None or (isinstance(v, (list, tuple, dict)) and not hasattr(v, "dtype")):
        return None
    shape = getattr(v, "shape", None)
    dtype = getattr(v, "dtype", None)
    if shape is None or dtype is None:
        return None
    return tuple(str(d) for d in shape), dtype, len(shape)


def same_dim(x: Any, y: Any) -> bool:
    """Whether two sizes are equal: ints by value, symbolic sizes when torch can prove it (the
    window reverse of a padded Swin block gives ``(B*((H+p)//2)...)//...`` where the skip has
    ``B``; the two are equal under the capture's guards, not as text)."""
    if isinstance(x, int) and isinstance(y, int):
        return x == y
    if str(x) == str(y):
        return True
    try:
        from torch.fx.experimental.symbolic_shapes import statically_known_true
    except ImportError:  # pragma: no cover
        return False
    try:
        return bool(statically_known_true(x == y))
    except Exception:  # noqa: BLE001 - an expression torch cannot decide is not equal for us
        return False


def same_shape(a: Any, b: Any) -> bool:
    """Whether two nodes (or values) hold tensors of provably the same shape."""
    va = node_val(a) if isinstance(a, fx.Node) else a
    vb = node_val(b) if isinstance(b, fx.Node) else b
    sa, sb = getattr(va, "shape", None), getattr(vb, "shape", None)
    if sa is None or sb is None or len(sa) != len(sb):
        return False
    return all(same_dim(x, y) for x, y in zip(sa, sb))


def carries_tensor(node: fx.Node) -> bool:
    """Whether a node's value carries tensor data (so it contributes data-flow edges)."""
    if node.op == "output":
        return False
    v = node_val(node)
    if v is None:
        return target_name(node) not in _SHAPE_ONLY_NAMES and node.target != "shape"
    if isinstance(v, torch.Tensor) or (hasattr(v, "dtype") and hasattr(v, "shape")):
        return True  # a tensor, or ShapeProp's TensorMetadata
    if isinstance(v, (list, tuple)):
        return any(isinstance(e, torch.Tensor) or hasattr(e, "dtype") for e in v)
    return False


_ROOT_PREFIXES = [
    re.compile(r"^(?:L|G)\[['\"][^'\"]+['\"]\]"),      # L['self'].blocks, G['model'].x
    re.compile(r"^(?:L|G)__[A-Za-z0-9_]+?__?_(?=.)"),     # L__self___blocks_0 (old flat names)
    re.compile(r"^(?:L|G)__[A-Za-z0-9]+__$"),            # L__self__ (the root itself)
    re.compile(r"^self(?=\.|$)"),                        # self.blocks.0
]
_ITEMS = [
    (re.compile(r"\.?_modules\[['\"]([^'\"]+)['\"]\]"), r".\1"),  # ._modules['blocks'] -> .blocks
    (re.compile(r"\[['\"]?([^'\"\]]+)['\"]?\]"), r".\1"),         # [0], ['x'] -> .0, .x
]


def normalize_path(path: str) -> str:
    """A module path as a dotted path relative to the compiled root, from any spelling Dynamo,
    export or FX use: ``L['self'].blocks[0]``, ``getattr(L['self'].a, '0')``,
    ``L['self']._modules['blocks']._modules['0']``, ``L__self___blocks_0``, ``self.blocks.0``.
    ``L['self']`` alone is the root (``""``); plain dotted paths pass through."""
    p = str(path).strip()
    prev = None
    while prev != p:  # getattr(getattr(L['self'].a, '0'), 'b') -> L['self'].a.0.b
        prev = p
        p = re.sub(r"getattr\(([^()]*), '([^']+)'\)", r"\1.\2", p)
    for pat in _ROOT_PREFIXES:
        m = pat.match(p)
        if m:
            p = p[m.end():]
            break
    for pat, rep in _ITEMS:
        p = pat.sub(rep, p)
    return p.strip(".")


def module_stack(node: fx.Node) -> list[str]:
    """Module paths enclosing ``node``, outermost first (empty when unknown)."""
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for value in stack.values():
        path = value[0] if isinstance(value, (tuple, list)) else value
        path = normalize_path(path)
        if "nn_module_stack" in path:
            continue
        if path and path not in out:
            out.append(path)
    return out


def module_path(node: fx.Node) -> str:
    """The innermost module path ``node`` runs in (``""`` at the root or when unknown)."""
    stack = module_stack(node)
    return stack[-1] if stack else ""
