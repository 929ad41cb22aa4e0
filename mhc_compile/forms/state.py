"""One typed state object per converted model, under one attribute (``model.mhc_state``).

``convert`` builds a :class:`ConvertedState` once, when the model is converted: its form, the
rewrite report and config, and what the form runs: the carried blocks (``blocks/``) or the
rewritten whole graph (:class:`WholeGraph`); ``io.pretrained`` adds the example inputs a
``save_pretrained`` writes. It is frozen: a change is a new state (``dataclasses.replace``)
set with :func:`set_state`. ``model.mhc_report`` and ``model.mhc_config`` (the public names of
the README) are set from it, in the same call.

Each carried block keeps its own ``CarriedForward`` as its forward's state (``_mhc_carry``): a
block runs alone under per-block FSDP2, checkpointing and compile, without the model;
``ConvertedState.blocks`` holds the same objects by path.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from torch import fx, nn

from ..config import MHCConfig
from ..report import ResidualReport

STATE_ATTR = "mhc_state"
FORMS = ("blocks", "whole-graph")


@dataclass
class WholeGraph:
    """What the whole-graph form runs: the rewritten ``graph``; ``call`` = (ForwardSignature,
    positional names, keyword names) of the example; ``fixed``: keyword arguments the capture
    set that the example did not pass; ``variants``: [(call key, graph)] captured for other
    calls (grows as the model meets them)."""

    graph: fx.GraphModule
    call: tuple
    fixed: dict = field(default_factory=dict)
    variants: list = field(default_factory=list)


@dataclass(frozen=True)
class ConvertedState:
    """Everything ``convert`` leaves on a converted model. ``form``: ``"blocks"`` or
    ``"whole-graph"`` (as ``report.form``); ``blocks``: path -> CarriedForward of each carried
    block (blocks form); ``whole_graph``: the whole-graph form's graph and call; ``example``:
    (args, tensor kwargs) of the conversion, for ``save_pretrained`` (HF models), else None."""

    form: str
    report: ResidualReport
    config: MHCConfig
    blocks: Mapping[str, Any] = field(default_factory=dict)
    whole_graph: Optional[WholeGraph] = None
    example: Optional[tuple] = None

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
