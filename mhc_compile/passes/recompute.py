"""Recomputation scheduling for the joint forward+backward graph (DESIGN.md, "Recomputation").

Owns: the block size ``L_r`` (:func:`recompute_block_size`), the tagging pass over an AOTAutograd
joint graph (:func:`tag_joint_graph`) and the context manager the ``"mhc"`` backend wraps around
its inner compile call (:func:`recompute_context`).

What is saved. Every ``mhc::`` op's autograd already saves only its inputs (``mhc_compile.ops``), so on the
eager ``convert`` path a site keeps its streams ``X_l`` (n*C per token), the branch output
``h_out_l`` and the small fp32 coefficients. On the compiled path AOTAutograd's min-cut
partitioner decides; left alone it never recomputes a custom op, so it saves every ``X_l``.

What this pass changes (the paper, section 4.3.2). In each chain of ``L`` sites it keeps ``X``
only at the start of every block of ``L_r`` consecutive sites (default: the paper's ``L_r*``, see
:func:`recompute_block_size`; ``MHCConfig.recompute_block`` overrides it;
``MHCConfig.recompute=False`` turns the pass off). Tagged ``CheckpointPolicy.MUST_RECOMPUTE``
(``ac_graph_id`` = block id): inside a block the ops that produce the streams (``mhc::post_res``
/ ``mhc::boundary`` and the stream-wise glue between sites); every site's ``mhc::coeffs`` /
``mhc::pre`` (block starts too: h_in and the coefficients are replayed from the saved X; for a
fused boundary a backward-only ``mhc::pre`` on its X replaces the backward reads of its h_in);
the chain's expand (X_0 is replayed from the C-wide input). ``MUST_SAVE``: the op producing a
block-start ``X``. Saved per chain: ``ceil(L/L_r) - 1`` X (``ChainPlan.kept_streams``), every
site's ``h_out`` (made by the user's ``f``, never tagged: f is recomputed only where the stock
partitioner would anyway, never matmuls) and the coefficients a fused block start passes on.
``tests/test_recompute.py`` asserts the exact bytes.

Glue that cannot be replayed safely (a random op such as dropout, a matmul, a non-aten op)
starts a new block at the site after it (its ``X`` is saved).

How it is hooked: :func:`recompute_context` installs :func:`tag_joint_graph` as a joint-graph
pass through ``mhc_compile._torch_internals.joint_graph_hook`` (the only place that touches the
private AOTAutograd / inductor config), so it runs on the joint graph right before partitioning,
with both the ``inductor`` and ``aot_eager`` inner backends.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import operator
from collections import deque
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import fx

from .. import _torch_internals as _ti
from ..ops import table as _table
from ..ops.table import OPS, STREAM_OPS

__all__ = [
    "recompute_block_size",
    "tag_joint_graph",
    "recompute_context",
    "ChainPlan",
    "RecomputeRecord",
    "last_records",
    "MHC_FORWARD_OPS",
]

MHC_FORWARD_OPS = tuple(OPS)  # ops/table.py; STREAM_OPS: those that produce the streams
_AC_GRAPH_ID_BASE = 1 << 20  # above any torch.utils.checkpoint region id of the user's own code
_MAX_GLUE = 64               # stream-wise nodes searched between two sites
_DONE_ATTR = "_mhc_recompute_tagged"


# ----------------------------------------------------------------------------- L_r
def recompute_block_size(n: int, L: int, override: Optional[int] = None) -> int:
    """Sites per recompute block for a chain of ``L`` sites with ``n`` streams.

    ``override`` (``MHCConfig.recompute_block``) wins when given. The default is the paper's
    ``L_r*``: the integer minimiser of its memory model ``n*ceil(L/L_r) + (n+2)*L_r`` (streams kept
    at block starts plus the block replayed in backward, in units of C per token), whose
    continuous minimiser is ``sqrt(n*L/(n+2))``; ties go to the value nearest that root, then to
    the smaller. The ceiling matters: at n = 4, L = 16 the root is 3.27 but L_r = 4 keeps 4 X
    instead of 6 for one more replayed site (cost 40 instead of 42). The result is clamped to
    ``[1, max(L, 1)]``: a block never spans more than the chain.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    if isinstance(L, bool) or not isinstance(L, int) or L < 0:
        raise ValueError(f"L must be an int >= 0, got {L!r}")
    if override is not None:
        if isinstance(override, bool) or not isinstance(override, int) or override < 1:
            raise ValueError(f"recompute_block must be None or an int >= 1, got {override!r}")
        return max(1, min(override, max(L, 1)))
    if L <= 1:
        return 1
    root = math.sqrt(n * L / (n + 2))
    return min(range(1, L + 1), key=lambda b: (n * -(-L // b) + (n + 2) * b, abs(b - root), b))


# ----------------------------------------------------------------------------- records
@dataclasses.dataclass
class ChainPlan:
    """What the pass did to one chain of one joint graph."""

    n: int
    length: int                  # L, sites in the chain
    block: int                   # L_r used
    starts: list                 # chain positions whose X is kept (block starts)
    recomputed_nodes: list       # names of nodes tagged MUST_RECOMPUTE
    saved_nodes: list            # names of nodes tagged MUST_SAVE
    stream_bytes: int            # bytes of one X of this chain (T*n*C*e), 0 if unknown
    start_from_input: bool = False  # the chain's first X is replayed from the un-expanded input

    @property
    def kept_streams(self) -> int:
        """Stream tensors X of this chain the scheme saves: one per block start, less the chain's
        first X when it is replayed from the un-expanded input (a C-wide tensor)."""
        return len(self.starts) - int(self.start_from_input)

    @property
    def dropped(self) -> int:
        """How many stream tensors X of this chain are no longer saved."""
        return self.length - self.kept_streams


@dataclasses.dataclass
class RecomputeRecord:
    """Plans for every joint graph tagged while a :func:`recompute_context` was open."""

    block_override: Optional[int]
    expected_chains: Optional[list] = None   # chain lengths from the passes' report, if given
    graphs: list = dataclasses.field(default_factory=list)  # one list[ChainPlan] per joint graph

    @property
    def chains(self) -> list:
        return [p for g in self.graphs for p in g]


_RECORDS: list[RecomputeRecord] = []
_MAX_RECORDS = 64


def last_records() -> list[RecomputeRecord]:
    """Records of the recent :func:`recompute_context` uses, oldest first (last 64)."""
    return list(_RECORDS)


# ----------------------------------------------------------------------------- graph helpers
def _mhc_kind(node: fx.Node) -> Optional[str]:
    """The table name (``ops/table.py``) of a forward mhc:: op node, else None."""
    if node.op != "call_function":
        return None
    name = _ti.op_schema_name(node.target)
    if not name.startswith("mhc::"):
        return None
    kind = name[len("mhc::"):]
    return kind if kind in MHC_FORWARD_OPS else None


def _val(node: Any) -> Optional[torch.Tensor]:
    if not isinstance(node, fx.Node):
        return None
    v = node.meta.get("val")
    return v if isinstance(v, torch.Tensor) else None


def _backward_region(graph: fx.Graph) -> set:
    """Nodes that depend on a tangent (the backward part of a joint graph)."""
    seen: set = set()
    todo = deque(n for n in graph.nodes if n.op == "placeholder" and "tangents" in str(n.target))
    while todo:
        node = todo.popleft()
        if node in seen:
            continue
        seen.add(node)
        todo.extend(node.users)
    return seen


def _same_shape(a, b) -> bool:
    """Shape equality without evaluating symbolic sizes (which could add guards): ints by value,
    SymInts by their expression."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if isinstance(x, int) and isinstance(y, int):
            if x != y:
                return False
        elif isinstance(x, int) or isinstance(y, int) or str(x) != str(y):
            return False
    return True


def _getitems(node: fx.Node) -> list:
    return [u for u in node.users if u.op == "call_function" and u.target is operator.getitem]


def _stream_out(node: fx.Node, kind: str) -> Optional[fx.Node]:
    """The node holding the streams an out-op produces: the op itself when that is its one
    output (post_res), else the getitem of its streams output (boundary's output 0)."""
    op = OPS[kind]
    if len(op.outputs) == 1:
        return node
    for g in _getitems(node):
        if g.args[1] == op.stream_out:
            return g
    return None


def _replayable_glue(node: fx.Node) -> bool:
    """Stream-wise glue that may be replayed in the backward: deterministic, cheap aten ops."""
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        return True
    target = node.target
    if _ti.op_namespace(target) not in ("aten", "prims"):
        return False
    if torch.Tag.nondeterministic_seeded in target.tags:
        return False
    name = _ti.op_schema_name(target).split("::")[-1]
    return not any(k in name for k in ("mm", "conv", "attention", "_scaled_dot", "linear", "baddbmm", "addmv"))


@dataclasses.dataclass
class _Site:
    x: fx.Node                       # the streams X this site reads
    ops: list                        # forward mhc:: ops with args[0] == x
    out: Optional[fx.Node] = None    # its post_res / boundary
    next: Optional["_Site"] = None
    glue: list = dataclasses.field(default_factory=list)  # nodes between out's streams and next.x
    hard: bool = False               # glue to next cannot be replayed: next.x is kept
    prev: Optional["_Site"] = None


def _find_next(site: _Site, sites: dict, backward: set) -> None:
    """Link ``site`` to the site reading its output streams, through stream-shaped forward nodes."""
    kind = _mhc_kind(site.out)
    start = _stream_out(site.out, kind)
    if start is None:
        return
    shape = _val(start).shape if _val(start) is not None else None
    parent = {start: None}
    todo = deque([start])
    found = []
    while todo and len(parent) <= _MAX_GLUE:
        node = todo.popleft()
        if node in sites and node is not site.x:
            found.append(node)
            continue
        for user in node.users:
            if user in parent or user in backward or _mhc_kind(user) is not None:
                continue
            v = _val(user)
            if v is None and isinstance(user.meta.get("val"), (tuple, list)) and user.meta["val"]:
                v = user.meta["val"][0] if isinstance(user.meta["val"][0], torch.Tensor) else None
            if v is None or shape is None or not _same_shape(v.shape, shape):
                continue
            parent[user] = node
            todo.append(user)
    if len(found) != 1:
        return  # chain end (collapse) or ambiguous: treat as the end of the chain
    nxt = sites[found[0]]
    if nxt.prev is not None:
        return
    path, node = [], found[0]
    while node is not None and node is not start:
        path.append(node)
        node = parent[node]
    site.next, nxt.prev = nxt, site
    site.glue = list(reversed(path))
    site.hard = not all(_replayable_glue(g) for g in site.glue)


def _collect_sites(graph: fx.Graph) -> list:
    backward = _backward_region(graph)
    sites: dict = {}
    for node in graph.nodes:
        kind = _mhc_kind(node)
        if kind is None or node in backward or not isinstance(node.args[0], fx.Node):
            continue
        sites.setdefault(node.args[0], _Site(node.args[0], [])).ops.append(node)
    for site in sites.values():
        outs = [op for op in site.ops if _mhc_kind(op) in STREAM_OPS]
        site.out = outs[0] if len(outs) == 1 else None
    for site in sites.values():
        if site.out is not None:
            _find_next(site, sites, backward)
    chains = []
    for site in sites.values():
        if site.prev is None:
            chain, s = [], site
            while s is not None:
                chain.append(s)
                s = s.next
            chains.append(chain)
    return chains


def _tag(node: fx.Node, policy, graph_id: int, names: list) -> None:
    _ti.set_recompute_tag(node, policy, graph_id)
    names.append(node.name)


def _tag_op(node: fx.Node, policy, graph_id: int, names: list) -> None:
    """Tag an op and, for a multi-output op, its getitem users (the partitioner saves those)."""
    _tag(node, policy, graph_id, names)
    for g in _getitems(node):
        _tag(g, policy, graph_id, names)


def _expand_path(x: fx.Node) -> list:
    """The replayable ops that make the chain's first X from a C-wide tensor (``unsqueeze`` ->
    ``expand`` -> ``clone`` of the rewrite's expand), producer first; [] when X is not made so."""
    xv = _val(x)
    if xv is None or xv.dim() < 2:
        return []
    lead, c = tuple(xv.shape[:-2]), xv.shape[-1]
    path, node = [], x
    for _ in range(6):
        if node.op != "call_function" or not _replayable_glue(node) or not node.args:
            return []
        src = node.args[0]
        if not isinstance(src, fx.Node) or any(isinstance(a, fx.Node) for a in node.args[1:]):
            return []
        path.append(node)
        sv = _val(src)
        if sv is None:
            return []
        if _same_shape(sv.shape, lead + (c,)) or _same_shape(sv.shape, lead + (1, c)):
            return list(reversed(path))
        if not _same_shape(sv.shape[-1:], (c,)):
            return []
        node = src
    return []


def _is_view(node: fx.Node) -> bool:
    """An aten view op (metadata only: view, t, permute, unsqueeze, ...)."""
    if node.op != "call_function" or _ti.op_namespace(node.target) != "aten":
        return False
    return node.target.is_view or _ti.op_schema_name(node.target) == "aten::_unsafe_view"


def _replay_h_in(graph: fx.Graph, op: fx.Node, backward: set, graph_id: int, names: list) -> None:
    """A block-start X made by ``mhc::boundary``: the backward reads of its fused ``h_in`` output
    (and of views of it, e.g. a Linear's flattening ``view``) read ``mhc::pre(X, H_pre)`` (and the
    same views of it) instead: forward nodes tagged MUST_RECOMPUTE that only the backward uses, so
    the partitioner replays them from the saved X (plus H_pre, n floats per token) instead of
    saving h_in (C per token). The forward keeps the fused h_in."""
    from torch.utils.checkpoint import CheckpointPolicy

    outs = {g.args[1]: g for g in _getitems(op)}
    x_next, h_in = outs.get(0), outs.get(4)
    if x_next is None or h_in is None:
        return
    closure, i = [h_in], 0  # h_in and its forward views, parents first
    while i < len(closure):
        closure.extend(u for u in closure[i].users
                       if u not in backward and _is_view(u) and u.args[0] is closure[i] and u not in closure)
        i += 1
    reads = {v: [u for u in v.users if u in backward] for v in closure}
    if not any(reads.values()):
        return
    order = {node: k for k, node in enumerate(graph.nodes)}
    point = min((nd for nd in backward if nd.op != "placeholder"), key=order.__getitem__, default=None)
    if point is None or any(order[a] >= order[point] for v in (x_next, *closure) for a in (v, *v.all_input_nodes)):
        return  # not a forward-then-backward joint graph: leave h_in saved
    with graph.inserting_before(point):
        h_pre = outs.get(1)
        if h_pre is None:  # unused in the forward (h_in is fused): read it for the replay
            h_pre = graph.call_function(operator.getitem, (op, 1))
            h_pre.meta["val"] = op.meta["val"][1]
            _ti.set_recompute_tag(h_pre, _ti.recompute_tag(op), op.meta.get("ac_graph_id"))
        replica = {h_in: graph.call_function(OPS["pre"].op().default, (x_next, h_pre, op.args[-1]))}
        for v in closure[1:]:
            replica[v] = graph.call_function(v.target, (replica[v.args[0]], *v.args[1:]), dict(v.kwargs))
    for v, new in replica.items():
        new.meta.update({k: m for k, m in v.meta.items() if k not in ("recompute", "ac_graph_id")})
        for u in reads[v]:
            u.replace_input_with(v, new)
    for v in reversed(closure):  # views nobody in the backward reads
        if not replica[v].users:
            graph.erase_node(replica.pop(v))
    for new in replica.values():
        _tag(new, CheckpointPolicy.MUST_RECOMPUTE, graph_id, names)


# ----------------------------------------------------------------------------- the pass
def tag_joint_graph(graph: fx.Graph, n: Optional[int] = None, block_override: Optional[int] = None,
                    _id_base: int = _AC_GRAPH_ID_BASE) -> list:
    """Tag the mHC ops of an AOTAutograd joint graph for block recomputation; returns ChainPlans.

    Idempotent (a graph is tagged once). Graphs without tangents (inference) are left alone.
    ``n`` defaults to each chain's stream count read from the graph.
    """
    from torch.utils.checkpoint import CheckpointPolicy

    if getattr(graph, _DONE_ATTR, None) is not None:
        return getattr(graph, _DONE_ATTR)
    if not any(p.op == "placeholder" and "tangents" in str(p.target) for p in graph.nodes):
        return []
    backward = _backward_region(graph)
    plans = []
    next_id = _id_base
    for chain in _collect_sites(graph):
        L = len(chain)
        xv = _val(chain[0].x)
        chain_n = n if n is not None else (int(xv.shape[-2]) if xv is not None and xv.dim() >= 2 else 1)
        block = recompute_block_size(chain_n, L, block_override)
        starts, last = [], 0
        for p, site in enumerate(chain):
            if p == 0 or chain[p - 1].hard or p - last >= block:
                starts.append(p)
                last = p
        start_set = set(starts)
        recomputed, saved = [], []
        block_id = next_id
        # the chain's first X is replayed from the un-expanded input (C wide), never saved
        expand = _expand_path(chain[0].x)
        for g in expand:
            if _ti.recompute_tag(g) is None:
                _tag_op(g, CheckpointPolicy.MUST_RECOMPUTE, block_id, recomputed)
        for p, site in enumerate(chain):
            if p in start_set:
                block_id = next_id
                next_id += 1
            # the site's own coeffs / pre read X (dropped, or saved at a block start): replayed
            for op in site.ops:
                if op is not site.out:
                    _tag_op(op, CheckpointPolicy.MUST_RECOMPUTE, block_id, recomputed)
            if site.out is None or site.next is None:
                continue  # last site of the chain: its output streams feed the collapse only
            if (p + 1) in start_set:
                _tag_op(site.out, CheckpointPolicy.MUST_SAVE, block_id, saved)
                if _table.BRANCH_INPUT in OPS[_mhc_kind(site.out)].outputs and not site.hard:  # fused boundary
                    _replay_h_in(graph, site.out, backward, next_id, recomputed)
            else:
                _tag_op(site.out, CheckpointPolicy.MUST_RECOMPUTE, block_id, recomputed)
                for g in site.glue:
                    if _ti.recompute_tag(g) is None:
                        _tag_op(g, CheckpointPolicy.MUST_RECOMPUTE, block_id, recomputed)
        xbytes = xv.numel() * xv.element_size() if xv is not None and not _symbolic(xv) else 0
        plans.append(ChainPlan(chain_n, L, block, starts, recomputed, saved, xbytes, bool(expand)))
    try:
        setattr(graph, _DONE_ATTR, plans)
    except AttributeError:  # pragma: no cover - fx.Graph has no __slots__
        pass
    return plans


def _symbolic(t: torch.Tensor) -> bool:
    return any(not isinstance(s, int) for s in t.shape)


# ----------------------------------------------------------------------------- the hook
_SOURCE_HASH: list = []


def _source_hash() -> str:
    if not _SOURCE_HASH:
        # the tags are written through _torch_internals and follow the op table: their sources
        # are part of the cache key too
        files = (*_ti.SOURCE_FILES, _table.__file__)
        src = Path(__file__).read_bytes() + b"".join(Path(f).read_bytes() for f in files)
        _SOURCE_HASH.append(hashlib.sha256(src).hexdigest()[:16])
    return _SOURCE_HASH[0]


@contextlib.contextmanager
def recompute_context(config: Any, report: Any = None) -> Iterator[Optional[RecomputeRecord]]:
    """Tag every joint graph compiled while open (``config.recompute`` on), else do nothing.

    The ``"mhc"`` backend wraps its inner compile call in it::

        with recompute_context(config, report):
            compiled = inner(gm, example_inputs)

    Yields a :class:`RecomputeRecord` (also kept in :func:`last_records`) that receives one list
    of :class:`ChainPlan` per joint graph, or None when recomputation is off. ``report`` (the
    passes' ResidualReport, optional) only supplies the expected chain lengths for the record.
    """
    if not config.recompute:
        yield None
        return
    from .. import _torch_internals as _ti

    override = config.recompute_block
    record = RecomputeRecord(override, [len(c.sites) for c in report.chains] if report is not None and report.chains else None)

    def hook(graph: fx.Graph) -> None:
        already = getattr(graph, _DONE_ATTR, None) is not None
        plans = tag_joint_graph(graph, block_override=override)
        if plans and not already:
            record.graphs.append(plans)

    uuid = f"mhc-recompute:{_source_hash()}:block={override}"
    _RECORDS.append(record)
    del _RECORDS[:-_MAX_RECORDS]
    with _ti.joint_graph_hook(hook, uuid):
        yield record
