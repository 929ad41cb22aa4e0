"""Tensor / sequence parallel support: the ``mhc::`` ops on DTensors, and the mHC parameters'
layout under a tensor-parallel plan.

sharding.py   DTensor sharding rules of every ``mhc::`` op and its backward (per-token math:
              token dims pass through, stream and channel dims replicated, parameters replicated)
mixed.py      what the public op wrappers in ``mhc_compile.ops`` do with a mix of plain tensors and
              DTensors (align them to one kind, or raise :class:`MHCParallelError`)
tp.py         ``parallelize_mhc`` / :class:`MHCParallel` (a ``ParallelStyle``): the mHC parameters
              become replicated DTensors on the TP mesh
guard.py      ``check_block``: a tensor-parallel block with plain mHC parameters raises
partial_grads.py  on torch 2.11 (in-place foreach ops skip ``Partial`` DTensors, so ``clip_grad_norm_``
              never clipped them) ``parallelize_mhc`` reduces the mHC gradients when accumulated

``tp`` (``MHCParallel``, ``parallelize_mhc``; public as ``mhc_compile.parallelize_mhc``) needs
``torch.distributed``; this package does not import it, so it imports on builds without it (and
``ops``, which uses ``mixed``, does not depend on the passes that ``tp`` reads).
"""
from __future__ import annotations

from .mixed import MHCParallelError

__all__ = ["MHCParallelError"]
