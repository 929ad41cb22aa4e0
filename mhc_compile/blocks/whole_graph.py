"""The fallback form: the model keeps its class, and its forward runs the rewritten whole graph.

Used when a chain cannot cross its blocks (the plan or a block trace says why). The model
object stays the user's (same class, module tree and state-dict keys); the mHC parameters are
registered on it at the same names as in every other path, and ``forward`` calls the rewritten
export graph through ``torch.func.functional_call`` with the model's own parameters and buffers,
so ``.to()``, optimizers, ``load_state_dict`` and ``.train()``/``.eval()`` act on the model.
Per-block FSDP2, checkpointing and compile do not apply to this form (the blocks' forwards are
not called); the report's ``form`` says which form a model has.
"""
from __future__ import annotations

import inspect
import types
from typing import Any, Optional

import torch
from torch import fx, nn

from ..messages import first_line
from ..passes.placement import MHCSiteParams, attach, site_container
from .signature import ForwardSignature


def _mhc_modules(gm: fx.GraphModule):
    for path, mod in gm.named_modules():
        if isinstance(mod, MHCSiteParams) and mod._parameters:
            yield path, mod


def install_whole_graph(model: nn.Module, gm: fx.GraphModule, fixed: Optional[dict] = None,
                        example: tuple = (0, ())) -> list:
    """Register ``gm``'s mHC parameters on ``model`` and make ``model.forward`` run ``gm``.

    ``fixed``: keyword arguments the capture set that the example did not pass (``use_cache=False``):
    a call that leaves them out gets them, a call that passes another value is refused (the graph
    has no KV cache to return). ``example``: (number of positional arguments, keyword names) of
    the example; the graph takes those only, and another call is refused saying so."""
    names = []
    for path, mod in _mhc_modules(gm):
        container, cname = site_container(model, path)
        params = attach(container, dict(mod._parameters), mod.init_recipe)
        names += [f"{cname}.{k}" for k in params]
    model.__dict__["_mhc_graph"] = gm  # not a submodule: the state dict stays the model's
    model.__dict__["_mhc_fixed"] = dict(fixed or {})
    sig = ForwardSignature.of(model, type(model).__name__)
    positional = [n for n, kind, _ in sig.params
                  if kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    model.__dict__["_mhc_example_call"] = (sig, positional[:example[0]], tuple(example[1]))
    model.forward = types.MethodType(_whole_graph_forward, model)
    return names


def _as_example_call(self: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The call arranged as the example was (its positional arguments by position, its keywords
    by name); any other set of arguments is refused, saying which the graph takes."""
    sig, positional, names = self.__dict__["_mhc_example_call"]
    fixed = self.__dict__["_mhc_fixed"]
    want = set(positional) | set(names)
    defaults = {n: d for n, _, d in sig.params}
    given: dict = {}
    for name, value in zip(*sig.bind(args, kwargs)):  # defaults applied
        if name in fixed:
            if name in kwargs or value is not defaults[name]:  # passed: checked against the capture's value
                given[name] = value
        elif name in want or name not in defaults or value is not defaults[name]:
            given[name] = value  # an argument left (or passed) at its default is no change
    if set(given) - set(fixed) != want:
        raise TypeError(
            f"{type(self).__name__} was converted in the whole-graph form ({self.mhc_report.form_reason}), whose "
            f"graph takes the example's arguments only ({', '.join(positional + list(names)) or 'none'}); got "
            f"{', '.join(given) or 'none'}. Call it that way, or convert with example inputs that include these "
            "arguments.")
    return tuple(given[n] for n in positional), {k: given[k] for k in (*names, *(k for k in fixed if k in given))}


def _whole_graph_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    gm = self.__dict__["_mhc_graph"]
    args, kwargs = _as_example_call(self, args, kwargs)
    for name, value in self.__dict__["_mhc_fixed"].items():
        if kwargs.get(name, value) != value:
            raise TypeError(
                f"{type(self).__name__} was converted in the whole-graph form ({self.mhc_report.form_reason}), "
                f"whose graph was captured with {name}={value!r}; it cannot be called with {name}={kwargs[name]!r}. "
                "The whole-graph form takes the example's arguments only (no KV cache, no generate()).")
        kwargs[name] = value
    if gm.training != self.training:
        gm.train(self.training)
    state = dict(self.named_parameters(remove_duplicate=False))
    state.update(self.named_buffers(remove_duplicate=False))
    try:
        return torch.func.functional_call(gm, state, args, kwargs, tie_weights=True, strict=False)
    except (RuntimeError, AssertionError, ValueError) as exc:
        if not any(k in str(exc) for k in _GUARD_MESSAGES):
            raise
        raise TypeError(
            f"{type(self).__name__} was converted in the whole-graph form ({self.mhc_report.form_reason}), whose "
            f"graph was captured for the example's input sizes and does not take these ({first_line(exc, 200)}). "
            "Call it with the example's sizes, or convert with example inputs of the sizes you need.") from exc


_GUARD_MESSAGES = ("Guard failed", "Expected input at")  # what an exported program's input checks raise
