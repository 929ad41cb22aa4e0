"""The two forms of a converted model, side by side, and the one state object each carries.

``blocks/``: the modules that hold a chain's sites carry the n streams (the scale path);
``whole_graph.py``: the model keeps its class and its forward runs the rewritten whole graph
(the fallback). ``state.py``: :class:`ConvertedState`, everything ``convert`` leaves on a
converted model, under one attribute (``model.mhc_state``).
"""
from .state import ConvertedState, WholeGraph, set_state, state_of

__all__ = ["ConvertedState", "WholeGraph", "set_state", "state_of"]
