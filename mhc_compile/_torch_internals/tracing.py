"""Private AOTAutograd / FX / fake-tensor / nn.Module API: the joint-graph hook and
selective-checkpoint tags of ``passes.recompute``, operator identity, the dispatch-mode base,
fake propagation, and what ``blocks`` needs to trace a block again mid-forward (fx patch
revert, pytree containers, suspended hooks and compiled calls); see the package docstring."""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

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


def plain_dispatch() -> bool:
    """True when no ``__torch_dispatch__`` mode (fake tensors, make_fx, a counting mode) and no functorch
    transform (vmap, grad) is active: a call then reaches the kernels as it is written
    (``torch._C._len_torch_dispatch_stack``, ``torch._C._are_functorch_transforms_active``); False when
    either probe is missing, so callers take their general path."""
    try:
        return torch._C._len_torch_dispatch_stack() == 0 and not torch._C._are_functorch_transforms_active()
    except AttributeError:  # pragma: no cover - renamed in a future torch
        return False


def fake_mode() -> Any:
    """A ``FakeTensorMode`` that accepts real tensors (the model's parameters) as inputs."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


def is_fake_tensor(value: Any) -> bool:
    """Whether ``value`` is a ``FakeTensor`` (``torch._subclasses``)."""
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(value, FakeTensor)


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


_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")


def module_call_is_plain(module: nn.Module) -> bool:
    """Whether calling ``module`` runs exactly its class's ``forward``: no hook of its own (forward,
    backward) and no global module hook (``torch.nn.modules.module._global_*_hooks``, the dicts
    ``Module._call_impl`` checks), no ``forward`` set on the instance, not compiled with
    ``module.compile()``. False when a probe is missing, so callers call the module."""
    d = module.__dict__
    if "forward" in d or d.get("_compiled_call_impl") is not None:
        return False
    for name in (*_HOOK_DICTS, "_backward_hooks", "_backward_pre_hooks"):
        if d.get(name):
            return False
    mod = nn.modules.module
    for name in _GLOBAL_HOOKS:
        hooks = getattr(mod, name, None)
        if not isinstance(hooks, dict) or hooks:
            return False
    return True


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


def at_backward_end(fn) -> bool:
    """Run ``fn()`` once the autograd pass now running ends (the engine's final callbacks,
    ``Variable._execution_engine.queue_callback``). False, and ``fn`` is not queued, outside a
    backward pass or when the engine lacks the hook; callers must then not rely on it."""
    engine = getattr(torch.autograd.Variable, "_execution_engine", None)
    if engine is None or not hasattr(engine, "queue_callback"):
        return False
    try:
        engine.queue_callback(fn)
    except RuntimeError:  # "Final callbacks can only be installed during backward pass"
        return False
    return True


def engine_will_run(node) -> bool:
    """Whether the autograd pass now running will execute ``node`` (a ``grad_fn``), from
    ``torch._C._will_engine_execute_node``. False when unknown (outside a backward pass, no
    node, the engine lacks the query, or a leaf's node under ``autograd.grad``, which the engine
    does not answer): callers must then not rely on that node running."""
    query = getattr(torch._C, "_will_engine_execute_node", None)
    if query is None or node is None:
        return False
    try:
        return bool(query(node))
    except (RuntimeError, TypeError):
        return False
