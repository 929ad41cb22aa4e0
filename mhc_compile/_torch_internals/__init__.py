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
  say which input dims a converted model is tied to: :func:`export_guards_failing`; whether an
  export runs, also inside a Dynamo trace (``torch._dynamo.assume_constant_result``): :func:`exporting`;
* activation-checkpointed regions in a Dynamo graph (the ``tag_activation_checkpoint``
  higher-order op and its body submodule): :func:`checkpoint_body`;
* operator identity of FX targets (``torch._ops.OpOverload``, its ``namespace`` and ``_schema``):
  :func:`op_namespace`, :func:`op_schema_name`;
* the autograd engine's end-of-pass callbacks (``Variable._execution_engine.queue_callback``):
  :func:`at_backward_end`, used by ``ops`` to drop a site's gradient mailbox after each pass;
* the base class of a ``__torch_dispatch__`` mode (``torch.utils._python_dispatch``):
  :func:`dispatch_mode_base`, used by ``diagnostics.record_streams``; whether any dispatch mode or
  functorch transform is active (``torch._C._len_torch_dispatch_stack``,
  ``torch._C._are_functorch_transforms_active``): :func:`plain_dispatch`, used by ``ops/cpu_paths.py``;
* fake tensors for tracing a block without compute (``torch._subclasses.FakeTensorMode`` and
  ``torch.fx.passes.fake_tensor_prop.FakeTensorProp``): :func:`fake_mode`, :func:`fake_propagate`, :func:`is_fake_tensor`,
  used by ``blocks.trace``;
* tracing a converted block again in the middle of a real forward (``blocks``): torch.fx's
  patcher revert (``torch.fx._symbolic_trace._maybe_revert_all_patches``,
  :func:`fx_patches_reverted`), the pytree registry (``torch.utils._pytree.SUPPORTED_NODES``,
  :func:`is_pytree_container`), ``nn.Module``'s forward-hook dicts
  (:func:`forward_hooks_suspended`) and ``module.compile()``'s ``_compiled_call_impl``
  (:func:`compiled_call_suspended`);
* whether calling a module runs just its class's ``forward`` (its hook dicts, the global
  ``_global_*_hooks`` of ``torch.nn.modules.module``): :func:`module_call_is_plain`, used by
  ``ops.post_res_norm`` before it runs a LayerNorm module's math in its own kernel.

``dynamo.py`` holds the backend's pieces, ``tracing.py`` the AOTAutograd, FX, fake-tensor and
nn.Module ones; this package re-exports every helper.

The torch 2.11 / triton 3.6 audit of all of these is in ``docs/gpu.md``.

Each helper degrades to ``None`` / ``False`` instead of raising when an attribute disappears, so
the backend can fall back (or fail with a clear message). ``tests/test_torch_internals.py``
checks each of them against the installed torch and fails loudly when an upgrade breaks one.
Supported: torch 2.11 to 2.15 (``torch>=2.11,<2.16``; the canaries pass on 2.11.0, 2.13.0, 2.14.1
and 2.15.0, docs/compat.md).
"""
from __future__ import annotations

from .dynamo import (
    source_name,
    source_chain,
    _step,
    resolve_root_module,
    attr_source,
    synthetic_source,
    register_param_sources,
    graph_param_names_without_source,
    current_frame_scope,
    graph_tensor_sources,
    _is_fake,
    graph_break_after,
    resumed_after_break,
    checkpoint_body,
    export_guards_failing,
    exporting,
    inner_compiler,
    registered_backends,
    active_ddp_module,
    ddp_optimizer_enabled,
    is_ddp_optimizer_piece,
    unwrap_module,
    RESUME_PREFIX,
)
from .tracing import (
    joint_graph_hook,
    set_recompute_tag,
    recompute_tag,
    op_namespace,
    op_schema_name,
    dispatch_mode_base,
    plain_dispatch,
    at_backward_end,
    engine_will_run,
    fake_mode,
    fake_propagate,
    is_fake_tensor,
    fx_patches_reverted,
    is_pytree_container,
    forward_hooks_suspended,
    compiled_call_suspended,
    module_call_is_plain,
)
from . import dynamo, tracing

SOURCE_FILES = (__file__, dynamo.__file__, tracing.__file__)  # what passes.recompute hashes into its cache key

__all__ = [
    "source_name",
    "source_chain",
    "_step",
    "resolve_root_module",
    "attr_source",
    "synthetic_source",
    "register_param_sources",
    "graph_param_names_without_source",
    "current_frame_scope",
    "graph_tensor_sources",
    "_is_fake",
    "graph_break_after",
    "resumed_after_break",
    "checkpoint_body",
    "export_guards_failing",
    "inner_compiler",
    "registered_backends",
    "active_ddp_module",
    "ddp_optimizer_enabled",
    "is_ddp_optimizer_piece",
    "unwrap_module",
    "RESUME_PREFIX",
    "joint_graph_hook",
    "set_recompute_tag",
    "recompute_tag",
    "op_namespace",
    "op_schema_name",
    "dispatch_mode_base",
    "plain_dispatch",
    "at_backward_end",
    "engine_will_run",
    "fake_mode",
    "fake_propagate",
    "is_fake_tensor",
    "fx_patches_reverted",
    "is_pytree_container",
    "forward_hooks_suspended",
    "compiled_call_suspended",
    "module_call_is_plain",
    "SOURCE_FILES",
]
