"""The mHC parameters under tensor parallel: replicated DTensors on the TP mesh, and the guard.

Under tensor parallel the mHC parameters are **replicated** over the TP group, as norm weights are.
With SequenceParallel each rank computes the mHC coefficients of its own tokens only, so each
rank's parameter gradient is a partial sum: it must be reduced over the group. Making the
parameters ``Replicate`` DTensors on the TP mesh (what ``SequenceParallel`` does for norm weights)
gives that reduction from DTensor (a ``Partial`` gradient, reduced by ``fully_shard`` or on first
use by the optimizer), and ``clip_grad_norm_`` / ``AdamW(foreach=True)`` then see DTensors only.

Two ways in, the same effect:

    mhc_compile.parallelize_mhc(model, tp_mesh, sequence_parallel=True)      # beside the plan
    parallelize_module(model, tp_mesh, MHCParallel(sequence_parallel=True))  # a ParallelStyle

``sequence_parallel`` says what a *plain* stream holds inside a block (``True``: this rank's
sequence shard, SequenceParallel with local activations; ``False``: the whole hidden state). A
DTensor stream carries its own layout. Call it after the TP plan and before ``fully_shard``.

Forgetting it raises instead of training on partial gradients: ``parallel/guard.py`` for plain
streams, ``parallel/mixed.py`` for DTensor streams. On torch 2.11, whose ``clip_grad_norm_``
leaves ``Partial`` gradients unclipped, the mHC gradients are reduced when accumulated
(``parallel/partial_grads.py``).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle

from ..engine_init import is_titan_container
from ..placement import MHCSiteParams
from .mixed import HELPER, MHCParallelError, declare_local_streams
from .partial_grads import foreach_skips_partial, replicate_partial_grads


def _containers(module: nn.Module) -> list[MHCSiteParams]:
    return [m for m in module.modules() if isinstance(m, MHCSiteParams)]


class MHCParallel(ParallelStyle):
    """Replicate every mHC parameter under the module (all ``MHCSiteParams`` containers, the learned
    collapse weights included) as a DTensor on the TP mesh; see the module docstring.

    Keyword Args:
        sequence_parallel (bool): whether a plain (local) stream inside a block is this rank's
            sequence shard (SequenceParallel) or the whole replicated hidden state.
    """

    def __init__(self, *, sequence_parallel: bool):
        super().__init__()
        if not isinstance(sequence_parallel, bool):
            raise TypeError("MHCParallel(sequence_parallel=...) takes True or False")
        self.sequence_parallel = sequence_parallel

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        containers = _containers(module)
        declare_local_streams(device_mesh, self.sequence_parallel, containers)
        for container in containers:
            for name, p in list(container._parameters.items()):
                if p is None:
                    continue
                if isinstance(p, DTensor):
                    if p.device_mesh == device_mesh and all(isinstance(pl, Replicate) for pl in p.placements):
                        continue  # already done (a second call, or a plan that reaches it twice)
                    if is_titan_container(container):
                        raise MHCParallelError(
                            f"mHC parameter {name!r} is already a DTensor on {p.device_mesh} ({p.placements}), "
                            "placed by torchtitan's parallelize (the container's sharding_config): a torchtitan "
                            "model needs no parallelize_mhc call")
                    raise MHCParallelError(
                        f"mHC parameter {name!r} is already a DTensor on {p.device_mesh} ({p.placements}): call "
                        "parallelize_mhc after the TP plan and before fully_shard")
                src = getattr(self, "src_data_rank", 0)
                kw = {} if src == 0 or p.is_meta else {"src_data_rank": src}
                value = distribute_tensor(p.detach(), device_mesh, [Replicate()] * device_mesh.ndim, **kw)
                container.register_parameter(name, nn.Parameter(value, requires_grad=p.requires_grad))
        if foreach_skips_partial(device_mesh):  # torch 2.11 would not clip their gradients: partial_grads.py
            replicate_partial_grads(p for c in containers for p in c.parameters())
        return module

    def __repr__(self) -> str:
        return f"MHCParallel(sequence_parallel={self.sequence_parallel})"


def parallelize_mhc(model: nn.Module, tp_mesh, *, sequence_parallel: bool) -> nn.Module:
    """Make every mHC parameter of ``model`` a replicated DTensor on ``tp_mesh`` (in place; returns
    ``model``). Call after the TP plan (``parallelize_module`` / torchtitan's ``parallelize``) and
    before ``fully_shard``. ``sequence_parallel``: see :class:`MHCParallel`."""
    if not _containers(model):
        raise MHCParallelError("the model has no mHC parameters (MHCSiteParams): convert it first")
    return MHCParallel(sequence_parallel=sequence_parallel)._apply(model, tp_mesh)
