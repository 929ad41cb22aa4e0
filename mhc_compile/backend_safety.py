"""The backend's refusals for graphs it cannot rewrite correctly (issue #13, item 3).

Dynamo may hand the ``"mhc"`` backend a graph that would give a silently wrong model. Two such
cases are refused here with an :class:`~mhc_compile.backend.MHCBackendError` that says what to do:

* **A graph reused for another instance.** With inlined nn modules (torch's default), Dynamo
  reuses the graph compiled for one instance of a class for every other instance of it: two
  models of one class, or ``torch.compile(block)`` on each of several identical blocks. The
  rewritten graph holds the first instance's mHC parameters, so the second would silently train
  the first one's. :func:`guard_instance` wraps the compiled function: it checks at each call
  that one of the root's own parameters is the tensor passed in (one lookup and one identity
  test), and raises otherwise.
* **A model wrapped by FSDP2.** After ``fully_shard`` (per block or at the root) the parameters
  the backend would create are plain tensors outside every FSDP unit: never sharded, their
  gradients never reduced, and per-block units split the graph so the streams cannot cross the
  blocks. :func:`refuse_fully_sharded` raises; ``mhc_compile.convert`` before ``fully_shard`` is
  the way (the converted blocks carry the streams).
* **A block compiled on its own.** ``torch.compile(block, backend="mhc")`` on a module that is a
  child of another module (the per-block style of torchtitan and HF ``model.compile()``) would
  give each block its own chain, expanded and collapsed inside it: not the model asked for.
  :func:`refuse_child_root` raises when the graph's root module is registered as a child of a
  live module other than a compile / DDP wrapper.
* **Residuals inside activation-checkpointed regions.** ``torch.utils.checkpoint`` /
  ``checkpoint_wrapper`` regions reach the backend as higher-order ops whose body is a subgraph
  the passes do not rewrite. When a body holds residual sites, :func:`refuse_checkpointed_sites`
  raises instead of compiling the model unchanged.
"""
from __future__ import annotations

import weakref
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from . import _torch_internals as _ti


class MHCBackendError(RuntimeError):
    """The mhc backend cannot rewrite this graph safely (no owning module, DDP, optimizer misuse...)."""


def _probe(root: nn.Module, example_inputs: Sequence[Any]) -> Optional[tuple[int, str]]:
    """(input index, parameter path in ``root``) of the first graph input that is one of the
    root's own parameters, or None (no parameter is an input: nothing to check)."""
    by_id = {id(p): name for name, p in root.named_parameters()}
    for i, value in enumerate(example_inputs):
        if isinstance(value, torch.Tensor) and id(value) in by_id:
            return i, by_id[id(value)]
    return None


def _is_dtensor(t: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - builds without distributed
        return False
    return isinstance(t, DTensor)


def guard_instance(fn: Callable, root: nn.Module, example_inputs: Sequence[Any], num_sites: int) -> Callable:
    """``fn`` (the compiled graph), refusing to run on another instance of the root's class."""
    probe = _probe(root, example_inputs) if num_sites else None
    if probe is None:
        return fn
    index, path = probe
    ref, cls = weakref.ref(root), type(root).__name__

    def check(args: Sequence[Any]) -> None:
        owner = ref()
        if owner is None or index >= len(args):
            return
        try:
            expected = owner.get_parameter(path)
        except AttributeError:
            return
        if args[index] is not expected and not _is_dtensor(expected):
            raise MHCBackendError(
                f"mhc: torch.compile reused the graph compiled for one {cls} for another instance of it "
                f"(parameter {path!r} is not the one the graph was rewritten for). The graph holds the first "
                "instance's mHC parameters, so this one would silently run and train those. This happens when "
                "two models of one class are compiled with backend='mhc' in one process, or when each of several "
                "identical blocks is compiled on its own. Compile the whole model once (not each block), and "
                "convert any other instance with mhc_compile.convert(model, config, example_inputs) instead."
            )

    def run(*args):  # Dynamo calls a backend's result with the graph inputs unpacked
        check(args)
        return fn(*args)

    return run


def refuse_checkpointed_sites(gm: torch.fx.GraphModule) -> None:
    """Raise when an activation-checkpointed region of ``gm`` holds residual sites."""
    from .graph_pipeline import analyze

    found = []
    for node in gm.graph.nodes:
        body = _ti.checkpoint_body(gm, node)
        if body is None:
            continue
        detected, _ = analyze(body.graph)
        if detected.sites:
            found.append((node.name, len(detected.sites)))
    if found:
        where = ", ".join(f"{name} ({k} site(s))" for name, k in found[:4])
        raise MHCBackendError(
            f"mhc: the residual adds of this model sit inside activation-checkpointed regions ({where}), which "
            "the backend does not rewrite; compiling would give the model back without mHC there. Apply "
            "mhc_compile.convert(model, config, example_inputs) first and checkpoint the converted model, or "
            "remove torch.utils.checkpoint / checkpoint_wrapper and let the backend recompute the mHC ops "
            "(MHCConfig.recompute)."
        )


def refuse_fully_sharded(root: nn.Module) -> None:
    """Raise when ``root`` or a module in it is FSDP2-wrapped (``fully_shard``)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - builds without distributed
        return
    units = [name or type(root).__name__ for name, m in root.named_modules() if isinstance(m, FSDPModule)]
    if units:
        shown = ", ".join(units[:4]) + (", ..." if len(units) > 4 else "")
        raise MHCBackendError(
            f"mhc: this model is wrapped by FSDP2 fully_shard ({shown}). The mHC parameters the backend would "
            "create here are plain tensors outside every FSDP unit (not sharded, gradients never reduced across "
            "ranks), and per-block units cut the graph so the streams cannot cross the blocks. Convert first: "
            "model = mhc_compile.convert(model, config, example_inputs), then fully_shard each block and the "
            "root, and compile the blocks with the default inductor backend (docs/distributed.md)."
        )


# torch.compile's OptimizedModule, DistributedDataParallel, torch.export's temporary root wrapper
_WRAPPER_KEYS = ("_orig_mod", "module", "_export_root")


def _child_names(module: nn.Module) -> list:
    """The names under which live modules hold ``module`` as a child (``_modules[name]``),
    the torch.compile / DDP wrapper slots excluded."""
    import gc

    gc.collect()  # a wrapper that is garbage (not yet collected) is no parent
    names = []
    for ref in gc.get_referrers(module):
        if not isinstance(ref, dict):
            continue
        keys = [k for k, v in ref.items() if v is module and isinstance(k, str)]
        if not keys or any(k in _WRAPPER_KEYS for k in keys):
            continue
        if any(isinstance(o, dict) and o.get("_modules") is ref for o in gc.get_referrers(ref)):
            names += keys
    return names


def refuse_child_root(root: nn.Module) -> None:
    """Raise when ``root`` (the module whose graph holds residual sites) is a child of another
    module: compiling it alone would cut the streams at its boundary."""
    names = _child_names(root)
    if names:
        raise MHCBackendError(
            f"mhc: this graph is {type(root).__name__}, held by another module as its child {names[0]!r}, compiled on "
            "its own. Each such block would get its own streams, expanded and collapsed inside it, so the streams "
            "would not cross the blocks. Compile the whole model with backend='mhc', or convert it with "
            "mhc_compile.convert(model, config, example_inputs) (its blocks carry the streams) and compile the "
            "blocks with the default inductor backend."
        )
