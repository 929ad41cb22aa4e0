"""Replicated mHC gradients where torch's in-place foreach ops leave ``Partial`` DTensors unchanged.

Under SequenceParallel each TP rank holds a partial sum of a replicated parameter's gradient
(a ``Partial`` DTensor), reduced by DTensor on first use. torch 2.11 runs an in-place foreach
op on a ``Partial`` DTensor (``torch._foreach_mul_``) on a reduced copy and leaves the gradient
itself unchanged. ``clip_grad_norm_(foreach=True)``, the default on CUDA, scales gradients that
way, so on 2.11 the gradients of replicated parameters are never clipped: the mHC parameters (and
SequenceParallel's own norm weights) train differently from one process, with no error.
Measured on 2 gloo ranks: a gradient of norm 3.9 clipped to 0.5 kept its unclipped values (max
error 2.06); after 3 AdamW steps of a TP + SP Llama an mHC ``phi`` was 3.4e-3 from one process
(5e-3 of its norm), the plain model's ``norm.weight`` 3.7e-4. torch 2.13 and later clip it.

:func:`foreach_skips_partial` asks torch once (a one-element probe on the TP mesh, collective
like the rest of ``parallelize_mhc``). Where the probe finds the bug, :func:`replicate_partial_grads`
reduces each mHC gradient to ``Replicate`` as soon as it is accumulated: the all-reduce the
optimizer would run on first use anyway, one per parameter and step, now before clipping.
Under FSDP2 the sharded parameters ``fully_shard`` creates do not carry the hook; FSDP2 reduces
their gradients itself.
"""
from __future__ import annotations

import weakref
from typing import Iterable, Optional

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate

_SKIPS: Optional[bool] = None  # the probe's answer, the same on every rank of a job
_HOOKED: "weakref.WeakSet[nn.Parameter]" = weakref.WeakSet()  # a second parallelize_mhc adds no hook


def foreach_skips_partial(mesh) -> bool:
    """Whether ``torch._foreach_mul_`` leaves a ``Partial`` DTensor on ``mesh`` unchanged (torch
    2.11). Collective on a mesh of more than one rank the first time; cached afterwards. A
    one-rank mesh never shows it (no reduction), so it answers False there without caching."""
    global _SKIPS
    if _SKIPS is None:
        if mesh.size() < 2:
            return False
        probe = DTensor.from_local(torch.ones(1, device=mesh.device_type), mesh,
                                   [Partial()] * mesh.ndim, run_check=False)
        torch._foreach_mul_([probe], 0.5)
        _SKIPS = bool(probe.to_local().item() != 0.5)
    return _SKIPS


def _reduce_partial(p: nn.Parameter) -> None:
    g = p.grad
    if isinstance(g, DTensor) and any(pl.is_partial() for pl in g.placements):
        p.grad = g.redistribute(placements=[Replicate() if pl.is_partial() else pl for pl in g.placements])


def replicate_partial_grads(params: Iterable[nn.Parameter]) -> list:
    """Reduce each parameter's ``Partial`` DTensor gradient to ``Replicate`` when it is accumulated
    (a post-accumulate-grad hook, once per parameter); returns the new hooks' handles."""
    handles = []
    for p in params:
        if p.requires_grad and p not in _HOOKED:
            handles.append(p.register_post_accumulate_grad_hook(_reduce_partial))
            _HOOKED.add(p)
    return handles
