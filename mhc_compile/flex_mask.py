"""A flex-attention ``BlockMask`` on another device, the tensors its mask function closes over
included (torchtitan's document mask holds the positions). ``convert`` runs a meta-device model's
capture and block recording on meta copies of the example; a ``BlockMask`` built on a real device
is moved with them (``BlockMask.to`` moves its block tables, not its ``mask_mod``'s closure)."""
from __future__ import annotations

import types
from typing import Any

import torch


def on_device(value: Any, device: torch.device) -> Any:
    """``value`` with its tensors on ``device`` when it is a flex-attention ``BlockMask`` (the
    example of a meta-device model: its mask is built on a real device), the tensors its
    ``mask_mod`` closes over included (torchtitan's document mask holds the positions); any other
    value as is."""
    from torch.nn.attention.flex_attention import BlockMask

    if not isinstance(value, BlockMask):
        return value
    moved = value.to(device)
    moved.mask_mod = _closure_on_device(value.mask_mod, device)
    return moved


def _closure_on_device(fn: Any, device: torch.device, depth: int = 0) -> Any:
    """A copy of the function ``fn`` whose closure's tensors (and closed-over functions', a few
    levels deep: ``and_masks`` of mask functions) are on ``device``; ``fn`` when it has none."""
    if not isinstance(fn, types.FunctionType) or not fn.__closure__ or depth > 4:
        return fn
    cells = []
    changed = False
    for cell in fn.__closure__:
        try:
            v = cell.cell_contents
        except ValueError:  # an empty cell
            cells.append(cell)
            continue
        if isinstance(v, torch.Tensor):
            new = v.to(device)
        elif isinstance(v, (tuple, list)):
            new = type(v)(_closure_on_device(e, device, depth + 1) for e in v)
        else:
            new = _closure_on_device(v, device, depth + 1)
        changed = changed or new is not v
        cells.append(types.CellType(new) if new is not v else cell)
    if not changed:
        return fn
    out = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, tuple(cells))
    out.__kwdefaults__, out.__dict__ = fn.__kwdefaults__, dict(fn.__dict__)
    return out
