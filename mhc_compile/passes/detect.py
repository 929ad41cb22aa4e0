"""Residual-site detection on ``torch.fx`` graphs (torch-level Dynamo graphs and aten-level export graphs).

A *site* is an add ``x + f(x)``:

* the node is an add in any spelling: ``operator.add`` / ``operator.iadd``, ``torch.add``
  (``alpha=`` scales the second operand), ``Tensor.add`` / ``add_`` / ``__add__`` / ``__iadd__``,
  ``aten.add.Tensor`` / ``aten.add_.Tensor``; either operand order;
* both operands are tensors of the same shape; their dtypes may differ when the sum is in the
  skip operand's dtype (a bf16 branch added to an fp32 residual);
* the skip operand is ``x`` itself, or ``x`` through casts, copies and channel-keeping reshapes
  (``residual = x.to(torch.float32)``, the residual-in-fp32 pattern of SSM blocks): then
  ``site.skip_path`` holds those ops, f reads ``x`` and the rewrite applies them to the streams;
* one operand ``x`` is an ancestor of the other ``y = f(x)`` in the *data-flow* graph (a networkx
  DiGraph of the FX graph whose edges carry tensor values only: shape queries such as
  ``sym_size`` / ``size`` and value-independent factories such as ``ones_like`` carry no edge);
* ``f`` does real work: the region of f (descendants of x that are ancestors of y) contains a
  heavy op (matmul / linear / conv / attention / embedding / pooling / FFT / scan / a submodule call). ``x + 0.04 * x**3``
  inside a GELU, or ConvNeXt-V2's GRN ``gamma * (x * N(x)) + beta + x`` (elementwise with
  parameters), are *not* sites ("branch does no work").

Special forms:

* parallel residual ``x + attn(ln(x)) + mlp(ln(x))`` is one site whose f is the sum of the
  branches (the inner add's only user is the outer add, whose other operand depends on x but
  not on the inner add);
* layer scale ``x + gamma * f(x)`` is a site whose f includes the scale;
* a site whose f contains another site's add (a residual around residuals) is not taken, and
  of several sites reading the same skip operand only the first is taken.

Feature axis (the axis the streams mix over): derived per site from what the branch and the
skip side do with the stream (``axis``: a linear contracts the last dim, a conv reads dim 1, ...);
a site whose axis cannot be known or whose uses disagree is not taken, with the reason. An add
on a state that already carries a stream axis (native hyper-connections, ``native``) is not a
site. The rewrite moves the feature axis last around the mHC ops, so the stream tensor is (..., n, C).

Every add with two tensor operands that is not taken is reported with a reason.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Optional

import networkx as nx
import torch
from torch import fx

from .nodes import (
    _SHAPE_ONLY_NAMES, carries_tensor, module_path, module_stack, node_val, same_shape, target_name, tensor_info,
)

aten = torch.ops.aten

# ----------------------------------------------------------------------------- op tables
_ADD_FUNCS = {operator.add, operator.iadd, torch.add, torch.Tensor.add, torch.Tensor.add_,
              torch.Tensor.__add__, torch.Tensor.__iadd__, torch.Tensor.__radd__}
_INPLACE_FUNCS = {operator.iadd, torch.Tensor.add_, torch.Tensor.__iadd__}
_ADD_METHODS = {"add", "add_", "__add__", "__iadd__", "__radd__"}
_INPLACE_METHODS = {"add_", "__iadd__"}
_ATEN_ADDS = {aten.add.Tensor, aten.add_.Tensor}
_ATEN_INPLACE = {aten.add_.Tensor}

# View ops: an in-place add into their output mutates their base.
_VIEW_NAMES = {
    "getitem", "__getitem__", "slice", "select", "view", "transpose", "permute", "narrow", "as_strided",
    "expand", "unsqueeze", "squeeze", "unflatten", "split", "chunk", "unbind", "diagonal", "t", "alias",
    "view_as", "movedim", "swapaxes", "_unsafe_view",
}
from mhc_compile.passes.work_ops import HEAVY_NAMES as _HEAVY_NAMES  # noqa: E402
from mhc_compile.passes.stream_views import view_kind  # noqa: E402
from mhc_compile.passes import axis as _axis, native as _native  # noqa: E402



def is_add(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _ADD_FUNCS or node.target in _ATEN_ADDS
    return node.op == "call_method" and node.target in _ADD_METHODS


def is_inplace_add(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _INPLACE_FUNCS or node.target in _ATEN_INPLACE
    return node.op == "call_method" and node.target in _INPLACE_METHODS


def add_operands(node: fx.Node) -> tuple[Any, Any, Any]:
    """(first, second, alpha) of an add; alpha scales the second operand."""
    args = list(node.args)
    first = args[0] if args else node.kwargs.get("input", node.kwargs.get("self"))
    second = args[1] if len(args) > 1 else node.kwargs.get("other")
    alpha = node.kwargs.get("alpha", args[2] if len(args) > 2 else 1)
    if node.op == "call_method" and node.target == "__radd__" or node.target is torch.Tensor.__radd__:
        first, second = second, first
    return first, second, alpha




# ----------------------------------------------------------------------------- results
@dataclass
class Site:
    """One residual site ``add = x + sum_k scale_k * branch_k``."""

    add: fx.Node                 # the node whose value is the site's output
    x: fx.Node                   # the skip operand (the residual stream)
    branches: list               # [(branch output node, scale)]; more than one for parallel blocks
    region: set                  # nodes of f (between x and the branch outputs)
    inner_adds: list             # adds absorbed into a parallel site
    shape: tuple
    dtype: Any
    feature_axis: int
    module_path: str             # module path of the add
    branch_path: str             # module path of the branch (best single module), '' if none
    kind: str = "residual"       # residual | parallel | layer_scale
    inplace: bool = False
    # casts / copies / reshapes from x to the add's skip operand (``residual.to(torch.float32)``):
    # f reads x, the add reads skip_path[-1]; the rewrite applies them to the streams before post_res
    skip_path: list = field(default_factory=list)
    # filled by build_chains / the rewrite
    chain: int = -1
    index_in_chain: int = -1
    name: str = ""               # parameter prefix, e.g. 'blocks.0.attn.mhc'

    @property
    def channels(self) -> int:
        v = node_val(self.add)
        return int(v.shape[self.feature_axis])


@dataclass
class NotTaken:
    node: str
    module_path: str
    reason: str


@dataclass
class DetectResult:
    sites: list
    not_taken: list
    dataflow: Any = field(repr=False, default=None)
    native: list = field(default_factory=list)   # native.NativeStreams: states already multi-stream


# ----------------------------------------------------------------------------- data-flow graph
def normalize_inplace(graph: fx.Graph) -> None:
    """Make in-place adds explicit: later readers of the mutated operand read the add's result.

    ``y.add_(x)`` (or ``out += sc``) returns its mutated first operand, so a node after it that
    reads ``y`` reads the same tensor as one that reads the add. Redirecting those reads keeps the
    program's meaning and makes the data flow visible to reachability.
    """
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        if not (is_add(node) and is_inplace_add(node)):
            continue
        first, _, _ = add_operands(node)
        if not isinstance(first, fx.Node):
            continue
        for user in list(first.users):
            if user is not node and order[user] > order[node]:
                user.replace_input_with(first, node)


def dataflow_graph(graph: fx.Graph) -> nx.DiGraph:
    """networkx DiGraph of tensor data flow between FX nodes (shape-only edges dropped)."""
    g = nx.DiGraph()
    for node in graph.nodes:
        g.add_node(node)
        if target_name(node) in _SHAPE_ONLY_NAMES:
            continue
        for inp in node.all_input_nodes:
            if carries_tensor(inp):
                g.add_edge(inp, node)
    return g


def _is_param_node(node: fx.Node) -> bool:
    if node.op == "get_attr":
        return True
    if node.op == "placeholder":
        name = node.name
        return "_parameters_" in name or "_buffers_" in name or name.startswith("p_") or name.startswith("b_")
    return False


def _is_heavy(node: fx.Node) -> bool:
    """A matmul / linear / conv / attention / embedding, or a submodule call: real work for a branch."""
    if node.op == "call_module":
        return True
    return node.op in ("call_function", "call_method") and target_name(node) in _HEAVY_NAMES


def _does_work(node: fx.Node) -> bool:
    """Heavy, or reads a parameter (used to weigh where a branch's work lives, for naming)."""
    if node.op == "call_module":
        return True
    if node.op not in ("call_function", "call_method"):
        return False
    if target_name(node) in _HEAVY_NAMES:
        return True
    return any(_is_param_node(a) for a in node.all_input_nodes)


class _Reach:
    """Cached ancestor / descendant sets on the data-flow graph."""

    def __init__(self, g: nx.DiGraph):
        self.g = g
        self._anc: dict = {}
        self._desc: dict = {}

    def anc(self, n):
        if n not in self._anc:
            self._anc[n] = nx.ancestors(self.g, n)
        return self._anc[n]

    def desc(self, n):
        if n not in self._desc:
            self._desc[n] = nx.descendants(self.g, n)
        return self._desc[n]


def _work_weight(node: fx.Node) -> int:
    """1 plus the number of parameter elements the node reads."""
    w = 1
    for a in node.all_input_nodes:
        if _is_param_node(a):
            v = node_val(a)
            w += int(v.numel()) if hasattr(v, "numel") else 0
    return w


def _branch_path(region: set, add_path: str, kind: str) -> str:
    """Readable owner of a site's parameters: the deepest module that encloses at least 90% of the
    branch's work, weighted by parameter size (``blocks.3.attn`` for ``x + attn(ln1(x))``;
    ``layer1.0`` for a ResNet block whose branch is several convs). Parallel blocks use the add's
    module; '' when no module qualifies.
    """
    heavy = [(n, _work_weight(n)) for n in region if _does_work(n)]
    if kind == "parallel" or not heavy:
        return add_path
    total = sum(w for _, w in heavy)
    counts: dict = {}
    for n, w in heavy:
        for path in module_stack(n):
            counts[path] = counts.get(path, 0) + w
    good = [p for p, c in counts.items() if c >= 0.9 * total]
    if not good:
        return add_path
    return max(good, key=lambda p: (p.count("."), counts[p], p))


def detect_sites(graph: fx.Graph, axis_hint: Optional[int] = None) -> DetectResult:
    """Find the residual sites of ``graph`` (see the module docstring for the rules).

    ``axis_hint``: the channel axis the whole model's graph found for these sites, used where
    this graph cannot tell (a block traced with opaque leaf modules; the caller checks agreement).
    In-place adds are first made explicit with :func:`normalize_inplace` (semantics-preserving).
    Steps: classify every add (:func:`_classify_add`), merge parallel branches
    (:func:`_merge_parallel`), drop nested residuals and shared skips (:func:`_select_sites`),
    name the branch owners (:func:`_finish_sites`), annotate what was not taken
    (:func:`_final_not_taken`).
    """
    normalize_inplace(graph)
    g = dataflow_graph(graph)
    reach = _Reach(g)
    order = {n: i for i, n in enumerate(graph.nodes)}
    candidates: list[Site] = []
    not_taken: list[NotTaken] = []
    native = _native.find_native_streams(graph, reach.desc, lambda n: not _is_param_node(n))
    for node in graph.nodes:
        if not is_add(node):
            continue
        state = _native.state_of(native, node)
        if state is not None:
            not_taken.append(_not_taken(node, f"on a state that already carries {state.streams} streams on dim "
                                              f"{state.axis} (native hyper-connections): not widened again"))
            continue
        found = _classify_add(node, reach, axis_hint)
        if isinstance(found, Site):
            candidates.append(found)
        elif found is not None:
            not_taken.append(_not_taken(node, found))
    for site in candidates:
        _merge_parallel(site, reach)
    taken = _select_sites(candidates, order, not_taken)
    _finish_sites(taken)
    return DetectResult(sites=taken, not_taken=_final_not_taken(not_taken, taken), dataflow=g, native=native)



def _not_taken(node: fx.Node, reason: str) -> NotTaken:
    """A NotTaken record for ``node`` with ``reason``."""
    return NotTaken(node.name, module_path(node), reason)


def _operand_mismatch(node: fx.Node, a: fx.Node, b: fx.Node, ia: tuple, ib: tuple) -> Optional[str]:
    """Why two tensor operands cannot form a residual (shape, dtype, rank, x + x, view), or None."""
    if ia[0] != ib[0] and not same_shape(a, b):
        return f"shapes differ: {_fmt(ia[0])} vs {_fmt(ib[0])}"
    if ia[2] == 0:
        return "scalar operands"
    for dt in {ia[1], ib[1]}:
        if not getattr(dt, "is_floating_point", False):
            return f"not floating point ({dt})" if ia[1] == ib[1] else f"dtypes differ: {ia[1]} vs {ib[1]}"
    if a is b:
        return "branch does no work (x + x)"
    if is_inplace_add(node) and target_name(a) in _VIEW_NAMES:
        return "in-place add into a view (it mutates another tensor)"
    return None


def _orient(a: fx.Node, b: fx.Node, alpha: Any, reach: _Reach):
    """(x, y, scale, skip path) with x the stream f reads and y = f(x), or a reason string.

    The skip operand is x itself, or x through casts, copies and reshapes that keep the channels
    (``residual = x.to(torch.float32)``, the residual-in-fp32 pattern): then the skip path is
    returned and f reads x.
    """
    if a in reach.anc(b):
        return a, b, alpha, []
    if b in reach.anc(a):
        if alpha != 1:
            return "alpha scales the skip operand"
        return b, a, 1, []
    for skip, other, scale in ((a, b, alpha), (b, a, 1)):
        if skip is b and alpha != 1:
            continue
        found = _skip_source(skip, other, reach)
        if found is not None:
            return found[0], other, scale, found[1]
    return ("no dependency between the operands: neither is computed from the other "
            "(e.g. a projection shortcut, or a sum of parallel branches)")


def _skip_source(skip: fx.Node, other: fx.Node, reach: _Reach, depth: int = 4):
    """(x, path) when ``skip`` is x through stream ops (``stream_views``) and f = ``other`` reads x."""
    path, node = [], skip
    for _ in range(depth):
        if node.op not in ("call_function", "call_method") or not node.args or not isinstance(node.args[0], fx.Node):
            return None
        src = node.args[0]
        kind = view_kind(node, src)
        if kind is None:
            return None
        path.insert(0, node)
        if src in reach.anc(other):
            return src, path
        node = src
    return None


def _classify_add(node: fx.Node, reach: _Reach, hint: Optional[int] = None):
    """A candidate Site for the add ``node``, a reason it is not one, or None (not reported)."""
    a, b, alpha = add_operands(node)
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return None  # tensor + scalar: not a residual candidate, not reported
    ia, ib = tensor_info(a), tensor_info(b)
    if ia is None or ib is None:
        if carries_tensor(a) and carries_tensor(b) and (ia is None) != (ib is None):
            return "operand shapes unknown"
        return None
    why = _operand_mismatch(node, a, b, ia, ib)
    if why is not None:
        return why
    oriented = _orient(a, b, alpha, reach)
    if isinstance(oriented, str):
        return oriented
    x, y, scale, skip_path = oriented
    skip = skip_path[-1] if skip_path else x
    out = tensor_info(node)
    if ia[1] != ib[1] and (out is None or out[1] != tensor_info(skip)[1]):
        return f"dtypes differ: {ia[1]} vs {ib[1]}, and the sum is not in the skip operand's dtype"
    region = (reach.desc(x) & reach.anc(y)) | {y}
    if not any(_is_heavy(n) for n in region):
        return "branch does no work (elementwise only: no matmul, linear, conv, attention, embedding, pooling, FFT or scan)"
    info = tensor_info(skip)
    fa = _site_axis(x, skip, node, region, skip_path)
    if isinstance(fa, str) and hint is not None and fa.startswith(_axis.UNKNOWN) and hint < info[2]:
        fa = hint  # a block graph whose leaf modules hide the evidence: the model's graph saw it
    if isinstance(fa, str):
        return fa
    return Site(
        add=node, x=x, branches=[(y, scale)], region=region, inner_adds=[], shape=info[0],
        dtype=info[1], feature_axis=fa, module_path=module_path(node),
        branch_path="", inplace=is_inplace_add(node), skip_path=skip_path,
    )


def _site_axis(x: fx.Node, skip: fx.Node, add: fx.Node, region: set, skip_path: list):
    """The site's channel axis (a dim of the skip operand), or why it cannot be known (``axis``).
    A reshape on the skip path keeps the channels last: both sides must then say the last dim."""
    ev = _axis.gather(x, skip, add, region)
    reshaped = any(view_kind(p, p.args[0]) not in ("same", "cast") for p in skip_path)
    if not reshaped:
        return _axis.decide(ev)
    bx = _axis.decide(_axis.Evidence(branch=ev.branch))
    if isinstance(bx, str):
        return bx
    ranks = (tensor_info(x)[2], tensor_info(skip)[2])
    if bx != ranks[0] - 1 or any(next(iter(d)) != ranks[1] - 1 for d, _ in ev.skip if len(d) == 1):
        return "the skip path reshapes the stream, which keeps the channels only when they are the last dim"
    return ranks[1] - 1


def _parallel_branch(site: Site, outer: fx.Node, reach: _Reach) -> Optional[tuple]:
    """(other operand, its scale, its region) when ``outer`` adds a parallel branch of ``site.x``."""
    if not is_add(outer):
        return None
    a, b, alpha = add_operands(outer)
    other = b if a is site.add else a if b is site.add else None
    if not isinstance(other, fx.Node) or (other is a and alpha != 1):
        return None
    if tensor_info(other) is None or tensor_info(other)[1] != site.dtype or not same_shape(other, site.add):
        return None
    if site.x not in reach.anc(other) or site.add in reach.anc(other):
        return None
    extra = (reach.desc(site.x) & reach.anc(other)) | {other}
    if not any(_is_heavy(n) for n in extra):
        return None
    return other, (alpha if other is b else 1), extra


def _merge_parallel(site: Site, reach: _Reach) -> None:
    """Parallel residual: absorb ``(x + y1) + y2`` where y2 depends on x but not on the inner add."""
    while len(site.add.users) == 1:
        outer = next(iter(site.add.users))
        found = _parallel_branch(site, outer, reach)
        if found is None:
            break
        other, scale, extra = found
        site.inner_adds.append(site.add)
        site.add = outer
        site.branches.append((other, scale))
        site.region |= extra
        site.kind = "parallel"
        site.inplace = is_inplace_add(outer)
        site.module_path = module_path(outer)


def _select_sites(candidates: list, order: dict, not_taken: list) -> list:
    """Drop nested residuals and later sites sharing a skip operand (recorded in ``not_taken``)."""
    adds = {s.add for s in candidates}
    taken: list[Site] = []
    seen_x: dict = {}
    for site in sorted(candidates, key=lambda s: order[s.add]):
        inner = [n for n in site.region if n in adds and n is not site.add]
        if inner:
            not_taken.append(_not_taken(site.add, f"branch contains other residual sites "
                                                  f"({', '.join(n.name for n in inner[:3])}): nested residual"))
            continue
        if site.x in seen_x:
            not_taken.append(_not_taken(site.add, f"shares its skip input with site {seen_x[site.x].add.name}"))
            continue
        seen_x[site.x] = site
        taken.append(site)
    return taken


def _finish_sites(taken: list) -> None:
    """Mark layer-scale sites and name the module that owns each site's branch."""
    for site in taken:
        if site.kind == "residual" and _is_layer_scale(site.branches[0][0]):
            site.kind = "layer_scale"
        site.branch_path = _branch_path(site.region, site.module_path, site.kind)


def _final_not_taken(not_taken: list, taken: list) -> list:
    """Adds not taken, minus those absorbed into a site, each saying whose branch it sits in."""
    absorbed = {a.name for s in taken for a in [s.add, *s.inner_adds]}
    kept = [t for t in not_taken if t.node not in absorbed]
    owner = {n.name: s for s in taken for n in s.region}
    for t in kept:
        if t.node in owner:
            t.reason += f" [inside the branch of site {owner[t.node].add.name}]"
    return kept


def _is_layer_scale(y: fx.Node) -> bool:
    node = y
    # look through a permute/transpose/view back to channel-first
    for _ in range(3):
        name = target_name(node)
        if name in ("mul", "__mul__", "mul_"):
            return any(_is_param_node(a) for a in node.all_input_nodes)
        if name in ("permute", "transpose", "view", "reshape", "contiguous", "dropout") and node.all_input_nodes:
            node = node.all_input_nodes[0]
            continue
        break
    return False


def _fmt(shape) -> str:
    return "(" + ", ".join(shape) + ")"
