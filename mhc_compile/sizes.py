"""Which input sizes a converted model really cannot vary (the size warning of ``convert``).

The capture says which dims its program keeps static (``capture.capture``: a fixed number of
patches, a literal size in a view), but the converted model does not always run that program:
the blocks form runs the model's own forward around traced blocks, which are generic over sizes
(Whisper's decoder length, CLIP's text length). So before warning, ``convert`` runs the
converted model with those dims doubled (no grad, buffers and random state restored; on fake
tensors for a meta-device model): all of them at once, then, when that fails, each group of
dims of the same example size (a token dim and its attention mask's together). Only the dims
whose doubled run fails are named.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn

if TYPE_CHECKING:
    from .example_call import ExampleCall


def _doubled(args: tuple, kwargs: dict, dims: Sequence[tuple]) -> tuple[tuple, dict]:
    """The example with each (input, dim) of ``dims`` twice as long (the input concatenated
    with itself: token ids and masks stay valid)."""
    leaves, spec = torch.utils._pytree.tree_flatten((tuple(args), dict(kwargs)))
    tensors = [i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor)]
    for i, d, _ in dims:
        k = tensors[i] if i < len(tensors) else None
        if k is not None:
            leaves[k] = torch.cat([leaves[k], leaves[k]], dim=d)
    return torch.utils._pytree.tree_unflatten(leaves, spec)


def _runs(model: nn.Module, args: tuple, kwargs: dict) -> bool:
    from .forms.blocks.trace import run_example
    from ._torch_internals import fake_mode

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        run_example(model, args, kwargs, fake_mode(), device)
    except Exception:  # noqa: BLE001 - any failure means the size is fixed
        return False
    return True


def _input_names(call: ExampleCall) -> list:
    """The forward argument name of each tensor leaf of the example ('' when not a plain tensor)."""
    if not call.bound:
        return []
    names = []
    for name, value in call.by_parameter().items():
        names += [name if isinstance(value, torch.Tensor) else ""] * len(
            [v for v in torch.utils._pytree.tree_leaves(value) if isinstance(v, torch.Tensor)])
    return names


def fixed_sizes(model: nn.Module, call: ExampleCall, static: list, guards: list) -> tuple[list, list]:
    """(the (input, dim, size) triples of ``static`` that ``model`` cannot run at twice the
    size, the guards of ``guards`` that name those inputs)."""
    if not static:
        return [], guards
    args, kwargs = call.args, call.kwargs
    if _runs(model, *_doubled(args, kwargs, static)):
        return [], []
    groups: dict = {}
    for triple in static:
        groups.setdefault(triple[2], []).append(triple)
    fixed = [t for group in groups.values() if not _runs(model, *_doubled(args, kwargs, group)) for t in group]
    names = _input_names(call)
    bad = {names[i] for i, _, _ in fixed if i < len(names) and names[i]}
    if len(bad) == len({i for i, _, _ in fixed}):
        guards = [g for g in guards if any(f"L['{n}']" in g for n in bad)]
    return fixed, guards
