"""Private Dynamo / export / inductor / DDP API used by the ``"mhc"`` backend: where a graph's
parameters come from, graph breaks and resume functions, checkpointed regions, export size
guards, inner compilers, DDP (see the package docstring)."""
from __future__ import annotations

import re
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import nn

from ..messages import first_line

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


@torch._dynamo.assume_constant_result
def exporting() -> bool:
    """Whether ``torch.export`` runs (strict or not), also where Dynamo traces the caller. Marked with
    ``torch._dynamo.assume_constant_result``, so Dynamo runs it in Python and uses the result as a constant,
    with no guard; a ``torch.compile`` trace and an export trace are separate traces. Needed because
    ``torch.compiler.is_exporting()`` traced by Dynamo reads True in every trace on torch 2.11 (2.13 and
    2.15 read False under ``torch.compile``)."""
    return torch.compiler.is_exporting()


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


