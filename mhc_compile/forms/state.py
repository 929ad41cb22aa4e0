"""One typed state object per converted model, under one attribute (``model.mhc_state``).

``convert`` builds a :class:`ConvertedState` once, when the model is converted: its form, the
rewrite report and config, and what the form runs: the carried blocks (``blocks/``) or the
rewritten whole graph (:class:`WholeGraph`, which holds the conversion's :class:`ExampleCall`);
``io.pretrained`` adds the example call whose inputs a ``save_pretrained`` writes. It is frozen: a change is a new state (``dataclasses.replace``)
set with :func:`set_state`. ``model.mhc_report`` and ``model.mhc_config`` (the public names of
the README) are set from it, in the same call.

Each carried block keeps its own ``CarriedForward`` as its forward's state (``_mhc_carry``): a
block runs alone under per-block FSDP2, checkpointing and compile, without the model;
``ConvertedState.blocks`` holds the same objects by path.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Optional

from torch import fx, nn

from ..config import MHCConfig
from ..report import ResidualReport

if TYPE_CHECKING:
    from ..example_call import ExampleCall
    from .blocks.signature import ForwardSignature

STATE_ATTR = "mhc_state"
FORMS = ("blocks", "whole-graph")


@dataclass
class WholeGraph:
    """What the whole-graph form runs: the rewritten ``graph``; ``call``: the conversion's
    :class:`ExampleCall` (the graph takes its arguments: positional ones by position, keyword ones
    by name); ``signature``: the binder of every user call (the example's, or ``forward``'s when
    the example could not be bound by name); ``fixed``: keyword arguments the capture set that the
    example did not pass; ``variants``: [(call key, graph)] captured for other calls (grows as the
    model meets them)."""

    graph: fx.GraphModule
    call: "ExampleCall"
    signature: "ForwardSignature"
    fixed: dict = field(default_factory=dict)
    variants: list = field(default_factory=list)

    @property
    def positional(self) -> list:
        """The names of the example's positional arguments."""
        names = [n for n, kind, _ in self.signature.params
                 if kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        return names[:len(self.call.args)]

    @property
    def keywords(self) -> tuple:
        """The names of the example's keyword arguments."""
        return tuple(self.call.kwargs)


@dataclass(frozen=True)
class ConvertedState:
    """Everything ``convert`` leaves on a converted model. ``form``: ``"blocks"`` or
    ``"whole-graph"`` (as ``report.form``); ``blocks``: path -> CarriedForward of each carried
    block (blocks form); ``whole_graph``: the whole-graph form's graph and call; ``example``: the
    :class:`ExampleCall` of the conversion, for ``save_pretrained`` (HF models), else None."""

    form: str
    report: ResidualReport
    config: MHCConfig
    blocks: Mapping[str, Any] = field(default_factory=dict)
    whole_graph: Optional[WholeGraph] = None
    example: Optional["ExampleCall"] = None

    def __post_init__(self):
        if self.form not in FORMS:
            raise ValueError(f"ConvertedState.form={self.form!r}: one of {FORMS}")
        if (self.form == "whole-graph") != (self.whole_graph is not None):
            raise ValueError("ConvertedState: the whole-graph form, and only it, holds a WholeGraph")


def set_state(model: nn.Module, state: ConvertedState) -> None:
    """Attach ``state`` to ``model`` (not a submodule: the state dict stays the model's), with
    ``model.mhc_report`` / ``model.mhc_config`` read from it."""
    model.__dict__[STATE_ATTR] = state
    model.__dict__["mhc_report"] = state.report
    model.__dict__["mhc_config"] = state.config


def state_of(model: nn.Module) -> ConvertedState:
    """The :class:`ConvertedState` of a converted model; a ``TypeError`` for any other model."""
    state = model.__dict__.get(STATE_ATTR)
    if not isinstance(state, ConvertedState):
        raise TypeError(f"{type(model).__name__} is not a model converted by mhc_compile.convert")
    return state
