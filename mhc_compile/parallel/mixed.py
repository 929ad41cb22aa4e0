"""Plain tensors and DTensors mixed in one mHC op call: align them to one kind, or raise.

The public wrappers in ``mhc_compile.ops`` (``coeffs``, ``pre``, ``post_res``, ``boundary``, ``collapse``)
pass their tensors here split in two groups: *token* tensors (the streams ``x``, the branch
output ``h_out``, coefficients: they have the stream's token dims) and *parameters* (``phi``,
``alpha``, biases, the collapse weight). With no DTensor among them nothing happens. Otherwise:

1. A token tensor is a DTensor (the plan hands the block DTensors, torchtitan-style): plain token
   tensors of the same local token shape take its placements (``DTensor.from_local``, e.g. a
   ``RowwiseParallel`` branch output returned local); the parameters must already be DTensors on
   the same mesh (``mhc_compile.parallelize_mhc``), else :class:`MHCParallelError`. The op then
   runs on DTensors under the rules of ``parallel/sharding.py``.
2. The token tensors are plain but the parameters are DTensors (``parallelize_mhc`` applied; the
   plan passes local tensors between blocks, as ``torch.distributed.tensor.parallel`` styles do
   with ``use_local_output=True``): what a plain stream holds on the parameters' mesh was declared
   to ``parallelize_mhc`` (``sequence_parallel``, kept by :func:`declare_local_streams`). The
   parameters enter the op as local tensors: with sequence parallel each rank's gradient is a
   partial sum over its own tokens, so the local view says so (``to_local(grad_placements=
   Partial)``) and the parameter's gradient is a ``Partial`` DTensor, reduced over the TP group
   like a SequenceParallel norm weight's; without it the gradient is already the full one.

Anything else (parameters split between plain and DTensor, two meshes, a token tensor whose local
shape does not match the stream's) raises :class:`MHCParallelError`: mixed inputs never reach the
kernels.
"""
from __future__ import annotations

import gc
import weakref
from typing import Iterable, Optional, Sequence

import torch

try:
    from torch.distributed.tensor import DTensor, Partial, Replicate
except ImportError:  # a torch build without distributed: nothing can be a DTensor
    DTensor = Partial = Replicate = None  # type: ignore[assignment,misc]

HELPER = "mhc_compile.parallelize_mhc(model, tp_mesh, sequence_parallel=...)"

# mesh -> (True when plain streams next to parameters on that mesh are sequence shards,
#          WeakSet of the modules whose parameters were declared with it)
_LOCAL_STREAMS: dict = {}


class MHCParallelError(RuntimeError):
    """An mHC op or block met a tensor-parallel layout it cannot run correctly; the message says what to do."""


def declare_local_streams(mesh, sequence_parallel: bool, owners: Iterable = ()) -> None:
    """Record what a plain (local) stream holds next to mHC parameters replicated on ``mesh``, for
    the modules ``owners``. One layout per mesh while any module declared with another is alive
    (the ops see tensors, not modules): a conflict raises."""
    sp = bool(sequence_parallel)
    old = _LOCAL_STREAMS.get(mesh)
    if old is not None and old[0] != sp:
        gc.collect()
        if len(old[1]):
            raise MHCParallelError(
                f"parallelize_mhc was called on mesh {mesh} with sequence_parallel={old[0]} for a model that is "
                f"still alive, and now with sequence_parallel={sp}: local streams on one TP mesh must have one "
                "layout (use another mesh object, or drop the other model)")
        old = None
    if old is None:
        old = _LOCAL_STREAMS[mesh] = (sp, weakref.WeakSet())
    old[1].update(owners)


def local_streams_sharded(mesh) -> Optional[bool]:
    entry = _LOCAL_STREAMS.get(mesh)
    return None if entry is None else entry[0]


def any_dtensor(tensors: Sequence) -> bool:
    return DTensor is not None and any(isinstance(t, DTensor) for t in tensors)


def token_zeros(x: torch.Tensor, tail: tuple, dtype: torch.dtype) -> torch.Tensor:
    """Zeros of shape ``(*x.shape[:-2], *tail)``, laid out like ``x``'s token dims when ``x`` is a DTensor
    (a zero gradient for an unused coefficient output; ``new_zeros`` on a DTensor gives a plain tensor)."""
    shape = (*x.shape[:-2], *tail)
    if DTensor is None or not isinstance(x, DTensor):
        return x.new_zeros(shape, dtype=dtype)
    from torch.distributed.tensor import zeros

    lead = x.ndim - 2
    placements = [pl if pl.is_shard() and pl.dim % x.ndim < lead else Replicate() for pl in x.placements]
    return zeros(shape, dtype=dtype, device_mesh=x.device_mesh, placements=placements)


def align(tokens: Sequence[Optional[torch.Tensor]], params: Sequence[Optional[torch.Tensor]]) -> tuple[list, list]:
    """``(tokens, params)`` all plain or all DTensors on one mesh (module docstring); ``None`` kept."""
    tokens, params = list(tokens), list(params)
    if not any_dtensor(tokens) and not any_dtensor(params):
        return tokens, params
    ref = next((t for t in tokens if isinstance(t, DTensor)), None)
    if ref is not None:
        return [_like(t, ref) for t in tokens], [_param_for(p, ref.device_mesh) for p in params]
    return tokens, _local_params(params)


def _like(t: Optional[torch.Tensor], ref: "DTensor") -> Optional[torch.Tensor]:
    """A token tensor as a DTensor with the stream ``ref``'s placements."""
    if t is None:
        return None
    if isinstance(t, DTensor):
        if t.device_mesh != ref.device_mesh:
            raise MHCParallelError(f"mHC op inputs live on two meshes ({t.device_mesh} and {ref.device_mesh})")
        return t
    lead = ref.ndim - 2
    with torch.no_grad():
        local = tuple(ref.to_local().shape)
    if t.dim() < lead or tuple(t.shape[:lead]) != local[:lead]:
        raise MHCParallelError(
            f"a plain tensor of shape {tuple(t.shape)} meets a DTensor stream of local shape "
            f"{local} ({ref.placements}) in an mHC op: its layout is unknown. "
            "Return the block's branch outputs as DTensors (use_local_output=False) or as the local "
            "shard of the stream's token layout")
    shape = tuple(ref.shape[:lead]) + tuple(t.shape[lead:])
    return DTensor.from_local(t, ref.device_mesh, ref.placements, run_check=False, shape=shape,
                              stride=torch.empty(shape, device="meta").stride())


def _param_for(p: Optional[torch.Tensor], mesh) -> Optional[torch.Tensor]:
    if p is None or isinstance(p, DTensor) and p.device_mesh == mesh:
        return p
    if isinstance(p, DTensor):
        raise MHCParallelError(
            f"an mHC parameter is a DTensor on mesh {p.device_mesh} while the stream is a DTensor on "
            f"{mesh}: call {HELPER} with the stream's TP mesh, after the TP plan and before fully_shard")
    raise MHCParallelError(
        f"the stream is a DTensor on {mesh} ({_placements(mesh)}) but the mHC parameters are plain "
        f"tensors: their gradients would not be reduced over the tensor-parallel group. Call {HELPER} "
        "after the TP plan and before fully_shard")


def _placements(mesh) -> str:
    return "mesh dims " + ", ".join(mesh.mesh_dim_names or ()) if mesh.mesh_dim_names else "tensor parallel"


def _local_params(params: list) -> list:
    """Plain streams, DTensor parameters: the parameters' local views (module docstring, case 2)."""
    meshes = {p.device_mesh for p in params if isinstance(p, DTensor)}
    if len(meshes) > 1 or any(p is not None and not isinstance(p, DTensor) for p in params):
        raise MHCParallelError("an mHC op's parameters are partly DTensors and partly plain tensors (or on two "
                               f"meshes); apply {HELPER} to the whole model, before fully_shard")
    mesh = meshes.pop()
    sharded = local_streams_sharded(mesh)
    if sharded is None:
        raise MHCParallelError(
            f"the mHC parameters are DTensors on {mesh} but the stream is a plain tensor, and "
            f"parallelize_mhc was not told what a plain stream holds there: call {HELPER} with "
            "sequence_parallel=True when blocks pass local sequence shards (SequenceParallel), False "
            "when they pass the whole replicated hidden state")
    out = []
    for p in params:
        if p is None:
            out.append(None)
            continue
        if not all(isinstance(pl, Replicate) for pl in p.placements):
            p = p.redistribute(placements=[Replicate()] * mesh.ndim)
        grads = [Partial() if sharded else Replicate()] * mesh.ndim
        out.append(p.to_local(grad_placements=grads))
    return out
