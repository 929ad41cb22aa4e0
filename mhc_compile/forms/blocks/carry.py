"""Rewrite each planned block's traced graph into its part of the chain, and install it.

For a block, the passes run on its own graph (:func:`graph_pipeline.analyze`); the sites found
there must be the ones the whole-model graph found for the block (same kinds, channels and
order), and take the whole graph's parameter names and chain positions, so the parameters and
their init are the same in every path. Then :func:`passes.rewrite.rewrite_chain_part` emits the
mHC ops with the chain's ends: the streams come in through the block's hidden-state argument
when the block is not the chain's first, and go out through its return when it is not the last.

The rewritten graph becomes Python code bound as the block's ``forward`` (an instance
attribute): the block keeps its class, submodules and parameters; the mHC parameters are
registered on it (``blocks.0.attn.mhc.phi``), so ``fully_shard(block)``, checkpointing and
``torch.compile(block)`` see them as the block's own. Each call is keyed by its signature
(``blocks.signature``); a new one traces the block again with the block's own parameters
(:class:`CarriedForward`), or raises :class:`BlockCallError` when it cannot carry the streams.
"""
from __future__ import annotations

import linecache
import operator
import types
import weakref
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional

import torch
from torch import fx, nn

from ... import _torch_internals as _ti
from ...config import MHCConfig
from ...parallel.guard import check_block
from ...placement import safe_name, site_container
from ...graph_pipeline import analyze
from ...passes.post_norm import fuse_post_norm
from ...passes.rewrite import BlockRewriteError, ChainEnds, ParamProvider, rewrite_chain_part
from ...passes.streams import stream_wise_path
from .plan import BlockPart, BlockPlan, BlockSpec
from .signature import BlockCallError, ForwardSignature, call_key, describe_key
from .trace import (BlockCall, BlockGraph, BlockRandomError, BlockTraceError, buffers_kept, call_from, record_calls,
                    tensors_inside as _tensors_inside, trace_block)


MAX_VARIANTS = 16   # traced graphs per block: more call signatures than this is a misuse


@dataclass
class CarriedForward:
    """The state behind a stream-carrying block's ``forward``: one compiled graph per call key.

    The convert-time graphs (the example call, in both modes) are made by :func:`carry_blocks`;
    a call with another key (``attention_mask`` a tensor where the example had None, a KV cache
    where it had none, ``use_cache=False``) traces the block once more with that call's values and
    rewrites it with the block's own mHC parameters; an untraceable one raises
    :class:`BlockCallError` saying what differs."""

    path: str
    spec: BlockSpec
    config: MHCConfig
    signature: ForwardSignature
    stream: Optional[tuple] = None  # (argument name, feature axis, rank) when the streams come in
    variants: dict = field(default_factory=dict)   # call key -> compiled forward(self, *values)
    source: dict = field(default_factory=dict)     # call key -> its Python source

    def __call__(self, block: nn.Module, args: tuple, kwargs: dict) -> Any:
        check_block(block)  # tensor parallel with plain mHC parameters: raise, never a partial gradient
        names, values = self.signature.bind(args, kwargs)
        key = call_key(block.training, names, values)
        fn = self.variants.get(key)
        if fn is None:
            fn = self._retrace(block, key, names, values)
        return fn(block, *values)

    @torch.compiler.disable  # a per-block compiled forward runs the retrace eagerly, then goes on
    def _retrace(self, block: nn.Module, key: tuple, names: tuple, values: list) -> Callable:
        first = next(iter(self.variants), None)
        if len(self.variants) >= MAX_VARIANTS:
            raise BlockCallError(f"{self.path} was called with {MAX_VARIANTS} different argument signatures "
                                 f"(now {describe_key(key)}); a number or flag that changes on every call "
                                 "cannot be specialised. Pass it as a tensor.")
        try:
            call = call_from(self.signature, names, values)  # the trace copies the cache objects it runs on
            if self.stream is not None:
                name = self.stream[0]
                call = replace(call, values={**call.values, name: _unwidened(call.values[name].detach(), *self.stream[1:])})
            mode = _ti.fake_mode()
            with buffers_kept(block), torch.no_grad():
                prep = _prepare(trace_block(block, call, mode, block.training, self.spec.through), self.spec)
            _check_untouched(names, values)
            fn, src = _rewrite_compile(block, prep, self.config, _live_provider(block), [],
                                       f"{self.path} {len(self.variants)}")
        except (BlockTraceError, BlockRewriteError) as exc:
            raise BlockCallError(
                f"{self.path} was converted for calls with {describe_key(first) if first else '?'} and was "
                f"called with {describe_key(key)}; traced with these arguments its forward cannot carry the "
                f"streams: {exc}") from exc
        self.variants[key], self.source[key] = fn, src
        return fn


def _check_untouched(names: tuple, values: list) -> None:
    """Raise when tracing left fake tensors in an argument the trace could not copy (a cache
    object ``deepcopy`` refuses): the real call would run on them and return FakeTensors."""
    for name, value in zip(names, values):
        if not isinstance(value, torch.Tensor) and any(
                _ti.is_fake_tensor(t) for t in _tensors_inside(value)):
            raise BlockTraceError(f"tracing it changed the argument {name!r} ({type(value).__name__}), which could "
                                  "not be copied for the trace; make that object copyable with copy.deepcopy")


def _unwidened(streams: torch.Tensor, feature_axis: int, rank: int) -> torch.Tensor:
    """A tensor of the block's original hidden-state shape (zeros), for tracing a new call: the
    streams ``(..., n, C)`` without ``n``, channels back at ``feature_axis``."""
    dims = list(streams.shape[:-2])
    dims.insert(feature_axis % rank, streams.shape[-1])
    return torch.zeros(dims, dtype=streams.dtype, device=streams.device)


def _live_provider(block: nn.Module) -> ParamProvider:
    """The block's registered mHC parameters, for the graphs traced after the conversion."""
    def get(name: str, init: dict) -> dict:
        container, _ = site_container(block, name)
        params = {k: container._parameters.get(safe_name(k)) for k in init}
        missing = [k for k, v in params.items() if v is None]
        if missing:
            raise BlockRewriteError(f"the block has no mHC parameter {name}.{missing[0]}")
        return params
    return get


def _carried_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    return self.__dict__["_mhc_carry"](self, args, kwargs)


_SHARED: "weakref.WeakValueDictionary" = weakref.WeakValueDictionary()


def _compile(graph: fx.Graph, tag: str) -> tuple[Callable, str]:
    """The graph's Python code as a function of ``(self, *args)``. Blocks whose code is the same
    text over the same globals (every middle layer of a transformer) share one function object:
    ``torch.compile`` guards on the function's code, so per-block compile of a 32-layer model
    compiles three graphs (first, middle, last layer), not 32 (dynamo's recompile limit is 8)."""
    code = graph.python_code(root_module="self")
    key = (code.src, tuple(sorted((name, id(obj)) for name, obj in code.globals.items())))
    fn = _SHARED.get(key)
    if fn is None:
        filename = f"<mhc-block {tag}>"
        linecache.cache[filename] = (len(code.src), None, code.src.splitlines(True), filename)
        scope = dict(code.globals)
        exec(compile(code.src, filename, "exec"), scope)  # noqa: S102 - code generated by torch.fx from our graph
        fn = scope["forward"]
        fn.__mhc_globals__ = scope  # the ids in the key stay taken while the function lives
        _SHARED[key] = fn
    return fn, code.src


def _relative(name: str, path: str) -> str:
    if not path:
        return name
    if not name.startswith(path + "."):
        raise BlockRewriteError(f"site parameters {name!r} do not live under the block {path!r}")
    return name[len(path) + 1:]


def _ends(graph: fx.Graph, chain, part: BlockPart) -> ChainEnds:
    first, last = chain.sites[0], chain.sites[-1]
    ends = ChainEnds(collapse_weight=not part.stream_out)
    if part.stream_in:
        for ph in (n for n in graph.nodes if n.op == "placeholder"):
            hit = stream_wise_path(ph, lambda v, _: v is first.x, first)
            if hit is not None:
                ends.stream_in, ends.lead = ph, hit[1]
                break
        else:
            raise BlockRewriteError("the chain's hidden state does not come in through an argument")
    if part.stream_out:
        out = _entry_call(graph, part.into) if part.into else next(n for n in graph.nodes if n.op == "output")
        readers = [out] if part.into else [out, *_tuple_concats(out)]
        for reader in readers:
            hit = stream_wise_path(last.add, lambda v, _: v in reader.all_input_nodes, last)
            if hit is not None:
                break
        else:
            raise BlockRewriteError(f"the block does not {'pass' if part.into else 'return'} its last residual's "
                                    f"value{f' to {part.into}' if part.into else ''}")
        ends.stream_out, ends.trail = True, hit[1]
        ends.out_node = reader
    return ends


def _tuple_concats(out: fx.Node) -> list:
    """The ``(h, ...) + rest`` nodes the output returns (``return (hidden_states,) + outputs``,
    transformers 4.x): the returned residual sits in their literal head."""
    return [n for n in out.all_input_nodes if n.op == "call_function" and n.target is operator.add
            and isinstance(n.args[0], (tuple, list))]


def _entry_call(graph: fx.Graph, child: str) -> fx.Node:
    """The one call of the child block ``child`` in an entry block's graph."""
    calls = [n for n in graph.nodes if n.op == "call_module" and str(n.target) == child]
    if len(calls) != 1:
        raise BlockRewriteError(f"it calls the next block {child!r} {len(calls)} times itself, not once")
    return calls[0]


@dataclass
class _Prepared:
    """A block's traced graph with its chains matched to the plan: nothing changed yet."""

    graph: BlockGraph
    chains: list                     # [(Chain, ChainEnds)]


def _same_kind(block_kind: str, model_kind: str) -> bool:
    """A layer scale that is its own module (DINOv2's ``Dinov2LayerScale``) is a leaf in the
    block's trace, so the block sees a plain residual where the model's graph sees ``x + γ·f(x)``."""
    return block_kind == model_kind or {block_kind, model_kind} == {"residual", "layer_scale"}


def _prepare(bg: BlockGraph, spec: BlockSpec) -> _Prepared:
    """Match the block graph's sites to the plan's; give them the model's names and positions."""
    want = [(part, s) for part in spec.parts for s in part.sites]
    axes = {s.feature_axis for _, s in want}  # the model's graph saw what the block's leaf modules hide
    detected, chains = analyze(bg.graph_module.graph, axis_hint=axes.pop() if len(axes) == 1 else None)
    got = sorted((s for c in chains for s in c.sites), key=lambda s: detected.sites.index(s))
    if len(got) != len(want):
        raise BlockRewriteError(f"its own graph has {len(got)} residual sites where the model's graph has {len(want)}")
    part_of: dict = {}
    for site, (part, ws) in zip(got, want):
        if not _same_kind(site.kind, ws.kind) or (site.channels, site.feature_axis) != (ws.channels, ws.feature_axis):
            raise BlockRewriteError(f"site {site.add.name} is a {site.kind} over {site.channels} channels in the block, "
                                    f"a {ws.kind} over {ws.channels} in the model")
        site.name, site.index_in_chain = _relative(ws.name, spec.path), ws.index_in_chain
        part_of[id(site)] = part
    out = []
    for chain in chains:
        part = part_of[id(chain.sites[0])]
        if any(part_of[id(s)] is not part for s in chain.sites) or len(chain.sites) != len(part.sites):
            raise BlockRewriteError("its sites form other chains in its own graph than in the model's")
        out.append((chain, _ends(bg.graph_module.graph, chain, part)))
    return _Prepared(bg, out)


def _block_provider(provider: ParamProvider, path: str) -> ParamProvider:
    """The caller's provider, asked with the model-relative name (``blocks.0.attn.mhc`` for the
    block's ``attn.mhc``), and the same parameters when a name is asked twice (a block traced
    once per mode)."""
    made: dict = {}

    def get(name: str, init: dict) -> dict:
        if name not in made:
            made[name] = provider(f"{path}.{name}" if path else name, init)
        return made[name]
    return get


def _prepare_block(model: nn.Module, spec: BlockSpec, call: BlockCall, mode) -> dict:
    """{training: _Prepared}: one traced graph per mode, or one for both when they are the same;
    None for the other mode when its forward draws random numbers in Python (LayerDrop)."""
    block = model.get_submodule(spec.path) if spec.path else model
    out: dict = {}
    sources: list = []
    for training in (block.training, not block.training):
        try:
            bg = trace_block(block, call, mode, training, spec.through)
        except BlockRandomError:
            if training == block.training:
                raise
            out[training] = None  # traced again when called in that mode, which raises saying why
            continue
        src = bg.graph_module.graph.python_code(root_module="self").src
        if src in sources:
            continue
        sources.append(src)
        out[training] = _prepare(bg, spec)
    return out


def _rewrite_compile(block: nn.Module, prep: _Prepared, config: MHCConfig, provider: ParamProvider,
                     names: list, tag: str) -> tuple[Callable, str]:
    gm = prep.graph.graph_module
    object.__setattr__(gm, "mhc_holder", block)  # not a submodule: the parameters go on the block
    for chain, ends in prep.chains:
        rewrite_chain_part(gm, chain, config, provider, names, ends)
    fuse_post_norm(gm)  # post-LN: LayerNorm(post_res(...)) as one op (one CPU pass in eval)
    return _compile(gm.graph, tag)


def _stream_argument(prep: _Prepared, call: BlockCall) -> Optional[tuple]:
    placeholders = [n for n in prep.graph.graph_module.graph.nodes if n.op == "placeholder"]
    for chain, ends in prep.chains:
        if ends.stream_in is not None:
            first = chain.sites[0]
            return call.names[placeholders.index(ends.stream_in)], first.feature_axis, len(first.shape)
    return None


def _install(block: nn.Module, spec: BlockSpec, call: BlockCall, prepared: dict, config: MHCConfig,
             provider: ParamProvider, names: list) -> None:
    """Rewrite the prepared graphs (registering the mHC parameters on ``block``) and bind the code."""
    path = spec.path or type(block).__name__
    carry = CarriedForward(path, spec, config, ForwardSignature.of(block, path),
                           _stream_argument(next(p for p in prepared.values() if p is not None), call))
    block_names: list = []
    _add_variants(block, carry, call, prepared, config, _block_provider(provider, spec.path), block_names,
                  spec.path or "root")
    names += [f"{spec.path}.{n}" if spec.path else n for n in block_names]
    block.__dict__["_mhc_carry"] = carry
    block.forward = types.MethodType(_carried_forward, block)


def _padded_mask_calls(model: nn.Module, plan: BlockPlan, args: tuple, kwargs: dict, main_calls: dict) -> dict:
    """{path: (call, {training: _Prepared})} for the blocks that a batch with padding calls differently.

    An example whose ``attention_mask`` is all ones lets transformers skip the mask (the blocks get
    None), but a padded batch, and any call under ``torch.compile`` (which cannot read the mask's
    values), gives them a mask tensor. Tracing that variant only when it first comes would break a
    compiled graph at every block, for good. So the example runs once more with one padded position,
    and each block whose call differs gets that variant traced now. Anything that fails here is left
    to the retrace at run time, as before."""
    mask = kwargs.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[-1] < 2 or mask.device.type == "meta" \
            or mask.is_floating_point() or not bool(mask.all()):
        return {}
    padded = mask.clone()
    padded[0, -1] = 0
    try:
        calls, mode = record_calls(model, [s.path for s in plan.blocks], args, {**kwargs, "attention_mask": padded})
    except BlockTraceError:
        return {}
    out = {}
    with buffers_kept(model):
        for spec in plan.blocks:
            call, main = calls[spec.path], main_calls[spec.path]
            block = model.get_submodule(spec.path) if spec.path else model
            if _call_key(block.training, call) == _call_key(block.training, main):
                continue
            try:
                out[spec.path] = (call, _prepare_block(model, spec, call, mode))
            except (BlockRewriteError, BlockTraceError):
                continue
    return out


def _call_key(training: bool, call: BlockCall) -> tuple:
    return call_key(training, tuple(call.names), [call.values[n] for n in call.names])


def _add_variants(block: nn.Module, carry: CarriedForward, call: BlockCall, prepared: dict, config: MHCConfig,
                  provider: ParamProvider, names: list, tag: str) -> None:
    """Rewrite the prepared graphs of ``call`` ({training: _Prepared}; one for both modes when they are
    the same, None for a mode with LayerDrop-like randomness, whose call retraces and raises) and add
    them to ``carry`` under the call's keys, leaving keys it has; the parameters come from ``provider``."""
    fns = {training: _rewrite_compile(block, prep, config, provider, names, f"{tag} training={training}")
           for training, prep in prepared.items() if prep is not None}
    for training in (False, True):
        key = _call_key(training, call)
        if fns and prepared.get(training, "same") is not None and key not in carry.variants:
            carry.variants[key], carry.source[key] = fns.get(training) or next(iter(fns.values()))


def carry_blocks(model: nn.Module, plan: BlockPlan, args: tuple, kwargs: dict, config: MHCConfig,
                 provider: ParamProvider) -> tuple[list, dict]:
    """Make every block of ``plan`` carry its part of the chains; the registered parameter names,
    and each block's ``CarriedForward`` by path (for the model's ``ConvertedState``).

    Every block is traced and matched first; :class:`BlockTraceError` / :class:`BlockRewriteError`
    (the caller falls back to the whole-graph form) are raised before ``model`` is changed."""
    calls, mode = record_calls(model, [s.path for s in plan.blocks], args, kwargs)
    prepared = []
    with buffers_kept(model):  # fake propagation through leaves may bump their statistics
        for spec in plan.blocks:
            try:
                prepared.append((spec, _prepare_block(model, spec, calls[spec.path], mode)))
            except (BlockRewriteError, BlockTraceError) as exc:
                raise type(exc)(f"{spec.path or 'the root'}: {exc}") from exc
    padded = _padded_mask_calls(model, plan, args, kwargs, calls)
    names: list = []
    carried: dict = {}
    for spec, prep in prepared:
        block = model.get_submodule(spec.path) if spec.path else model
        _install(block, spec, calls[spec.path], prep, config, provider, names)
        carried[spec.path] = block.__dict__["_mhc_carry"]
        if spec.path in padded:  # with the parameters just registered on the block
            _add_variants(block, carried[spec.path], *padded[spec.path], config, _live_provider(block), [],
                          f"{spec.path or 'root'} padded")
    return list(dict.fromkeys(names)), carried
