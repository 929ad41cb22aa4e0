"""Group residual sites into chains (one set of n streams per chain) and decide where streams start and end.

Two sites ``s`` then ``t`` are consecutive in a chain when ``t``'s skip operand is reached from
``s``'s output through *stream-wise* ops only, i.e. ops that can be applied to every stream
separately and give the same function at init:

* elementwise unary ops (relu, gelu, silu, tanh, sigmoid, dropout, clone, ...) and arithmetic
  with a python scalar;
* norms over the feature axis (layer_norm / rms_norm whose normalized_shape is the feature
  dim, on channel-last activations), e.g. post-activation ResNet ``relu(x + f(x))`` and
  post-LN BERT ``LN(x + f(x))``;
* casts and copies (``to(dtype)``, ``contiguous``, ``clone``), and on channel-last streams the
  reshapes of the leading dims that keep the channels last (``stream_views``): a decoder layer
  that flattens to ``(B*T, C)`` for its MLP, the window partition / reverse / shift of windowed
  attention. Sites joined through reshapes have the same channels, not the same shape.

The path is found by breadth-first search from the site's output; the next site's skip operand
must also be *dominated* by the site's output in the activation data-flow graph (every path from
the model inputs to it passes through the site), so it is a function of the stream alone.

A chain ends at anything else: a change of channels, a projection shortcut (the next add is not a
site), or the end of the graph. A use of a stream value by a consumer outside the chain (another
block's input, a returned hidden state, a cross-attention memory) reads the *collapsed* value at
that point; the chain itself continues. The stream starts at the first site's skip operand.
"""
from __future__ import annotations

import operator
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

import networkx as nx
from torch import fx, nn

from .detect import DetectResult, Site, _is_param_node, dataflow_graph
from .nodes import node_val, same_shape, target_name, tensor_info
from .stream_views import view_kind

_ELEMENTWISE = {
    "relu", "relu_", "gelu", "silu", "sigmoid", "tanh", "elu", "leaky_relu", "hardtanh", "relu6",
    "mish", "hardswish", "hardsigmoid", "softplus", "dropout", "dropout_", "feature_dropout",
    "alpha_dropout", "neg", "identity", "native_dropout",
}  # casts and copies (to, clone, contiguous, ...) are stream_views.view_kind's
_SCALAR_ARITH = {"mul", "add", "sub", "div", "truediv", "__mul__", "__add__", "__sub__", "__truediv__",
                 "__rmul__", "__radd__", "mul_", "add_", "div_", "pow"}
_NORMS = {"layer_norm", "rms_norm"}
_TUPLE_OPS = {"native_layer_norm", "native_dropout"}
_MODULE_STREAMWISE = (nn.Dropout, nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Identity, nn.LeakyReLU)


@dataclass
class Chain:
    """Consecutive sites sharing one set of n streams."""

    index: int
    sites: list                                  # Site objects in execution order
    # between[k]: stream-wise nodes applied on the way from sites[k].add to sites[k+1].x
    between: list = field(default_factory=list)

    @property
    def start(self) -> fx.Node:
        return self.sites[0].x


def _owner(graph: fx.Graph):
    return getattr(graph, "owning_module", None)


def _channel_last(site: Site) -> bool:
    return site.feature_axis == len(site.shape) - 1


def is_stream_wise(node: fx.Node, stream: fx.Node, site: Site) -> bool:
    """Whether ``node`` applied to the stream value ``stream`` can be applied to each stream."""
    kind = view_kind(node, stream) if node.op != "call_module" else None
    if kind is not None:  # casts, copies, and (channel-last only) reshapes of the leading dims
        return kind in ("same", "cast") or _channel_last(site)
    if node.op == "call_module":
        gm = _owner(node.graph)
        try:
            mod = gm.get_submodule(node.target) if gm is not None else None
        except AttributeError:
            mod = None
        if isinstance(mod, (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm))):
            ok = len(mod.normalized_shape) == 1 and site.feature_axis == len(site.shape) - 1
        else:
            ok = isinstance(mod, _MODULE_STREAMWISE)
        return ok and len(node.all_input_nodes) == 1 and node.args[0] is stream
    if node.op not in ("call_function", "call_method"):
        return False
    name = target_name(node)
    sinfo = tensor_info(stream) if target_name(stream) not in _TUPLE_OPS else None
    if name in _TUPLE_OPS:  # native_layer_norm / native_dropout: (out, stats...), then getitem 0
        v = node_val(node)
        if not (isinstance(v, (list, tuple)) and v and hasattr(v[0], "shape")):
            return False
        if sinfo is None or not same_shape(v[0], stream) or v[0].dtype != sinfo[1] or node.args[0] is not stream:
            return False
        if not all(u.target is operator.getitem and u.args[1] == 0 for u in node.users):
            return False  # the statistics (mean, rstd, mask) are used elsewhere
        if name == "native_layer_norm":
            return (site.feature_axis == len(site.shape) - 1 and len(node.args[1]) == 1
                    and all(_is_param_node(a) for a in node.all_input_nodes if a is not stream))
        return len(node.all_input_nodes) == 1
    if node.target is operator.getitem and target_name(stream) in _TUPLE_OPS:
        return node.args[0] is stream and node.args[1] == 0
    info = tensor_info(node)
    if info is None or sinfo is None or info[1] != sinfo[1] or not same_shape(node, stream):
        return False
    if not node.args or node.args[0] is not stream:
        if not (len(node.args) > 1 and node.args[1] is stream and target_name(node) in _SCALAR_ARITH):
            return False
    others = [a for a in node.all_input_nodes if a is not stream]
    if name in _ELEMENTWISE:
        return not others
    if name in _SCALAR_ARITH:
        return not others  # arithmetic with python scalars only
    if name in _NORMS:
        if site.feature_axis != len(site.shape) - 1:
            return False
        shape_arg = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")
        if not isinstance(shape_arg, (list, tuple)) or len(shape_arg) != 1:
            return False
        return all(_is_param_node(a) for a in others)
    return False


def _activation_dominators(graph: fx.Graph, g: nx.DiGraph):
    """Immediate dominators of the activation data-flow graph, rooted at a virtual source."""
    inputs = [n for n in graph.nodes if n.op == "placeholder" and not _is_param_node(n)]
    active = set(inputs)
    for n in inputs:
        active |= nx.descendants(g, n)
    sub = g.subgraph(active).copy()
    root = "__root__"
    sub.add_node(root)
    for n in inputs:
        sub.add_edge(root, n)
    return nx.immediate_dominators(sub, root), root


def _dominates(idom, root, a, b) -> bool:
    if b not in idom:
        return True  # not an activation (constant-only); nothing to check
    while b != root:
        if b is a:
            return True
        nxt = idom[b]
        if nxt == b:
            break
        b = nxt
    return False


def _joinable(site: Site, t: Site, path: list) -> bool:
    """Whether ``t`` can continue ``site``'s streams after the ops ``path``: the same channels, and
    the same shape unless both are channel-last (reshapes of the leading dims are then allowed)."""
    if t.feature_axis == site.feature_axis and same_shape(t.add, site.add):
        return True
    if not (_channel_last(site) and _channel_last(t)):
        return False
    return t.shape[-1] == site.shape[-1]  # the channels (static), whatever the leading dims


def stream_wise_path(start: fx.Node, goal: Callable[[fx.Node, list], bool], site: Site, max_len: int = 8,
                     order: Optional[dict] = None) -> Optional[tuple]:
    """Breadth first from ``start`` through stream-wise ops (:func:`is_stream_wise` for ``site``),
    at most ``max_len`` of them: ``(node, path)`` for the first node where ``goal(node, path)``
    holds (``path`` the ops after ``start``, ending at the node), or None. ``order`` (node ->
    position) visits users in graph order."""
    queue, seen = deque([(start, [])]), {start}
    while queue:
        v, path = queue.popleft()
        if goal(v, path):
            return v, path
        if len(path) >= max_len:
            continue
        for u in (sorted(v.users, key=order.__getitem__) if order is not None else list(v.users)):
            if u not in seen and is_stream_wise(u, v, site):
                seen.add(u)
                queue.append((u, path + [u]))
    return None


def build_chains(graph: fx.Graph, detected: DetectResult, max_between: int = 8) -> list:
    """Link the detected sites into chains; sets ``site.chain`` / ``site.index_in_chain``."""
    sites = detected.sites
    if not sites:
        return []
    g = detected.dataflow if detected.dataflow is not None else dataflow_graph(graph)
    idom, root = _activation_dominators(graph, g)
    by_x = {s.x: s for s in sites}
    order = {n: i for i, n in enumerate(graph.nodes)}
    nxt: dict = {}
    prev: dict = {}
    between: dict = {}
    for site in sorted(sites, key=lambda s: order[s.add]):
        def joins(v: fx.Node, path: list, site: Site = site) -> bool:
            t = by_x.get(v)
            return (t is not None and t is not site and id(t) not in prev and order[t.add] > order[site.add]
                    and _joinable(site, t, path) and _dominates(idom, root, site.add, v))

        hit = stream_wise_path(site.add, joins, site, max_between, order)
        if hit is not None:
            v, path = hit
            t = by_x[v]
            nxt[id(site)] = t
            prev[id(t)] = site
            between[id(site)] = path
    chains = []
    for site in sorted(sites, key=lambda s: order[s.add]):
        if id(site) in prev:
            continue
        members, gaps = [site], []
        while id(members[-1]) in nxt:
            gaps.append(between[id(members[-1])])
            members.append(nxt[id(members[-1])])
        chain = Chain(index=len(chains), sites=members, between=gaps)
        for k, s in enumerate(members):
            s.chain, s.index_in_chain = chain.index, k
        chains.append(chain)
    return chains
