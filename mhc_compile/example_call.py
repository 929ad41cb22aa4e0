"""The example call of a conversion: the example inputs bound once to the model's ``forward``.

:class:`ExampleCall` is made once per conversion (``pipeline.run``, ``find_residuals``, a capture
called alone) with :class:`~mhc_compile.forms.blocks.signature.ForwardSignature`, the binder the
stream-carrying blocks and the whole-graph form use for every call, and then read by everything
that needs the example's arguments by name: the capture's dynamic shapes and its guards at double
size (``capture.py``), ``use_cache=False`` for the whole-model capture, the opaque arguments bound
into it (``bound_args.py``), the size check (``sizes.py``), the whole-graph form (which arguments
its graph takes), and ``save_pretrained`` (the inputs saved with a converted HF model).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from torch import nn

from .forms.blocks.signature import ForwardSignature

_P = inspect.Parameter


@dataclass(frozen=True)
class ExampleCall:
    """``model(*args, **kwargs)`` and the same call bound to ``forward``'s parameter names.

    ``signature`` is None when ``forward`` cannot bind the call by name (a ``*args`` forward, an
    unreadable signature); then only ``args``/``kwargs`` are known and nothing is read by name."""

    args: tuple
    kwargs: dict = field(default_factory=dict)
    signature: Optional[ForwardSignature] = None
    names: tuple = ()        # bound names, defaults applied, ``**kwargs`` contents by their keys
    values: tuple = ()

    @classmethod
    def bind(cls, model: nn.Module, args: Any = (), kwargs: Optional[dict] = None) -> "ExampleCall":
        args, kwargs = tuple(args), dict(kwargs or {})
        try:
            sig = ForwardSignature.of(model, type(model).__name__)
            names, values = sig.bind(args, kwargs)
        except (TypeError, ValueError):  # BlockCallError is a TypeError
            return cls(args, kwargs)
        return cls(args, kwargs, sig, tuple(names), tuple(values))

    @property
    def bound(self) -> bool:
        return self.signature is not None

    def positional_names(self) -> list:
        """The names of the parameters that can be passed by position, in order."""
        return [n for n, kind, _ in (self.signature.params if self.signature else ())
                if kind in (_P.POSITIONAL_ONLY, _P.POSITIONAL_OR_KEYWORD)]

    def given(self) -> dict:
        """``name -> value`` of the arguments the call passes (not the defaults), in forward's order."""
        passed = set(self.positional_names()[:len(self.args)]) | set(self.kwargs)
        return {n: v for n, v in zip(self.names, self.values) if n in passed}

    def by_parameter(self) -> dict:
        """The passed arguments as ``inspect.Signature.bind(...).arguments`` gives them: the contents
        of ``**kwargs`` as one dict under its parameter's name (the structure of torch.export's
        ``dynamic_shapes`` dict); ``{}`` when unbound."""
        if not self.bound:
            return {}
        given = self.given()
        declared = {n for n, _, _ in self.signature.params}
        out = {}
        for name, kind, _ in self.signature.params:
            if kind is _P.VAR_KEYWORD:
                extra = {k: v for k, v in given.items() if k not in declared}
                if extra:
                    out[name] = extra
            elif name in given:
                out[name] = given[name]
        return out

    def takes(self, name: str) -> bool:
        """True when ``forward`` has a parameter of that name."""
        return any(n == name for n, _, _ in (self.signature.params if self.signature else ()))

    def position_of(self, name: str) -> Optional[int]:
        names = self.positional_names()
        return names.index(name) if name in names else None

    def with_keyword(self, name: str, value: Any) -> "ExampleCall":
        """The same call with ``name=value`` added (or replacing its value), without binding again."""
        names, values = list(self.names), list(self.values)
        if name in names:
            values[names.index(name)] = value
        elif self.bound:
            names.append(name)
            values.append(value)
        return ExampleCall(self.args, {**self.kwargs, name: value}, self.signature, tuple(names), tuple(values))

    def without(self, drop: set) -> "ExampleCall":
        """The same call without the arguments named in ``drop`` (all passed by keyword)."""
        keep = [(n, v) for n, v in zip(self.names, self.values) if n not in drop]
        return ExampleCall(self.args, {k: v for k, v in self.kwargs.items() if k not in drop}, self.signature,
                           tuple(n for n, _ in keep), tuple(v for _, v in keep))

    def map(self, fn: Callable[[Any], Any]) -> "ExampleCall":
        """The same call with ``fn`` applied to every argument value (names kept)."""
        return ExampleCall(tuple(fn(a) for a in self.args), {k: fn(v) for k, v in self.kwargs.items()},
                           self.signature, self.names, tuple(fn(v) for v in self.values))
