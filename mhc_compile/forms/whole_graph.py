"""The fallback form: the model keeps its class, and its forward runs the rewritten whole graph.

Used when a chain cannot cross its blocks (the plan or a block trace says why). The model
object stays the user's (same class, module tree and state-dict keys); the mHC parameters are
registered on it at the same names as in every other path, and ``forward`` calls the rewritten
export graph through ``torch.func.functional_call`` with the model's own parameters and buffers,
so ``.to()``, optimizers, ``load_state_dict`` and ``.train()``/``.eval()`` act on the model.
Per-block FSDP2, checkpointing and compile do not apply to this form (the blocks' forwards are
not called); the report's ``form`` says which form a model has.

A call with other arguments than the example's (``labels=``, ``attention_mask=``,
``output_hidden_states=True``), or at sizes the captured program's guards refuse, captures the
model's own forward again for that call signature and rewrites it with the model's registered
mHC parameters (the same sites are required, else a ``TypeError`` says what differs), as the
blocks form traces a block again. ``use_cache=True`` stays refused: the graph returns no cache.
"""
from __future__ import annotations

import types
import warnings
from typing import Any, Optional

import torch
from torch import fx, nn

from ..example_call import ExampleCall
from ..messages import first_line
from ..placement import MHCSiteParams, attach, site_container
from .blocks.signature import ForwardSignature, call_key, describe_key
from .state import WholeGraph, state_of

MAX_VARIANTS = 16   # captured graphs per model: more call signatures or sizes than this is a misuse


def _mhc_modules(gm: fx.GraphModule):
    for path, mod in gm.named_modules():
        if isinstance(mod, MHCSiteParams) and mod._parameters:
            yield path, mod


def install_whole_graph(model: nn.Module, gm: fx.GraphModule, fixed: Optional[dict] = None,
                        example: Optional[ExampleCall] = None) -> tuple[list, WholeGraph]:
    """Register ``gm``'s mHC parameters on ``model`` and make ``model.forward`` run ``gm``; returns
    the parameter names and the :class:`WholeGraph` the caller puts in the model's state.

    ``fixed``: keyword arguments the capture set that the example did not pass (``use_cache=False``):
    a call that leaves them out gets them, a call that passes another value is refused (the graph
    has no KV cache to return). ``example``: the conversion's :class:`ExampleCall`; the graph takes
    its arguments only (positional ones by position, keyword ones by name), and another call is
    captured again for its own arguments. Every user call is bound with the same binder."""
    names = []
    for path, mod in _mhc_modules(gm):
        container, cname = site_container(model, path)
        params = attach(container, dict(mod._parameters), mod.init_recipe)
        names += [f"{cname}.{k}" for k in params]
    if example is None:
        example = ExampleCall(())
    sig = example.signature if example.bound else ForwardSignature.of(model, type(model).__name__)
    whole = WholeGraph(gm, example, sig, dict(fixed or {}))
    model.forward = types.MethodType(_whole_graph_forward, model)
    return names, whole


def _given(self: nn.Module, args: tuple, kwargs: dict) -> dict:
    """The call's arguments by name: the example's, the required ones, and any passed at other
    than its default (an argument left, or passed, at its default is no change)."""
    whole = state_of(self).whole_graph
    sig, fixed = whole.signature, whole.fixed
    want = set(whole.positional) | set(whole.keywords)
    defaults = {n: d for n, _, d in sig.params}
    # what the example passed: an argument the example gave a value that this call leaves at its
    # default is not the example's argument (the graph holds the example's, e.g. a mask tensor)
    example = whole.call.given() if whole.call.bound else {}
    given: dict = {}
    for name, value in zip(*sig.bind(args, kwargs)):  # defaults applied
        if name in fixed:
            if name in kwargs or value is not defaults[name]:  # passed: checked against the capture's value
                given[name] = value
        elif name not in defaults or value is not defaults[name]:
            given[name] = value
        elif name in want and (not whole.call.bound or example.get(name, defaults[name]) is defaults[name]):
            given[name] = value  # at its default, as in the example
    return given


def _whole_graph_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    whole = state_of(self).whole_graph
    positional, names, fixed = whole.positional, whole.keywords, whole.fixed
    given = _given(self, args, kwargs)
    for name, value in fixed.items():
        if given.get(name, value) != value:
            raise TypeError(
                f"{type(self).__name__} was converted in the whole-graph form ({state_of(self).report.form_reason}), "
                f"whose graph was captured with {name}={value!r}; it cannot be called with {name}={given[name]!r}. "
                "The whole-graph form has no KV cache (no generate()).")
    call = {**given, **fixed}
    if set(given) - set(fixed) == set(positional) | set(names):  # the example's arguments: its graph
        try:
            return _run(self, whole.graph, tuple(given[n] for n in positional),
                        {k: v for k, v in call.items() if k not in positional})
        except _SizeGuardFailed:
            pass  # other sizes than the capture allows: a graph of their own
    return _run_variant(self, call)


class _SizeGuardFailed(Exception):
    """The call's input sizes fail the captured program's guards."""


_GUARD_MESSAGES = ("Guard failed", "Expected input at")  # what an exported program's input checks raise


def _run(self: nn.Module, gm: fx.GraphModule, args: tuple, kwargs: dict) -> Any:
    if gm.training != self.training:
        gm.train(self.training)
    state = dict(self.named_parameters(remove_duplicate=False))
    state.update(self.named_buffers(remove_duplicate=False))
    try:
        return torch.func.functional_call(gm, state, args, kwargs, tie_weights=True, strict=False)
    except (RuntimeError, AssertionError, ValueError) as exc:
        if any(k in str(exc) for k in _GUARD_MESSAGES):
            raise _SizeGuardFailed(first_line(exc, 200)) from exc
        raise


def _run_variant(self: nn.Module, call: dict) -> Any:
    """Run the graph captured for this call signature (argument names, constants, tensor dtypes),
    capturing and rewriting it on first use with the model's own mHC parameters; one signature
    may hold several graphs when sizes fail the guards of the ones before."""
    variants = state_of(self).whole_graph.variants
    key = call_key(False, tuple(call), list(call.values()))
    for k, gm in variants:
        if k == key:
            try:
                return _run(self, gm, (), call)
            except _SizeGuardFailed:
                continue
    if len(variants) >= MAX_VARIANTS:
        raise TypeError(f"{type(self).__name__} (whole-graph form) was called with {MAX_VARIANTS} different "
                        f"argument signatures or sizes (now {describe_key(key)}); a number or flag that changes on "
                        "every call cannot be specialised. Pass it as a tensor.")
    gm = _capture_variant(self, call)
    state_of(self).whole_graph.variants.append((key, gm))  # fetched again: export restores the module's attributes
    return _run(self, gm, (), call)


def _capture_variant(self: nn.Module, call: dict) -> fx.GraphModule:
    """The model's own forward captured for ``call`` and rewritten with its registered mHC
    parameters; refused when the capture does not find the same sites."""
    from ..capture import capture
    from ..graph_pipeline import rewrite_graph
    from ..mode_switch import make_mode_switchable
    from ..passes.rewrite import BlockRewriteError
    from .blocks.carry import _live_provider

    if any(p.device.type == "meta" for p in self.parameters()):
        raise TypeError(f"{type(self).__name__} (whole-graph form) is on the meta device: load its weights before "
                        f"calling it with other arguments or sizes than the example's ({', '.join(call)})")
    carried = self.__dict__.pop("forward")
    try:
        # sizes: another capture when a call's fail this one's guards; grad on, so the graph trains
        with warnings.catch_warnings(), torch.enable_grad():
            warnings.simplefilter("ignore")
            gm = capture(self, (), example_kwargs=call, on_sizes=lambda *found: None)
    finally:
        self.__dict__["forward"] = carried
    why = ""
    try:
        state = state_of(self)
        report = rewrite_graph(gm, state.config, _live_provider(self))
        got, want = [s.name for s in report.sites], [s.name for s in state.report.sites]
        if got != want:
            why = f"its sites are {got}, the conversion's {want}"
    except BlockRewriteError as exc:
        why = str(exc)
    if why:
        raise TypeError(f"{type(self).__name__} (whole-graph form) was called with {', '.join(call)}; captured "
                        f"with these arguments its graph cannot take the converted residuals: {why}")
    make_mode_switchable(gm, self.training)
    return gm
