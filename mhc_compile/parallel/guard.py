"""The guard a stream-carrying block runs on every call (``forms/blocks/carry.py``): tensor parallel
with plain mHC parameters raises :class:`MHCParallelError`, never a silent partial gradient.

Under SequenceParallel with local activations (``torch.distributed.tensor.parallel`` styles,
``use_local_output=True``) the stream a block passes on is a plain tensor holding this rank's
tokens, and nothing in the mHC ops' inputs says so. The block's weights do: SequenceParallel
makes its norm weights replicated DTensors on the TP mesh (torchtitan makes every unsharded
weight one). So a block holding a non-mHC parameter that is a DTensor replicated on every mesh dim,
while one of its mHC parameters is a plain tensor, raises and names ``parallelize_mhc``.
(FSDP2 parameters are ``Shard`` on their mesh and are not taken for TP; during the forward FSDP2
has already swapped in the unsharded ones.) A DTensor stream meeting plain mHC parameters raises
in the op itself (``parallel/mixed.py``).

In a process without an initialized default process group there is no tensor parallelism to guard
(a DTensor's device mesh initializes that group), so the eager check returns at once: the walk cost
every block call 10-30 us in single-process use (``benchmarks/bench_cpu_glue.py``).
"""
from __future__ import annotations

import torch
from torch import nn

from ..placement import MHCSiteParams
from .mixed import HELPER, DTensor, MHCParallelError, Replicate


def check_block(block: nn.Module) -> None:
    """Raise when ``block`` is tensor parallel (a replicated DTensor weight outside its mHC
    containers) while one of its mHC parameters is a plain tensor (module docstring).

    It runs on every call of the block, so in eager mode it first walks the modules without names (a
    few us for a transformer layer; ``named_modules`` builds a name per module) and names the offending
    parameters only when it raises. Under ``torch.compile`` Dynamo traces ``named_modules`` (the walk's
    ``id`` set would guard every block on its own object: one recompile per block)."""
    if DTensor is None:
        return
    if torch.compiler.is_compiling():
        _check_named(block)
        return
    if not _tensor_parallel_possible():
        return
    plain = tp = False
    stack, seen = [block], set()
    while stack:
        mod = stack.pop()
        if mod is None or id(mod) in seen:
            continue
        seen.add(id(mod))
        stack += mod._modules.values()
        site = isinstance(mod, MHCSiteParams)
        for p in mod._parameters.values():
            if site:
                plain = plain or (p is not None and not isinstance(p, DTensor))
            elif isinstance(p, DTensor) and all(isinstance(pl, Replicate) for pl in p.placements):
                tp = True
    if plain and tp:
        _check_named(block)


def _tensor_parallel_possible() -> bool:
    """Whether this process has a default process group (which any device mesh, so any DTensor that could
    be tensor parallel, needs)."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized()


def _check_named(block: nn.Module) -> None:
    """The check with names: raise naming the first plain mHC parameter and the first replicated weight."""
    plain, tp = None, None
    for mname, mod in block.named_modules():
        for name, p in mod._parameters.items():
            if p is None:
                continue
            if isinstance(mod, MHCSiteParams):
                if plain is None and not isinstance(p, DTensor):
                    plain = f"{mname}.{name}" if mname else name
            elif tp is None and isinstance(p, DTensor) and all(isinstance(pl, Replicate) for pl in p.placements):
                tp = (f"{mname}.{name}" if mname else name, p.device_mesh)
    if plain is not None and tp is not None:
        raise MHCParallelError(
            f"this block is tensor parallel ({tp[0]} is a replicated DTensor on {tp[1]}) but its mHC parameter "
            f"{plain!r} is a plain tensor: under SequenceParallel each rank would train it on its own tokens "
            "only (a partial gradient, parameters drifting apart across ranks), and clip_grad_norm_ / foreach "
            f"optimizers refuse the mix. Call {HELPER} after the TP plan and before fully_shard")
