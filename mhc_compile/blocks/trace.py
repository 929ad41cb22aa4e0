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
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import fx, nn

from .. import _torch_internals as _ti
from ..messages import first_line
from ..flex_mask import on_device
from .signature import BlockCallError, ForwardSignature, is_constant


class BlockTraceError(RuntimeError):
    """A block's forward cannot be traced alone (the caller falls back, saying why)."""


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


def _run_recording(model: nn.Module, args: Sequence[Any], kwargs: dict, mode: Any, device: torch.device) -> None:
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
    try:
        return copy.deepcopy(value)
    except Exception:  # noqa: BLE001 - an object that cannot be copied is traced as it is
        return value


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
        _run_recording(model, args, kwargs, mode, device)
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


class _ValueProxy(fx.Proxy):
    """A proxy whose ``.dtype`` / ``.device`` are the example's (``if h.dtype == torch.float16:``
    in T5 and BART layers): the trace is specialised to them, as the call key records."""

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
        super().__init__()
        self.through = {"block", *(f"block.{p}" for p in through)}
        self.mode, self.inputs, self.values = mode, inputs or {}, {}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if type(m) is nn.Identity:  # inlined, so it vanishes as in the whole-model capture (a shortcut)
            return False
        return module_qualified_name not in self.through

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ValueProxy(node, self)

    def create_arg(self, a: Any) -> Any:
        """A pytree container other than a plain tuple/list/dict (a ``ModelOutput``, which
        ``torch.fx`` would turn into a plain dict) is rebuilt as its own type."""
        if type(a) not in (tuple, list, dict) and not isinstance(a, fx.Proxy) and _ti.is_pytree_container(a):
            leaves, spec = torch.utils._pytree.tree_flatten(a)
            return self.create_node("call_function", _rebuilder(spec), tuple(self.create_arg(x) for x in leaves), {})
        return super().create_arg(a)

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
    with _ti.forward_hooks_suspended(block), _ti.compiled_call_suspended(block):
        return _trace_block(block, call, mode, training, through)


def _trace_block(block: nn.Module, call: BlockCall, mode: Any, training: bool, through: Sequence[str]) -> BlockGraph:
    inlined = [block] + [block.get_submodule(p) for p in through]
    was = [m.training for m in inlined]
    _set_training(inlined, [training] * len(inlined))  # the inlined code only: leaves keep their own
    caller = _caller(block, call)
    carried = block.__dict__.pop("forward", None)  # a converted block is traced again: its class's forward
    try:
        inputs = {n: snapshot(v) for n, v in call.values.items() if n not in call.constants}
        inputs = dict(zip(inputs, _fake_inputs(mode, list(inputs.values()), _device_of(block))))
        tracer = _BlockTracer(set(through), mode, inputs)
        graph = tracer.trace(caller, concrete_args=dict(call.constants) or None)
    except Exception as exc:  # noqa: BLE001
        raise BlockTraceError(f"torch.fx could not trace {type(block).__name__}.forward alone "
                              f"({_cause(exc)})") from exc
    finally:
        _set_training(inlined, was)
        if carried is not None:
            block.__dict__["forward"] = carried
    for node in graph.nodes:  # targets relative to the block
        if node.op in ("call_module", "get_attr") and str(node.target).startswith("block."):
            node.target = str(node.target)[len("block."):]
    gm = fx.GraphModule(block, graph, class_name=type(block).__name__)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(call.names):
        raise BlockTraceError(f"the trace of {type(block).__name__} has {len(placeholders)} inputs for "
                              f"{len(call.names)} arguments")
    _propagate(gm, mode, [call.values[n] for n in call.names], type(block).__name__)
    return BlockGraph(gm, call, training)


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
    if any(isinstance(v, torch._subclasses.FakeTensor) or v.device.type == "meta" for v in real):
        raise BlockTraceError(f"the traced {what}.forward did not run on the example ({_cause(fake_error)})") from fake_error
    devices = [v.device for v in real if v.device.type == "cuda"][:1]
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            _RecordingInterpreter(gm, mode).run(*[snapshot(v) for v in values])
    except Exception as exc:  # noqa: BLE001
        raise BlockTraceError(f"the traced {what}.forward did not run on the example ({_cause(exc)})") from exc
