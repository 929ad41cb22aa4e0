"""Tensor / sequence parallel support: the ``mhc::`` ops on DTensors, and the mHC parameters'
layout under a tensor-parallel plan.

sharding.py   DTensor sharding rules of every ``mhc::`` op and its backward (per-token math:
              token dims pass through, stream and channel dims replicated, parameters replicated)
mixed.py      what the public op wrappers in ``mhc_compile.ops`` do with a mix of plain tensors and
              DTensors (align them to one kind, or raise :class:`MHCParallelError`)
tp.py         ``parallelize_mhc`` / :class:`MHCParallel` (a ``ParallelStyle``): the mHC parameters
              become replicated DTensors on the TP mesh
guard.py      ``check_block``: a tensor-parallel block with plain mHC parameters raises

``tp`` (and so ``MHCParallel``, ``parallelize_mhc``) needs ``torch.distributed``; it is imported
on first use, so this package imports on builds without it.
"""
from __future__ import annotations

from .mixed import MHCParallelError

__all__ = ["MHCParallelError", "MHCParallel", "parallelize_mhc"]


def __getattr__(name: str):
    if name in ("MHCParallel", "parallelize_mhc"):
        from . import tp

        return getattr(tp, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
