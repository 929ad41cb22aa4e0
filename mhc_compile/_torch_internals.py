"""Every use of private Dynamo / AOTAutograd / inductor / DDP API in mhc-compile, and nothing else.

The ``"mhc"`` backend (``mhc_compile.backend``) needs a few things torch has no public API for:

* the frame Dynamo is compiling (to find the user's root ``nn.Module`` from the sources of the
  parameters in the graph): ``InstructionTranslator.current_tx()``, ``GraphArg.source``,
  ``gm._param_name_to_source``;
* why a graph ends (a graph break or the return) and whether it starts in a resume function:
  ``gm.compile_subgraph_reason`` and the ``torch_dynamo_resume_in_`` code-name prefix;
* (the module path of a node, ``node.meta["nn_module_stack"]``, is read in ``passes/nodes.py``,
  the one home for node naming; its spellings are guarded by ``tests/test_torch_internals.py``);
* the inner backends: ``torch._inductor.compile_fx.compile_fx``, ``lookup_backend``;
* whether DistributedDataParallel is running and whether Dynamo splits its graphs
  (``DistributedDataParallel._get_active_ddp_module()``, ``torch._dynamo.config.optimize_ddp``);
* a pass over the AOTAutograd joint graph before partitioning, for ``passes.recompute``
  (``torch._functorch.config.joint_custom_pass``, inductor's ``joint_custom_pre_pass``):
  :func:`joint_graph_hook`, canary in ``tests/test_recompute.py``;
* the partitioner's selective-checkpoint tags on joint-graph nodes (``node.meta["recompute"]``
  holding a ``CheckpointPolicy`` and ``node.meta["ac_graph_id"]``): :func:`set_recompute_tag`,
  :func:`recompute_tag`;
* the size guards ``torch.export`` records on a program (``ExportedProgram._guards_code``), to
  say which input dims a converted model is tied to: :func:`export_guards_failing`;
* activation-checkpointed regions in a Dynamo graph (the ``tag_activation_checkpoint``
  higher-order op and its body submodule): :func:`checkpoint_body`;
* operator identity of FX targets (``torch._ops.OpOverload``, its ``namespace`` and ``_schema``):
  :func:`op_namespace`, :func:`op_schema_name`;
* the base class of a ``__torch_dispatch__`` mode (``torch.utils._python_dispatch``):
  :func:`dispatch_mode_base`, used by ``diagnostics.record_streams``;
* fake tensors for tracing a block without compute (``torch._subclasses.FakeTensorMode`` and
  ``torch.fx.passes.fake_tensor_prop.FakeTensorProp``): :func:`fake_mode`, :func:`fake_propagate`,
  used by ``blocks.trace``.

The torch 2.11 / triton 3.6 audit of all of these is in ``docs/gpu.md``.

Each helper degrades to ``None`` / ``False`` instead of raising when an attribute disappears, so
the backend can fall back (or fail with a clear message). ``tests/test_torch_internals.py``
checks each of them against the installed torch and fails loudly when an upgrade breaks one.
Supported: torch 2.11 to 2.14.
"""
from __future__ import annotations

import contextlib
import re
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import nn

from .messages import first_line

RESUME_PREFIX = "torch_dynamo_resume_in_"


# ----------------------------------------------------------------------------- sources
def source_name(source: Any) -> str:
    """The guard expression of a Dynamo Source (``name`` is a property in 2.13, a method before)."""
    name = getattr(source, "name", None)
    if callable(name):
        name = name()
    return str(name) if name is not None else repr(source)


def source_chain(source: Any) -> list:
    """[root source, ..., source]: follow ``.base`` of chained sources down to the root."""
    chain = [source]
    while getattr(chain[-1], "base", None) is not None:
        chain.append(chain[-1].base)
    chain.reverse()
    return chain


def _step(obj: Any, source: Any) -> Any:
    """Apply one chained source to ``obj`` (attribute or item access); raise LookupError if unknown."""
    cls = type(source).__name__
    if hasattr(source, "member"):  # AttrSource, ParamBufferSource, UnspecializedParamBufferSource, ...
        return getattr(obj, source.member)
    if "GetItem" in cls and hasattr(source, "index"):  # DictGetItemSource, GetItemSource
        index = source.index
        if not isinstance(index, (str, int)):
            raise LookupError(f"cannot follow {cls} with index {index!r}")
        return obj[index]
    if "NNModuleSource" in cls:  # NNModuleSource / UnspecializedNNModuleSource: same object
        return obj
    raise LookupError(f"cannot follow source {cls}")


def resolve_root_module(source: Any, f_locals: dict, f_globals: dict) -> Optional[tuple[nn.Module, Any]]:
    """The outermost ``nn.Module`` on the access path of ``source`` and the Source that reaches it.

    ``L['self']._modules['blocks']...._parameters['weight']`` resolves to ``(self, LocalSource('self'))``.
    Returns None when the root is not a local or global of the frame, or no module is on the path.
    """
    chain = source_chain(source)
    root = chain[0]
    cls = type(root).__name__
    try:
        if cls == "LocalSource":
            obj = f_locals[root.local_name]
        elif cls == "GlobalSource":
            obj = f_globals[root.global_name]
        else:
            return None
        if isinstance(obj, nn.Module):
            return obj, root
        for src in chain[1:]:
            obj = _step(obj, src)
            if isinstance(obj, nn.Module):
                return obj, src
    except (LookupError, AttributeError, TypeError):
        return None
    return None


def attr_source(base: Any, dotted: str) -> Any:
    """The Source of ``<base>.a.b.c`` for ``dotted = "a.b.c"`` (one AttrSource per component)."""
    from torch._dynamo.source import AttrSource

    src = base
    for part in dotted.split("."):
        if part:
            src = AttrSource(src, part)
    return src


def synthetic_source(name: str) -> Any:
    """A unique Source for a tensor that no path from the frame reaches (never guarded on)."""
    from torch._dynamo.source import LocalSource

    return LocalSource("__mhc_param_" + re.sub(r"\W", "_", name))


def register_param_sources(gm: torch.fx.GraphModule, sources: dict[str, Any]) -> None:
    """Tell AOTAutograd where the parameters we added to a Dynamo graph module come from.

    AOTAutograd lifts every parameter of the graph module into a graph input and, for a graph
    from Dynamo, requires ``gm._param_name_to_source[name]`` for each (it uses the sources for
    duplicate-input guards and cudagraph static inputs). The dict is shared with Dynamo's
    OutputGraph, so it is copied before adding to it.
    """
    if not hasattr(gm, "_param_name_to_source"):
        return  # not a Dynamo graph (export, DDPOptimizer piece without metadata): nothing needed
    mapping = dict(gm._param_name_to_source or {})
    mapping.update(sources)
    gm._param_name_to_source = mapping


def graph_param_names_without_source(gm: torch.fx.GraphModule) -> list[tuple[str, torch.Tensor]]:
    """Parameters/buffers of a Dynamo graph module that have no entry in ``_param_name_to_source``."""
    if not hasattr(gm, "_param_name_to_source"):
        return []
    known = gm._param_name_to_source or {}
    items = list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False))
    return [(n, t) for n, t in items if n not in known]


# ----------------------------------------------------------------------------- the frame
def current_frame_scope() -> Optional[tuple[dict, dict, str]]:
    """(f_locals, f_globals, code name) of the frame Dynamo is compiling; None outside Dynamo."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
    except (ImportError, AttributeError):
        return None
    if tx is None:
        return None
    root = getattr(getattr(tx, "output", None), "root_tx", None) or tx
    f_locals = getattr(root, "f_locals", None)
    f_globals = getattr(root, "f_globals", None)
    code = getattr(root, "f_code", None)
    if f_locals is None or f_globals is None:
        return None
    return f_locals, f_globals, getattr(code, "co_name", "")


def graph_tensor_sources(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Iterator[tuple[Any, Any]]:
    """(real tensor, Dynamo Source) for each parameter or buffer the Dynamo graph reads.

    Placeholders (inlined nn modules, the default since torch 2.5) carry ``meta["grapharg"]``
    whose ``source`` is the access path and whose example is the user's real tensor; get_attr
    parameters (older non-inlined graphs) are looked up in ``gm._param_name_to_source``.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, node in enumerate(placeholders):
        grapharg = node.meta.get("grapharg")
        source = getattr(grapharg, "source", None) or getattr(node, "_dynamo_source", None)
        if source is None:
            continue
        value = example_inputs[i] if i < len(example_inputs) else None
        if not isinstance(value, torch.Tensor) or _is_fake(value):
            example = getattr(grapharg, "example", None)
            value = example if isinstance(example, torch.Tensor) else None
        if value is not None and not _is_fake(value):
            yield value, source
    name_to_source = getattr(gm, "_param_name_to_source", None) or {}
    for name, tensor in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name in name_to_source:
            yield tensor, name_to_source[name]


def _is_fake(t: torch.Tensor) -> bool:
    try:
        from torch._subclasses.fake_tensor import FakeTensor
    except ImportError:  # pragma: no cover
        return False
    return isinstance(t, FakeTensor) or t.device.type == "meta"


# ----------------------------------------------------------------------------- graph breaks
def graph_break_after(gm: torch.fx.GraphModule) -> Optional[str]:
    """Why this graph ends early: the graph-break reason with the user's file:line, else None."""
    reason = getattr(gm, "compile_subgraph_reason", None)
    if reason is None or not getattr(reason, "graph_break", False):
        return None
    text = first_line(getattr(reason, "reason", "graph break")) or "graph break"
    stack = getattr(reason, "user_stack", None) or []
    if stack:
        frame = stack[-1]
        text = f"{frame.filename}:{frame.lineno} in {frame.name}: {text}"
    return text


def resumed_after_break(code_name: str) -> Optional[str]:
    """For a Dynamo resume function (the code after a graph break) the user function and line."""
    if not code_name.startswith(RESUME_PREFIX):
        return None
    return code_name[len(RESUME_PREFIX):]


# ----------------------------------------------------------------------------- checkpoint regions
def checkpoint_body(gm: torch.fx.GraphModule, node: torch.fx.Node) -> Optional[torch.fx.GraphModule]:
    """The body of an activation-checkpointed region when ``node`` is one
    (``torch.ops.higher_order.tag_activation_checkpoint(body, *args)``, what Dynamo makes of
    ``torch.utils.checkpoint`` and ``checkpoint_wrapper``), else None."""
    hop = getattr(getattr(torch.ops, "higher_order", None), "tag_activation_checkpoint", None)
    if hop is None or node.op != "call_function" or node.target is not hop or not node.args:
        return None
    body = node.args[0]
    if not isinstance(body, torch.fx.Node) or body.op != "get_attr":
        return None
    try:
        sub = gm.get_submodule(str(body.target))
    except AttributeError:
        return None
    return sub if isinstance(sub, torch.fx.GraphModule) else None


# ----------------------------------------------------------------------------- export guards
class _Sized:
    def __init__(self, shape):
        self._shape = list(shape)

    def size(self):
        return self._shape


def export_guards_failing(ep: Any, sizes: dict) -> list:
    """The size guards of an exported program (``ExportedProgram._guards_code``, Python
    expressions over ``L['name'].size()[i]``) that inputs of the shapes ``sizes`` (forward
    argument name -> shape) would fail, e.g. ``((L['img'].size()[2] // 4)*(L['img'].size()[3] //
    4)) == 16``. Empty when torch records none, the private attribute is gone, or a guard reads
    something else."""
    code = getattr(ep, "_guards_code", None)
    if not isinstance(code, (list, tuple)):
        return []
    env = {"L": {k: _Sized(v) for k, v in sizes.items()}, "max": max, "min": min}
    failing = []
    for guard in code:
        if not isinstance(guard, str) or "size()" not in guard:
            continue
        try:
            ok = eval(guard, {"__builtins__": {}}, env)  # noqa: S307 - torch's own guard text
        except Exception:  # noqa: BLE001 - guards on other values are not ours to judge
            continue
        if not ok and guard not in failing:
            failing.append(guard)
    return failing


# ----------------------------------------------------------------------------- inner backends
def inner_compiler(name: str, mode: Optional[str] = None) -> Callable:
    """The torch.compile backend that receives the rewritten graph: inductor, aot_eager or eager."""
    if name == "eager":
        return lambda gm, example_inputs: gm.forward
    if name == "inductor":
        from torch._inductor.compile_fx import compile_fx

        patches = {}
        if mode and mode != "default":
            import torch._inductor

            patches = dict(torch._inductor.list_mode_options(mode))

        def _inductor(gm, example_inputs):
            if patches:
                return compile_fx(gm, example_inputs, config_patches=patches)
            return compile_fx(gm, example_inputs)

        return _inductor
    from torch._dynamo.backends.registry import lookup_backend

    return lookup_backend(name)


def registered_backends() -> list[str]:
    """Names of all registered torch.compile backends, entry points included."""
    from torch._dynamo.backends.registry import list_backends

    return list(list_backends(exclude_tags=()))


# ----------------------------------------------------------------------------- DDP
def active_ddp_module() -> Optional[nn.Module]:
    """The DistributedDataParallel module whose forward is running (Dynamo compiles inside it)."""
    if not torch.distributed.is_available():
        return None
    try:
        from torch.nn.parallel import DistributedDataParallel
    except ImportError:  # pragma: no cover
        return None
    getter = getattr(DistributedDataParallel, "_get_active_ddp_module", None)
    return getter() if getter is not None else None


def ddp_optimizer_enabled() -> bool:
    """Whether Dynamo splits graphs of DDP modules at bucket boundaries (``optimize_ddp``)."""
    mode = getattr(torch._dynamo.config, "optimize_ddp", False)
    if isinstance(mode, bool):
        return mode
    return mode == "ddp_optimizer"


def is_ddp_optimizer_piece(gm: torch.fx.GraphModule) -> bool:
    """Whether ``gm`` is one of the pieces DDPOptimizer split a Dynamo graph into.

    DDPOptimizer compiles each piece separately and marks it with a ``compile_subgraph_reason``
    whose user stack is a single frame named ``DDPOptimizer``.
    """
    reason = getattr(gm, "compile_subgraph_reason", None)
    stack = getattr(reason, "user_stack", None) or []
    return any(getattr(f, "name", "") == "DDPOptimizer" for f in stack) or "DDPOptimizer" in str(
        getattr(reason, "reason", "")
    )


def unwrap_module(module: nn.Module) -> tuple[nn.Module, str]:
    """Strip DDP / torch.compile wrappers: (inner module, attribute path prefix that was stripped)."""
    prefix = []
    while True:
        if isinstance(module, torch._dynamo.eval_frame.OptimizedModule):
            module = module._orig_mod
            prefix.append("_orig_mod")
            continue
        if torch.distributed.is_available():
            from torch.nn.parallel import DistributedDataParallel

            if isinstance(module, DistributedDataParallel):
                module = module.module
                prefix.append("module")
                continue
        return module, ".".join(prefix)


# ----------------------------------------------------------------------------- joint-graph hook
# (added for mhc_compile.passes.recompute; canary: tests/test_recompute.py::test_joint_graph_hook_canary)
@contextlib.contextmanager
def joint_graph_hook(fn: Callable[[torch.fx.Graph], None], uuid: str) -> Iterator[None]:
    """Run ``fn(graph)`` on every AOTAutograd joint graph traced while open, right before partitioning.

    Two private hooks, both set (``fn`` must be idempotent; it sees the same graph twice under
    inductor): ``torch._functorch.config.joint_custom_pass`` (every AOTAutograd backend:
    aot_eager, inductor, custom ``aot_autograd``) and inductor's ``joint_custom_pre_pass`` as a
    ``CustomGraphPass`` whose ``uuid`` puts ``uuid`` into inductor's FX-graph and AOTAutograd
    cache keys (the functorch hook is not part of any cache key). Passes the user already set
    keep running, after ours.
    """
    import torch._functorch.config as fconfig
    import torch._inductor.config as iconfig
    from torch._inductor.custom_graph_pass import CustomGraphPass

    existing = iconfig.joint_custom_pre_pass
    others = [] if existing is None else list(existing) if isinstance(existing, (list, tuple)) else [existing]

    class _Pass(CustomGraphPass):
        """Ours, then the user's passes, as ONE pass (older torch may not accept a list here)."""

        def __call__(self, graph: torch.fx.Graph) -> None:
            fn(graph)
            for other in others:
                other(graph)

        def uuid(self) -> Any:
            ids = [getattr(o, "uuid", lambda: None)() for o in others]
            if any(i is None for i in ids):
                return None  # a raw callable cannot be keyed: inductor bypasses its caches
            return (uuid, *ids) if ids else uuid

    previous = fconfig.joint_custom_pass

    def functorch_pass(gm: torch.fx.GraphModule, joint_inputs: Any) -> torch.fx.GraphModule:
        fn(gm.graph)
        gm.recompile()
        return previous(gm, joint_inputs) if callable(previous) else gm

    with fconfig.patch(joint_custom_pass=functorch_pass), iconfig.patch(joint_custom_pre_pass=_Pass()):
        yield


# ----------------------------------------------------------------------------- partitioner tags
# (moved here from mhc_compile.passes.recompute; canary: tests/test_torch_internals.py)
def set_recompute_tag(node: torch.fx.Node, policy: Any, graph_id: int) -> None:
    """Tag a joint-graph node for the min-cut partitioner like selective activation checkpointing.

    ``policy`` is a ``torch.utils.checkpoint.CheckpointPolicy`` (MUST_SAVE / MUST_RECOMPUTE ...);
    nodes sharing ``graph_id`` form one recompute region (the partitioner does not recompute
    across regions with different ids).
    """
    node.meta["recompute"] = policy
    node.meta["ac_graph_id"] = graph_id


def recompute_tag(node: torch.fx.Node) -> Any:
    """The ``CheckpointPolicy`` a node is tagged with, or None."""
    return node.meta.get("recompute")


# ----------------------------------------------------------------------------- operators
def op_namespace(target: Any) -> Optional[str]:
    """``"aten"``, ``"prims"``, ``"mhc"`` ... for an ``OpOverload`` FX target, None for anything else."""
    if not isinstance(target, torch._ops.OpOverload):
        return None
    return target.namespace


def op_schema_name(target: Any) -> str:
    """``"ns::name"`` from an operator's schema (``"aten::add"``, ``"mhc::pre"``), ``""`` if it has none."""
    schema = getattr(target, "_schema", None)
    return str(getattr(schema, "name", "") or "")


# ----------------------------------------------------------------------------- dispatch modes
def dispatch_mode_base() -> type:
    """``TorchDispatchMode``: subclass it and enter an instance to see every aten call below autograd."""
    from torch.utils._python_dispatch import TorchDispatchMode

    return TorchDispatchMode


def fake_mode() -> Any:
    """A ``FakeTensorMode`` that accepts real tensors (the model's parameters) as inputs."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


def fake_propagate(gm: torch.fx.GraphModule, mode: Any, *args: Any) -> None:
    """Run ``gm`` on fake ``args`` under ``mode``, recording ``node.meta["val"]`` on every node."""
    import logging

    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    logger = logging.getLogger("torch._subclasses.fake_tensor")
    level = logger.level
    logger.setLevel(logging.CRITICAL)  # an op without a fake kernel logs its traceback; the caller reports it
    try:
        FakeTensorProp(gm, mode).propagate(*args)
    finally:
        logger.setLevel(level)


def fx_patches_reverted() -> Any:
    """Inside ``torch.fx`` symbolic tracing: a context in which ``nn.Module.__call__`` and the
    other functions the tracer patched are the originals again, so a module can run on (fake)
    values without adding nodes to the graph being traced (``blocks.trace`` working out a
    dtype). Outside tracing it does nothing."""
    from torch.fx import _symbolic_trace

    return _symbolic_trace._maybe_revert_all_patches()


def is_pytree_container(a: Any) -> bool:
    """True for a value of a registered pytree node type other than a namedtuple (a
    ``transformers`` ``ModelOutput``, a registered dataclass), which ``torch.fx`` would turn into
    a plain dict or fail on when a traced block returns it."""
    import torch.utils._pytree as pytree

    return type(a) in pytree.SUPPORTED_NODES and not (isinstance(a, tuple) and hasattr(a, "_fields"))


_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs")


@contextlib.contextmanager
def forward_hooks_suspended(module: nn.Module) -> Iterator[None]:
    """No forward (pre-)hook of ``module`` or its submodules runs inside: tracing a block again
    in the middle of a real forward must not feed the caller's hooks (``transformers`` collects
    ``output_hidden_states`` / ``output_attentions`` with forward hooks on the layers)."""
    saved = []
    for m in module.modules():
        dicts = {name: getattr(m, name) for name in _HOOK_DICTS if isinstance(getattr(m, name, None), dict)}
        saved.append((m, dicts))
        for name, d in dicts.items():
            object.__setattr__(m, name, type(d)())
    try:
        yield
    finally:
        for m, dicts in saved:
            for name, d in dicts.items():
                object.__setattr__(m, name, d)


@contextlib.contextmanager
def compiled_call_suspended(module: nn.Module) -> Iterator[None]:
    """``module.compile()`` stores the compiled call in ``_compiled_call_impl``; inside, calling
    the module runs its plain ``_call_impl`` again (``torch.fx`` refuses to trace a
    dynamo-optimized function, and a block compiled per block is traced again on a new call
    signature)."""
    saved = module.__dict__.get("_compiled_call_impl")
    if saved is not None:
        module.__dict__["_compiled_call_impl"] = None
    try:
        yield
    finally:
        if saved is not None:
            module.__dict__["_compiled_call_impl"] = saved
