"""Trace a block's own forward, with every child module a leaf, and record example values.

The example call of each block is taken from one forward of the whole model: a real one under
``no_grad`` with the buffers restored after it (so the block sees what real calls pass it), or,
for a meta-device model, one under a ``FakeTensorMode`` (nothing allocated). The block graph's
example values come from fake propagation either way; arguments that are neither tensors nor
constants (a KV cache) are copied when recorded (:func:`snapshot`), so propagation sees them as
the block did and never changes the caller's. ``torch.fx`` then traces the block's forward
alone: child modules stay ``call_module`` nodes (attention, caches and keyword arguments pass
through them untouched), tensors and other objects are placeholders, and
``None``/bool/number/string arguments are specialised: the traced graph is only valid for
those values (a call with others is traced again, :mod:`.signature`, :mod:`.carry`).
A block whose forward branches on ``self.training`` gives one graph per mode.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import operator
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import fx, nn

from ... import _torch_internals as _ti
from ...messages import first_line
from ...passes.tuple_fold import fold_tuple_getitems
from ...flex_mask import on_device
from .signature import BlockCallError, ForwardSignature, is_constant


class BlockTraceError(RuntimeError):
    """A block's forward cannot be traced alone (the caller falls back, saying why)."""


class BlockRandomError(BlockTraceError):
    """A block's forward draws random numbers in Python in this mode (LayerDrop in training)."""


@dataclass
class BlockCall:
    """One example call of a block: its arguments bound to its forward's parameter names."""

    names: list              # argument names, in order (no self; **kwargs contents by their keys)
    values: dict             # name -> example value (defaults applied)
    constants: dict          # name -> value the trace is specialised to
    keyword: list            # the names passed to the block by keyword


@dataclass
class BlockGraph:
    graph_module: fx.GraphModule   # the block as root; its graph is rewritten in place
    call: BlockCall
    training: bool


def _fake_inputs(mode: Any, values: Sequence[Any], device: torch.device) -> list:
    def fake(v):
        if isinstance(v, torch.Tensor):
            return mode.from_tensor(v.to(device) if device.type == "meta" else v)
        return on_device(v, device) if device.type == "meta" else v  # a BlockMask of a meta model
    return [torch.utils._pytree.tree_map(fake, v) for v in values]


def run_example(model: nn.Module, args: Sequence[Any], kwargs: dict, mode: Any, device: torch.device) -> None:
    """One forward of ``model`` on the example: real (so the blocks see exactly the arguments a
    real call gives them: a library may build a mask under fake tensors that it skips on real
    ones), with every buffer restored afterwards; on fake tensors for a meta-device model."""
    if device.type == "meta":
        with mode, torch.no_grad():
            fargs = _fake_inputs(mode, args, device)
            fkw = dict(zip(kwargs, _fake_inputs(mode, list(kwargs.values()), device)))
            model(*fargs, **fkw)
        return
    devices = [device] if device.type == "cuda" else []
    # the caller's random streams (dropout in training mode) and statistics are left as they were
    with buffers_kept(model), torch.no_grad(), torch.random.fork_rng(devices=devices):
        model(*args, **kwargs)


def snapshot(value: Any) -> Any:
    """A copy of an argument that is neither a tensor nor a constant (a KV cache, which the later
    layers of the same forward change and fake propagation must not touch); the value itself
    when it cannot be copied."""
    if isinstance(value, torch.Tensor) or is_constant(value):
        return value
    if isinstance(value, (tuple, list)):
        return type(value)(snapshot(e) for e in value)
    if type(value) is dict:
        return {k: snapshot(v) for k, v in value.items()}
    # a cache filled in a training forward holds non-leaf tensors, which deepcopy refuses: copy
    # those as detached clones (the trace must never write fake keys into the caller's cache)
    memo = {id(t): t.detach().clone() for t in tensors_inside(value) if t.grad_fn is not None}
    try:
        return copy.deepcopy(value, memo)
    except Exception:  # noqa: BLE001 - an object that cannot be copied is traced as it is
        return value


def tensors_inside(value: Any, depth: int = 4) -> list:
    """The tensors an object holds in its attributes, lists, tuples and dicts (a few levels:
    ``DynamicCache.layers[i].keys``)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if depth == 0:
        return []
    if isinstance(value, (list, tuple)):
        items = value
    elif isinstance(value, dict):
        items = list(value.values())
    else:
        items = list(getattr(value, "__dict__", {}).values())
    return [t for item in items for t in tensors_inside(item, depth - 1)]


@contextlib.contextmanager
def buffers_kept(model: nn.Module):
    """Restore every buffer of ``model`` on exit (batch-norm statistics a tracing run updated,
    on real or through fake propagation)."""
    saved = {name: b.detach().clone() for name, b in model.named_buffers() if b.device.type != "meta"}
    try:
        yield
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name in saved:
                    b.copy_(saved[name])


def _cause(exc: BaseException) -> str:
    """``TypeName: first line`` of an exception, for the fallback reasons."""
    return f"{type(exc).__name__}: {first_line(exc, 200)}"


def _device_of(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def record_calls(model: nn.Module, paths: Sequence[str], args: Sequence[Any], kwargs: dict):
    """``({path: BlockCall}, fake mode)`` from one forward of ``model``; each block must run once."""
    seen: dict = {p: [] for p in paths}
    hooks = []
    for path in paths:
        block = model.get_submodule(path) if path else model
        hooks.append(block.register_forward_pre_hook(
            lambda mod, a, k, path=path: seen[path].append((snapshot(a), snapshot(k))), with_kwargs=True))
    device = _device_of(model)
    mode = _ti.fake_mode()
    try:
        run_example(model, args, kwargs, mode, device)
    except Exception as exc:  # noqa: BLE001 - reported as the fallback reason
        raise BlockTraceError(f"the model did not run on the example ({_cause(exc)})") from exc
    finally:
        for h in hooks:
            h.remove()
    calls = {}
    for path, got in seen.items():
        if len(got) != 1:
            raise BlockTraceError(f"module {path or 'the root'!r} ran {len(got)} times in one forward, not once")
        block = model.get_submodule(path) if path else model
        calls[path] = bind_call(block, *got[0])
    return calls, mode


def bind_call(block: nn.Module, args: tuple, kwargs: dict) -> BlockCall:
    """The call bound to names: the forward's parameters, then the keyword arguments a
    ``**kwargs`` parameter received (each its own name, so the trace sees a real dict)."""
    sig = ForwardSignature.of(block, type(block).__name__)
    try:
        names, values = sig.bind(args, kwargs)
    except BlockCallError as exc:
        raise BlockTraceError(str(exc)) from exc
    return call_from(sig, names, values)


def call_from(sig: ForwardSignature, names: tuple, values: list) -> BlockCall:
    """The :class:`BlockCall` of a call :meth:`ForwardSignature.bind` has bound."""
    positional_only = {n for n, kind, _ in sig.params if kind is inspect.Parameter.POSITIONAL_ONLY}
    bound = dict(zip(names, values))
    constants = {n: v for n, v in bound.items() if is_constant(v)}
    return BlockCall(list(names), bound, constants, [n for n in names if n not in positional_only])


class _Caller(nn.Module):
    """Holds the block; :func:`_caller` gives it a ``forward(<the call's names>)`` that calls
    the block with them: one placeholder per argument, ``**kwargs`` contents included."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block


def _caller(block: nn.Module, call: BlockCall) -> nn.Module:
    pos = [n for n in call.names if n not in call.keyword]
    args = ", ".join(pos + [f"{n}={n}" for n in call.keyword])
    src = f"def forward(self, {', '.join(call.names)}):\n    return self.block({args})\n"
    scope: dict = {}
    exec(compile(src, f"<mhc-call {type(block).__name__}>", "exec"), scope)  # noqa: S102 - our own two lines
    cls = type(f"Call{type(block).__name__}", (_Caller,), {"forward": scope["forward"]})  # fx traces type(root).forward
    return cls(block)


_CONCRETE_ATTRS = ("dtype", "device")


def mhc_after_setitem(value: Any, done: Any) -> Any:
    """``value`` after the item assignment ``done`` (its node orders later reads after it)."""
    return value


def _mask_builders() -> tuple:
    """Library functions that build attention masks with Python branches on the mask's contents
    (HF's ``create_bidirectional_mask`` skips an all-ones mask): called, not traced into, when an
    entry block builds its own mask (Wav2Vec2's encoder). Only when transformers is loaded."""
    import sys

    mod = sys.modules.get("transformers.masking_utils")
    names = ("create_bidirectional_mask", "create_causal_mask", "create_sliding_window_causal_mask",
             "create_chunked_causal_mask")
    return tuple(getattr(mod, n) for n in names if mod is not None and callable(getattr(mod, n, None)))


class _ValueProxy(fx.Proxy):
    """A proxy whose ``.dtype`` / ``.device`` are the example's (``if h.dtype == torch.float16:``
    in T5 and BART layers): the trace is specialised to them, as the call key records.

    An item assignment (``hidden_states[~mask] = 0`` in Wav2Vec2's encoder) is recorded as
    ``operator.setitem`` then :func:`mhc_after_setitem`, which the proxy stands for from then
    on: later reads come after the assignment in the data flow (a chain starting there expands
    the assigned value), and the caller's tensor is still changed in place, as in the original."""

    def __setitem__(self, key: Any, value: Any) -> None:
        done = self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})
        self.node = self.tracer.create_proxy("call_function", mhc_after_setitem, (self, done), {}).node

    def __getattr__(self, k: str) -> Any:
        if k in _CONCRETE_ATTRS:
            v = self.tracer.value_of(self.node)
            if isinstance(v, torch.Tensor):
                return getattr(v, k)
        return super().__getattr__(k)


class _BlockTracer(fx.Tracer):
    """Child modules are leaves, except the block itself, the modules on the way to a residual
    add (``through``, paths relative to the block) and ``nn.Identity``, whose code is inlined. The example
    value of a node is worked out on fake tensors when the code asks a proxy for its dtype or
    device (:meth:`value_of`; None when it cannot be)."""

    def __init__(self, through: set, mode: Any = None, inputs: Optional[dict] = None):
        super().__init__(autowrap_functions=_mask_builders())
        self.through = {"block", *(f"block.{p}" for p in through)}
        self.mode, self.inputs, self.values = mode, inputs or {}, {}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if type(m) is nn.Identity:  # inlined, so it vanishes as in the whole-model capture (a shortcut)
            return False
        return module_qualified_name not in self.through

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ValueProxy(node, self)

    def to_bool(self, obj: fx.Proxy) -> bool:
        raise fx.proxy.TraceError(
            f"its Python code branches on a tensor's value ({obj.node.name}: data-dependent control flow, "
            "e.g. a check of an attention mask's contents), which one traced graph cannot follow")

    def create_arg(self, a: Any) -> Any:
        """A pytree container other than a plain tuple/list/dict (a ``ModelOutput``, which
        ``torch.fx`` would turn into a plain dict) is rebuilt as its own type."""
        if type(a) not in (tuple, list, dict) and not isinstance(a, fx.Proxy) and _ti.is_pytree_container(a):
            leaves, spec = torch.utils._pytree.tree_flatten(a)
            return self.create_node("call_function", _rebuilder(spec), tuple(self.create_arg(x) for x in leaves), {})
        if not isinstance(a, (fx.Proxy, torch.Tensor, nn.Module, type)) and not is_constant(a) \
                and type(a) not in (tuple, list, dict, slice):
            path = self._attribute_path(a)  # a module's config handed to a mask builder: that very object
            if path is not None:
                return self.create_node("get_attr", path, (), {})
        return super().create_arg(a)

    def _attribute_path(self, obj: Any) -> Optional[str]:
        """``block.config`` when ``obj`` is an attribute of a module of the traced tree."""
        for name, mod in self.root.named_modules():
            for attr, value in vars(mod).items():
                if value is obj and not attr.startswith("_"):
                    return f"{name}.{attr}" if name else attr
        return None

    def value_of(self, node: fx.Node) -> Any:
        if node not in self.values:
            self.values[node] = None
            inputs = node.all_input_nodes
            known = [self.value_of(n) for n in inputs]  # each input on its own, before this node
            if self.mode is not None and all(v is not None or n.op == "placeholder" for n, v in zip(inputs, known)):
                env = dict(zip(inputs, known))
                try:
                    with _ti.fx_patches_reverted(), self.mode, torch.no_grad():
                        self.values[node] = self._evaluate(node, env)
                except Exception:  # noqa: BLE001 - unknown: the proxy stays symbolic
                    pass
        return self.values[node]

    def _evaluate(self, node: fx.Node, env: dict) -> Any:
        if node.op == "placeholder":
            if node.target not in self.inputs:
                raise KeyError(node.target)
            return self.inputs[node.target]
        if node.op == "get_attr":
            return _fetch(self.root, str(node.target))
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), env.__getitem__)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        if node.op == "call_module":
            return self.root.get_submodule(str(node.target))(*args, **kwargs)
        raise KeyError(node.op)


def _rebuilder(spec: Any):
    """A function that rebuilds one pytree container from its leaves (the graph's target)."""
    def mhc_rebuild_output(*leaves: Any) -> Any:
        return torch.utils._pytree.tree_unflatten(list(leaves), spec)
    return mhc_rebuild_output


def _fetch(root: nn.Module, target: str) -> Any:
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _set_training(mods: list, flags: list) -> None:
    for m, flag in zip(mods, flags):
        object.__setattr__(m, "training", flag)


def trace_block(block: nn.Module, call: BlockCall, mode: Any, training: bool, through: Sequence[str] = ()) -> BlockGraph:
    """The block's forward as an FX graph (in ``training`` mode), with fake example values. No
    forward hook of the block or its children runs meanwhile (a caller's hooks collecting
    outputs must see the real call only), and a block compiled with ``block.compile()`` is
    traced through its plain call."""
    with _ti.forward_hooks_suspended(block), _ti.compiled_call_suspended(block), _carried_suspended(block):
        return _trace_block(block, call, mode, training, through)


@contextlib.contextmanager
def _carried_suspended(block: nn.Module):
    """A converted block traced again, and the converted blocks it calls (an entry block's
    layers), run their class's forward meanwhile: the graph being traced is the original one."""
    carried = {m: m.__dict__.pop("forward") for m in block.modules()
               if "forward" in m.__dict__ and (m is block or "_mhc_carry" in m.__dict__)}
    try:
        yield
    finally:
        for m, fn in carried.items():
            m.__dict__["forward"] = fn


def _trace_block(block: nn.Module, call: BlockCall, mode: Any, training: bool, through: Sequence[str]) -> BlockGraph:
    inlined = [block] + [block.get_submodule(p) for p in through]
    was = [m.training for m in inlined]
    _set_training(inlined, [training] * len(inlined))  # the inlined code only: leaves keep their own
    caller = _caller(block, call)
    try:
        inputs = {n: snapshot(v) for n, v in call.values.items() if n not in call.constants}
        inputs = dict(zip(inputs, _fake_inputs(mode, list(inputs.values()), _device_of(block))))
        tracer = _BlockTracer(set(through), mode, inputs)
        with _no_python_random(type(block).__name__):
            graph = tracer.trace(caller, concrete_args=dict(call.constants) or None)
    except BlockTraceError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise BlockTraceError(f"torch.fx could not trace {type(block).__name__}.forward alone "
                              f"({_cause(exc)})") from exc
    finally:
        _set_training(inlined, was)
    for node in graph.nodes:  # targets relative to the block
        if node.op in ("call_module", "get_attr") and str(node.target).startswith("block."):
            node.target = str(node.target)[len("block."):]
    fold_tuple_getitems(graph)  # ``((h,) + rest)[0]`` -> ``h``: the chain passes through (passes/tuple_fold.py)
    gm = fx.GraphModule(block, graph, class_name=type(block).__name__)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(call.names):
        raise BlockTraceError(f"the trace of {type(block).__name__} has {len(placeholders)} inputs for "
                              f"{len(call.names)} arguments")
    _propagate(gm, mode, [call.values[n] for n in call.names], type(block).__name__)
    return BlockGraph(gm, call, training)


def _random_states() -> list:
    """The torch (CPU), Python and numpy random states."""
    import random

    import numpy

    return [torch.random.get_rng_state(), random.getstate(), numpy.random.get_state()]


def _same_random_state(a: list, b: list) -> bool:
    return torch.equal(a[0], b[0]) and a[1] == b[1] and a[2][0] == b[2][0] and bool((a[2][1] == b[2][1]).all()) \
        and a[2][2:] == b[2][2:]


@contextlib.contextmanager
def _no_python_random(what: str):
    """Refuse a trace that drew random numbers in Python: ``torch.rand([]) < p`` (LayerDrop) or
    ``np.random.random()`` decides once at trace time, and the graph would keep that one draw
    for every call. The random states are restored either way."""
    import random

    import numpy

    before = _random_states()
    try:
        yield
    finally:
        after = _random_states()
        torch.random.set_rng_state(before[0])
        random.setstate(before[1])
        numpy.random.set_state(before[2])
    if not _same_random_state(before, after):
        raise BlockRandomError(
            f"{what}.forward draws random numbers in Python while it runs (a random choice such as LayerDrop's "
            "`torch.rand([]) < p`), which a traced graph would fix to one draw for every call; turn it off "
            "(for HF models config.layerdrop = 0.0) before converting, or use the model in the other mode")


class _RecordingInterpreter(fx.Interpreter):
    """Runs a graph on real values and records each node's value as a fake tensor."""

    def __init__(self, gm: fx.GraphModule, mode: Any):
        super().__init__(gm)
        self.mode = mode

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        n.meta["val"] = torch.utils._pytree.tree_map(
            lambda t: self.mode.from_tensor(t) if isinstance(t, torch.Tensor) else t, out)
        return out


def _propagate(gm: fx.GraphModule, mode: Any, values: list, what: str) -> None:
    """``node.meta["val"]`` for every node: fake propagation, or, when an op has no fake kernel
    for these inputs (a grouped matmul of an MoE on the CPU), one real run of the block on the
    example (no grad, random state and buffers as they were). Each run sees its own copy of the
    arguments that are not tensors (a cache)."""
    try:
        _ti.fake_propagate(gm, mode, *[snapshot(v) for v in values])
        return
    except Exception as exc:  # noqa: BLE001
        fake_error = exc
    real = [v for v in torch.utils._pytree.tree_leaves(values) if isinstance(v, torch.Tensor)]
    if any(_ti.is_fake_tensor(v) or v.device.type == "meta" for v in real):
        raise BlockTraceError(f"the traced {what}.forward did not run on the example ({_cause(fake_error)})") from fake_error
    devices = [v.device for v in real if v.device.type == "cuda"][:1]
    try:
        fresh = [torch.utils._pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, snapshot(v))
                 for v in values]  # an item assignment in the block must not reach the caller's tensors
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            _RecordingInterpreter(gm, mode).run(*fresh)
    except Exception as exc:  # noqa: BLE001
        raise BlockTraceError(f"the traced {what}.forward did not run on the example ({_cause(exc)})") from exc
