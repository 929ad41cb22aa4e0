"""Emit one residual chain of a ``torch.fx.GraphModule`` as n-stream mHC: the ops, f rewired, the parameters.

The emitter only: which sites and chains, their names and the report come from
``mhc_compile.graph_pipeline`` (``analyze``, ``rewrite_graph``, ``build_report``).

For each chain (see ``streams``), with ``fa`` the feature axis (moved last around the mHC ops):

    X = ops.expand(movedim(x, fa, -1), n, kernels)             # chain start, (..., n, C)
    per site:
        h_pre, h_post, h_res = ops.coeffs(X, phi, alpha, b_pre, b_post, b_res, iters, eps, variant, dynamic, kernels)
        h_in = ops.pre(X, h_pre, kernels)                       # f's uses of x now read h_in
        X = ops.post_res(X, h_out, h_post, h_res, kernels)      # replaces the add x + f(x)
        stream-wise ops between sites are applied to X (per stream)
    adjacent sites with config.fuse_boundaries: ops.boundary(...) = post_res of l + coeffs/pre of l+1
    any use of a stream value outside the chain reads ops.collapse(X, mode, weight)

Parameters per site live on the graph module under ``<branch module path>.mhc.<name>`` (e.g.
``blocks.0.attn.mhc.phi``), or ``<add's module path>.mhc_site<k>.<name>`` when that name is not
unique: ``phi`` and ``alpha`` (dynamic only), ``b_pre``, ``b_post``, ``b_res``. A learned collapse
adds ``<last site's owner>.mhc_collapse.weight`` per chain. They come from a ``param_provider``:

    param_provider(site_name: str, init: dict[str, Tensor]) -> dict[str, nn.Parameter]

``site_name`` is the module path the parameters are registered under (``blocks.0.attn.mhc``);
the default provider wraps ``init`` in fresh parameters, the torch.compile backend returns the
ones it created on an earlier compile.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import fx, nn

from .. import ops
from ..config import MHCConfig
from ..ops.table import OPS, STREAMS
from ..placement import InitRecipe, SiteInit, attach, site_container
from .detect import Site
from .nodes import node_val
from .stream_views import restate, view_kind
from .streams import Chain

ParamProvider = Callable[[str, dict], dict]
_COEFFS, _PRE, _POST_RES, _BOUNDARY = OPS["coeffs"], OPS["pre"], OPS["post_res"], OPS["boundary"]  # ops/table.py


def default_param_provider(site_name: str, init: dict) -> dict:
    """Fresh ``nn.Parameter``s initialised from ``init``."""
    return {k: nn.Parameter(v.detach().clone()) for k, v in init.items()}


def _register(gm: nn.Module, site_name: str, params: dict, recipe: Optional[InitRecipe] = None) -> list:
    """Attach a site's parameters at its name in ``gm`` (or the module it stands for, its
    ``mhc_holder``: a traced block's graph registers on the block); their dotted names."""
    container, cname = site_container(getattr(gm, "mhc_holder", gm), site_name)
    return [f"{cname}.{key}" for key in attach(container, params, recipe)]


def _param_device(gm: nn.Module, site: Site) -> torch.device:
    v = node_val(site.x)
    dev = getattr(v, "device", None)
    if dev is not None and dev.type != "meta":
        return dev
    for p in gm.parameters():
        return p.device
    return torch.device("cpu")


# ----------------------------------------------------------------------------- emitter
class _Emitter:
    """Creates nodes one after another starting after ``cursor``."""

    def __init__(self, graph: fx.Graph, cursor: fx.Node):
        self.graph, self.cursor = graph, cursor

    def node(self, op: str, target, args=(), kwargs=None, name: Optional[str] = None) -> fx.Node:
        with self.graph.inserting_after(self.cursor):
            n = self.graph.create_node(op, target, tuple(args), kwargs or {}, name=name)
        self.cursor = n
        return n

    def call(self, fn, *args, **kwargs) -> fx.Node:
        return self.node("call_function", fn, args, kwargs)

    def named(self, name: str, fn, *args) -> fx.Node:
        return self.node("call_function", fn, args, name=name)

    def method(self, name, *args) -> fx.Node:
        return self.node("call_method", name, args)

    def attr(self, target: str) -> fx.Node:
        return self.node("get_attr", target)

    def getitems(self, tup: fx.Node, names) -> list:
        return [self.named(nm, operator.getitem, tup, i) for i, nm in enumerate(names)]


def _to_last(e: _Emitter, v: fx.Node, fa: int, rank: int) -> fx.Node:
    return v if fa == rank - 1 else e.call(torch.movedim, v, fa, -1)


def _from_last(e: _Emitter, v: fx.Node, fa: int, rank: int) -> fx.Node:
    if fa == rank - 1:
        return v
    return e.method("contiguous", e.call(torch.movedim, v, -1, fa))


def _cursor_for(graph: fx.Graph, node: fx.Node) -> fx.Node:
    """Insert after ``node``; after the last placeholder when ``node`` is a placeholder."""
    if node.op != "placeholder":
        return node
    last = node
    for n in graph.nodes:
        if n.op == "placeholder":
            last = n
    return last


# ----------------------------------------------------------------------------- rewrite
def _site_params(gm, site: Site, config: MHCConfig, provider: ParamProvider, e: _Emitter, names: list) -> dict:
    recipe = InitRecipe("site", config.streams, site.channels, site.index_in_chain, variant=config.variant,
                        init=config.init, dynamic=config.dynamic, alpha_init=config.alpha_init)
    dev = _param_device(gm, site)
    init = SiteInit({k: v.to(dev) for k, v in recipe.values().items()}, recipe)
    params = provider(site.name, init)
    names += _register(gm, site.name, params, recipe)
    return {k: e.attr(f"{site.name}.{k}") for k in params}


def _coeff_args(p: dict, config: MHCConfig):
    return (p.get("phi"), p.get("alpha"), p["b_pre"], p["b_post"], p["b_res"], config.sinkhorn_iters,
            config.eps, config.variant, config.dynamic, config.kernels)


@dataclass
class ChainEnds:
    """How a chain enters and leaves a graph that holds only part of it (a stream-carrying block).

    ``stream_in``: the placeholder that already holds the streams ``(..., n, C)`` (no expand);
    ``lead`` the stream-wise ops from it to the chain's first skip operand. ``stream_out``: the
    output returns the streams at the chain's end, after the stream-wise ops ``trail`` from the
    last add (no collapse). ``collapse_weight``: register the chain's learned collapse weight
    (the graph holds the chain's end). ``out_node``: the node that reads the streams (the output
    when None; the call of the next block, in a block that calls it; a ``(h,) + rest`` tuple the
    output returns)."""

    stream_in: Optional[fx.Node] = None
    lead: list = field(default_factory=list)
    stream_out: bool = False
    trail: list = field(default_factory=list)
    collapse_weight: bool = True
    out_node: Optional[fx.Node] = None


class BlockRewriteError(RuntimeError):
    """A block's graph cannot carry its part of a chain (the caller falls back, saying why)."""


@dataclass
class _ChainRewrite:
    """What one chain's rewrite carries from step to step."""

    gm: fx.GraphModule
    chain: Chain
    config: MHCConfig
    provider: ParamProvider
    names: list                                   # parameter names registered so far
    fa: int                                       # feature axis of the chain's activations
    rank: int
    internal: list = field(default_factory=list)  # original nodes the streams replace (deleted at the end)
    stream_of: dict = field(default_factory=dict)  # original stream value -> stream node (..., n, C)
    ends: ChainEnds = field(default_factory=ChainEnds)
    weight_target: Optional[str] = None           # the learned collapse weight, once registered

    @property
    def graph(self) -> fx.Graph:
        return self.gm.graph


def _rewrite_chain(gm: fx.GraphModule, chain: Chain, config: MHCConfig, provider: ParamProvider, names: list,
                   ends: Optional[ChainEnds] = None) -> None:
    """Replace one chain's residual adds by mHC stream ops, collapse outside uses, erase the adds."""
    first = chain.sites[0]
    ends = ends or ChainEnds()
    st = _ChainRewrite(gm, chain, config, provider, names, first.feature_axis, len(first.shape), ends=ends)
    if ends.stream_in is not None:
        e = _Emitter(st.graph, _cursor_for(st.graph, ends.stream_in))
        entry_users = list(ends.stream_in.users)
        X = _apply_stream_wise(st, e, ends.stream_in, ends.lead)
    else:
        e = _Emitter(st.graph, _cursor_for(st.graph, first.x))
        X = e.named(f"mhc_{STREAMS}", ops.expand, _to_last(e, first.x, st.fa, st.rank), config.streams,
                    config.kernels)
    head: Optional[tuple] = None  # (h_pre, h_post, h_res, h_in) of the current site, from a boundary
    for k, site in enumerate(chain.sites):
        hp, ho, hr, h_in = head if head is not None else _site_head(st, site, e, X)
        _reroute_branch(site, _from_last(e, h_in, st.fa, st.rank))
        e = _Emitter(st.graph, site.add.prev)  # tail: right before the add
        h_out = _branch_output(st, site, e)
        X = _apply_stream_wise(st, e, X, site.skip_path, internal=False)  # residual.to(float32) ...
        X, head = _site_tail(st, k, e, X, h_out, ho, hr)
        st.stream_of[site.add] = X
        st.internal += [*_skip_nodes_only_the_add_reads(site), *site.inner_adds, site.add]
        if k + 1 < len(chain.sites):
            X = _apply_stream_wise(st, e, X, chain.between[k])
    if ends.stream_out:
        _return_streams(st, e, X)
    if ends.stream_in is not None:
        _collapse_entry_uses(st, entry_users)
    _collapse_outside_uses(st)
    _erase_replaced(st)


def _return_streams(st: _ChainRewrite, e: _Emitter, X: fx.Node) -> None:
    """The graph's output reads the streams after the trailing stream-wise ops, not a collapse."""
    last = st.chain.sites[-1].add
    final = st.ends.trail[-1] if st.ends.trail else last
    X = _apply_stream_wise(st, e, X, st.ends.trail)
    out = st.ends.out_node or next(n for n in st.graph.nodes if n.op == "output")
    if final not in out.all_input_nodes:
        raise BlockRewriteError(f"the block does not return the value of its last residual ({final.name})")
    out.replace_input_with(final, X)


def _collapse_entry_uses(st: _ChainRewrite, entry_users: list) -> None:
    """Readers of the entry placeholder outside the chain read the collapse of the incoming streams."""
    ph, internal = st.ends.stream_in, set(st.internal)
    outside = [u for u in entry_users if u not in internal and ph in u.all_input_nodes]
    if outside:
        c = _collapse_node(st, _Emitter(st.graph, _cursor_for(st.graph, ph)), ph)
        for u in outside:
            u.replace_input_with(ph, c)


def _skip_nodes_only_the_add_reads(site: Site) -> list:
    """The site's skip-path nodes, when nothing but the add reads them (they go with the add)."""
    own = set(site.skip_path) | set(site.inner_adds) | {site.add}
    return list(site.skip_path) if all(set(n.users) <= own for n in site.skip_path) else []


def _site_head(st: _ChainRewrite, site: Site, e: _Emitter, X: fx.Node) -> tuple:
    """Emit a site's parameters, coefficients and pre-mix: (h_pre, h_post, h_res, h_in)."""
    p = _site_params(st.gm, site, st.config, st.provider, e, st.names)
    hp, ho, hr = e.getitems(e.named("mhc_coeffs", ops.coeffs, X, *_coeff_args(p, st.config)), _COEFFS.node_names)
    return hp, ho, hr, e.named(_PRE.node_names[0], ops.pre, X, hp, st.config.kernels)


def _reroute_branch(site: Site, h_in: fx.Node) -> None:
    """Make f's uses of the skip operand x read the pre-mixed input h_in instead."""
    for user in list(site.x.users):
        if user in site.region:
            user.replace_input_with(site.x, h_in)


def _branch_output(st: _ChainRewrite, site: Site, e: _Emitter) -> fx.Node:
    """h_out = sum_k scale_k * branch_k, feature axis last, in the stream's dtype."""
    terms = [y if scale == 1 else e.call(operator.mul, y, scale) for y, scale in site.branches]
    h_out = terms[0]
    for t in terms[1:]:
        h_out = e.call(operator.add, h_out, t)
    dtype = getattr(node_val(site.branches[0][0]), "dtype", site.dtype)
    if dtype != site.dtype:  # a bf16 branch added to an fp32 residual: the sum is fp32
        h_out = e.method("to", h_out, site.dtype)
    return _to_last(e, h_out, st.fa, st.rank)


def _site_tail(st: _ChainRewrite, k: int, e: _Emitter, X: fx.Node, h_out: fx.Node, ho: fx.Node,
               hr: fx.Node) -> tuple:
    """(new X, next head): a fused boundary into the adjacent next site, or a plain post_res."""
    chain, config = st.chain, st.config
    nxt = chain.sites[k + 1] if k + 1 < len(chain.sites) else None
    if nxt is not None and not chain.between[k] and config.fuse_boundaries:
        p = _site_params(st.gm, nxt, config, st.provider, e, st.names)
        outs = e.getitems(e.named("mhc_boundary", ops.boundary, X, h_out, ho, hr, *_coeff_args(p, config)),
                          _BOUNDARY.node_names)
        return outs[_BOUNDARY.stream_out], tuple(o for i, o in enumerate(outs) if i != _BOUNDARY.stream_out)
    return e.named(_POST_RES.node_names[0], ops.post_res, X, h_out, ho, hr, config.kernels), None


def _apply_stream_wise(st: _ChainRewrite, e: _Emitter, X: fx.Node, gap: list, internal: bool = True) -> fx.Node:
    """Apply stream-wise ops (between two sites, or on a site's skip path) to the streams.

    Ops between sites replace the original nodes (``internal``: their outside users read the
    collapse); skip-path ops are applied to the streams and the original nodes are left to any
    other reader.
    """
    for op_node in gap:
        if view_kind(op_node, op_node.args[0]) is not None:
            args, kwargs = restate(op_node, X, st.config.streams)  # may add size nodes before op_node
        else:
            args, kwargs = tuple(X if a is _stream_arg(op_node) else a for a in op_node.args), dict(op_node.kwargs)
        if internal:  # emit where the op was: the size arguments it reads exist there
            e.cursor = op_node.prev
        X = e.node(op_node.op, op_node.target, args, kwargs)
        if internal:
            st.stream_of[op_node] = X
            st.internal.append(op_node)
    return X


def _learned_collapse_target(st: _ChainRewrite) -> str:
    """Register the chain's learned collapse weight; returns its get_attr target."""
    last = st.chain.sites[-1]
    cname = last.name.rsplit(".", 1)[0] + ".mhc_collapse" if "." in last.name else f"mhc_collapse{st.chain.index}"
    if not st.ends.collapse_weight:
        raise BlockRewriteError("a learned collapse is read inside the chain, in a block that does not hold "
                                "the chain's end (its weight lives there)")
    dev = _param_device(st.gm, last)
    recipe = InitRecipe("collapse", st.config.streams)
    params = st.provider(cname, SiteInit({"weight": recipe.values()["weight"].to(dev)}, recipe))
    st.names += _register(st.gm, cname, params, recipe)
    return f"{cname}.weight"


def _collapse_node(st: _ChainRewrite, e: _Emitter, Xv: fx.Node) -> fx.Node:
    """``ops.collapse`` of the streams ``Xv``, feature axis back in place."""
    weight = None
    if st.config.collapse == "learned":
        st.weight_target = st.weight_target or _learned_collapse_target(st)
        weight = e.attr(st.weight_target)
    c = e.named("mhc_collapse", ops.collapse, Xv, st.config.collapse, weight, st.config.kernels)
    return _from_last(e, c, st.fa, st.rank)


def _collapse_outside_uses(st: _ChainRewrite) -> None:
    """Every use of a stream value outside the chain reads the collapsed streams at that point."""
    if st.config.collapse == "learned" and st.ends.collapse_weight and not st.weight_target:
        st.weight_target = _learned_collapse_target(st)  # the chain's end owns it, used or not
    internal_set = set(st.internal)
    for v in st.internal:  # metadata asserts on replaced values are dropped with them
        for u in list(v.users):
            if u.op == "call_function" and "assert_tensor_metadata" in str(u.target) and not u.users:
                st.graph.erase_node(u)
    for v, Xv in st.stream_of.items():
        outside = [u for u in v.users if u not in internal_set]
        if not outside:
            continue
        c = _collapse_node(st, _Emitter(st.graph, Xv), Xv)
        for u in outside:
            u.replace_input_with(v, c)


def _erase_replaced(st: _ChainRewrite) -> None:
    """Erase the adds and stream-wise ops the streams replaced; each must have no user left."""
    for node in reversed(st.internal):
        if node.users:
            raise RuntimeError(f"mhc rewrite: {node.name} still has users {list(node.users)}")
        st.graph.erase_node(node)


def _stream_arg(node: fx.Node):
    return node.args[0] if node.args and isinstance(node.args[0], fx.Node) else node.args[1]


def rewrite_chain_part(gm: fx.GraphModule, chain: Chain, config: MHCConfig, provider: ParamProvider,
                       names: list, ends: ChainEnds) -> None:
    """Rewrite ``chain`` of a graph that holds part of a longer chain (a stream-carrying block):
    its sites carry the whole chain's names and positions; ``ends`` says where the streams come
    in and go out. ``gm.graph`` is rewritten in place (the caller generates its code)."""
    _rewrite_chain(gm, chain, config, provider, names, ends)


def rewrite_chain(gm: fx.GraphModule, chain: Chain, config: MHCConfig, provider: ParamProvider, names: list) -> None:
    """Rewrite one whole ``chain`` of ``gm.graph`` in place (its sites named, see
    ``graph_pipeline.assign_names``); registered parameter names are appended to ``names``. The
    caller lints and recompiles."""
    _rewrite_chain(gm, chain, config, provider, names)
