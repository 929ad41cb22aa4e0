"""How a call of a stream-carrying block is bound to names and keyed to one of its traced graphs.

A block's traced graph is specialised to the ``None``/bool/number/string arguments of the call
it was traced for (``blocks.trace``). Every call is bound here to the block's forward parameter
names (``**kwargs`` contents by their keys, as :func:`blocks.trace.bind_call` names them) and
given a :func:`call_key`: the mode, the names, each specialised value, and the structure of the
others (a tensor and its dtype, a tuple of two tensors, a cache object of some class). Calls with the same key
run the same graph; a new key is traced once more (``blocks.carry``). Binding is plain Python
over a parameter list read once, so it costs microseconds per call.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch

_CONSTANT_TYPES = (type(None), bool, int, float, str, torch.dtype, torch.device)
_EMPTY = inspect.Parameter.empty


class BlockCallError(TypeError):
    """A stream-carrying block was called with arguments its converted forward does not cover."""


def is_constant(v: Any) -> bool:
    """True for the values a trace specialises to (and a call key holds as they are)."""
    if isinstance(v, (tuple, list)):
        return all(is_constant(e) for e in v)
    return isinstance(v, _CONSTANT_TYPES)


def _structure(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return ("tensor", v.dtype)  # a trace may read a dtype (T5, BART): it is part of the key
    if isinstance(v, (tuple, list)):
        return (type(v).__name__, tuple(_structure(e) for e in v))
    if isinstance(v, _CONSTANT_TYPES):
        return (type(v).__name__, v)  # bool and int apart: True == 1 and hash alike
    return ("object", type(v))


def call_key(training: bool, names: tuple, values: list) -> tuple:
    """The key of a bound call: calls with equal keys are traced to the same graph."""
    return (bool(training), names, tuple(_structure(v) for v in values))


def describe_key(key: tuple) -> str:
    """``attention_mask=None, use_cache=True, past_key_values=<DynamicCache>`` for messages."""
    def one(s):
        if isinstance(s, tuple) and s and s[0] == "tensor":
            return f"<{str(s[1]).replace('torch.', '')} tensor>"
        if isinstance(s, tuple) and s and s[0] == "object":
            return f"<{s[1].__name__}>"
        if isinstance(s, tuple) and len(s) == 2 and isinstance(s[1], tuple):
            return "(" + ", ".join(one(e) for e in s[1]) + ")"
        return repr(s[1]) if isinstance(s, tuple) and len(s) == 2 else repr(s)
    training, names, structure = key
    return ", ".join(f"{n}={one(s)}" for n, s in zip(names, structure)) + f" ({'training' if training else 'eval'})"


@dataclass
class ForwardSignature:
    """The parameters of a block class's ``forward`` (without ``self``), read once."""

    path: str
    params: list          # [(name, kind, default)]

    @classmethod
    def of(cls, block: torch.nn.Module, path: str) -> "ForwardSignature":
        params = list(inspect.signature(type(block).forward).parameters.values())[1:]
        return cls(path, [(p.name, p.kind, p.default) for p in params])

    def bind(self, args: tuple, kwargs: dict) -> tuple[tuple, list]:
        """``(names, values)`` of a call, defaults applied, in the order ``bind_call`` gives."""
        names: list = []
        values: list = []
        rest = dict(kwargs)
        i = 0
        for name, kind, default in self.params:
            if kind is inspect.Parameter.VAR_POSITIONAL:
                if i < len(args):
                    raise BlockCallError(f"{self.path}: a stream-carrying block takes no *{name} values")
                continue
            if kind is inspect.Parameter.VAR_KEYWORD:
                names += list(rest)
                values += list(rest.values())
                rest = {}
                continue
            positional = kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
            if positional and i < len(args):
                if name in rest:
                    raise BlockCallError(f"{self.path}: forward got multiple values for argument {name!r}")
                v = args[i]
                i += 1
            elif name in rest and kind is not inspect.Parameter.POSITIONAL_ONLY:
                v = rest.pop(name)
            elif default is not _EMPTY:
                v = default
            else:
                raise BlockCallError(f"{self.path}: forward is missing the argument {name!r}")
            names.append(name)
            values.append(v)
        if i < len(args):
            raise BlockCallError(f"{self.path}: forward takes {i} positional arguments, got {len(args)}")
        if rest:
            raise BlockCallError(f"{self.path}: forward got an unexpected keyword argument {next(iter(rest))!r}")
        return tuple(names), values
