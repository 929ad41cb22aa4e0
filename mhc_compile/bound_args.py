"""Example arguments ``torch.export`` cannot take as inputs, bound into the whole-model capture.

A flex-attention ``BlockMask`` (torchtitan's default Llama passes one to every block) is neither a
tensor, a constant nor a registered pytree: export refuses it as an input ("Unsupported input
type"), and registering it as a pytree lifts its mask function's tensors into fake constants
("fake tensor in the exported program constant's list"). The whole-model capture only decides
where the residual sites and chains are, which no such argument changes, so :func:`bound_objects`
binds them to ``forward`` for the capture (``functools.partial`` on the instance, removed after)
and the capture runs under ``no_grad`` (flex attention refuses inputs that require grad on the
CPU). The stream-carrying blocks then receive the real object at every call, as a placeholder
handed to the attention module. A graph with the example's object baked in is no model for
other calls, so the whole-graph form refuses such arguments (``convert``).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Any, Iterator

import torch
from torch import nn

from .example_call import ExampleCall
from .forms.blocks.signature import is_constant

_P = inspect.Parameter


def is_opaque(value: Any) -> bool:
    """True for an argument export cannot take: a pytree leaf that is neither a tensor nor a
    constant (``None``/bool/number/string/dtype/device)."""
    if isinstance(value, torch.Tensor) or is_constant(value):
        return False
    leaves = torch.utils._pytree.tree_leaves(value)
    return len(leaves) == 1 and leaves[0] is value


def _split(call: ExampleCall) -> tuple[ExampleCall, dict]:
    """``(call, opaque)``: the call with its opaque arguments taken out by name. The positional
    arguments before the first opaque one stay positional, the others go by keyword."""
    if not call.bound:
        return call, {}
    kinds = {n: kind for n, kind, _ in call.signature.params}
    pos: list = []
    kw: dict = {}
    fixed: dict = {}
    for name, value in call.by_parameter().items():
        kind = kinds[name]
        if kind is _P.VAR_KEYWORD:
            for k, v in value.items():
                (fixed if is_opaque(v) else kw)[k] = v
        elif is_opaque(value):
            if kind is _P.POSITIONAL_ONLY:
                return call, {}
            fixed[name] = value
        elif kind is _P.POSITIONAL_ONLY or (kind is _P.POSITIONAL_OR_KEYWORD and not kw and not fixed):
            if kw or fixed:
                return call, {}
            pos.append(value)
        else:
            kw[name] = value
    if not fixed:
        return call, {}
    rest = call.without(set(fixed))
    return ExampleCall(tuple(pos), kw, rest.signature, rest.names, rest.values), fixed


@contextlib.contextmanager
def bound_objects(model: nn.Module, call: ExampleCall) -> Iterator[tuple[ExampleCall, dict]]:
    """Within: ``model.forward`` takes the call without its opaque arguments (bound to their
    example values) and grad is off; yields ``(the call without them, {name: opaque value})``.
    Without opaque arguments nothing changes."""
    rest, fixed = _split(call)
    if not fixed:
        yield call, {}
        return
    had = "forward" in model.__dict__
    previous = model.__dict__.get("forward")
    model.__dict__["forward"] = functools.partial(model.forward, **fixed)
    try:
        with torch.no_grad():
            yield rest, fixed
    finally:
        if had:
            model.__dict__["forward"] = previous
        else:
            model.__dict__.pop("forward", None)


def describe(fixed: dict) -> str:
    """``attention_masks (BlockMask)`` for messages."""
    return ", ".join(f"{n} ({type(v).__name__})" for n, v in fixed.items())
