"""Models that already have hyper-connections: a residual state that already carries a stream axis.

DeepSeek-V4, GLM5-Next, HY-V4 and HY-V4-VL (transformers 5.25) keep their residual as a
``(B, T, n, C)`` state: the embedding is expanded to n streams (``unsqueeze(2).expand(..., n, ...)``),
every layer reads a weighted sum over the stream axis and adds its output back to each stream, and
the head collapses the streams (a sum over the stream axis). Widening that state again would mix
over the wrong axis, so its adds are not sites.

:func:`find_native_streams` reads it off the graph: an ``expand`` of an activation that turns a size-1
dim (not the batch, not the last) into ``n > 1``, followed by an add of the expanded shape and a
reduction over that dim. When the model cannot be captured (Qwen4-Exp, whose ``(B, T, n*C)`` state
does not export), :func:`native_from_modules` recognises it from its config and module names alone.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

from torch import fx, nn

from ..report import NativeStreamsReport
from .nodes import module_path, node_val, same_shape, target_name

_REDUCE = {"sum", "mean"}
_HC_CONFIG_KEYS = ("hc_mult", "hc_count", "num_hc_streams", "hyper_connection_streams")
_HC_MODULE = re.compile(r"hyper_?conn|hyperconn|(^|\.)(attn|ffn)_hc$|(^|\.)hc_head$", re.IGNORECASE)


@dataclass
class NativeStreams:
    """A residual state that already carries ``streams`` streams on dim ``axis`` of ``shape``."""

    axis: int
    streams: int
    shape: tuple
    expanded_in: str                                  # module path of the expand ('' = the root)
    collapsed_in: list = field(default_factory=list)  # module paths of the reductions over the axis
    adds: list = field(default_factory=list)          # FX nodes of the adds on the state

    def describe(self) -> str:
        """The one line the report and ``convert`` print."""
        mods = self.modules()
        where = ", ".join(mods[:3]) + (f", ... ({len(mods)} modules)" if len(mods) > 3 else "")
        return (f"the residual state {_shape(self.shape)} already carries {self.streams} streams on dim {self.axis} "
                f"(expanded in {self.expanded_in or 'the root'}, collapsed in "
                f"{', '.join(self.collapsed_in[:2]) or '?'}; adds in {where or '-'}): not widened again")

    def modules(self) -> list:
        return sorted({module_path(a) for a in self.adds})


def _shape(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def _reduces_over(node: fx.Node, axis: int, rank: int) -> bool:
    if target_name(node) not in _REDUCE or not node.args:
        return False
    src = node.args[0]
    shape = getattr(node_val(src), "shape", None) if isinstance(src, fx.Node) else None
    if shape is None or len(shape) != rank:
        return False
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    dims = dims if isinstance(dims, (list, tuple)) else [dims]
    return any(isinstance(d, int) and (d + rank if d < 0 else d) == axis for d in dims)


def _new_axis(node: fx.Node) -> Optional[tuple]:
    """(axis, n) when ``node`` expands a size-1 dim (not the batch, not the last) of a value to n > 1."""
    if target_name(node) != "expand" or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    sin = getattr(node_val(node.args[0]), "shape", None)
    sout = getattr(node_val(node), "shape", None)
    if sin is None or sout is None or len(sin) != len(sout) or len(sout) < 3:
        return None
    for k in range(1, len(sout) - 1):
        n = sout[k]
        if isinstance(n, int) and n > 1 and sin[k] == 1:
            return k, n
    return None


def find_native_streams(graph: fx.Graph, descendants, is_input) -> list:
    """The graph's native multi-stream states (see the module docstring). ``descendants(node)`` gives
    a node's data-flow descendants; ``is_input(placeholder)`` whether it is an input (not a weight)."""
    if not any(target_name(n) == "expand" for n in graph.nodes):
        return []
    activations: set = set()
    for n in graph.nodes:
        if n.op == "placeholder" and is_input(n):
            activations |= descendants(n)
    found = []
    for node in graph.nodes:
        hit = _new_axis(node) if node in activations else None
        if hit is None:
            continue
        axis, n = hit
        rank = len(node_val(node).shape)
        desc = descendants(node)
        adds = [d for d in desc if target_name(d) in ("add", "add_", "__add__", "__iadd__") and same_shape(d, node)]
        collapse = [d for d in desc if _reduces_over(d, axis, rank)]
        if adds and collapse:
            state = NativeStreams(axis, n, tuple(node_val(node).shape), module_path(node),
                                  sorted({module_path(c) for c in collapse}, key=lambda p: (p.count("."), p)), adds)
            found.append(state)
    return found


def state_of(native: list, node: fx.Node) -> Optional[NativeStreams]:
    """The native state ``node`` (an add) belongs to, if any."""
    for state in native:
        if any(node is a for a in state.adds):
            return state
    return None


def native_from_modules(model: nn.Module) -> Optional[NativeStreamsReport]:
    """The report of a model whose config and module names say it has hyper-connections (used
    when the graph cannot be had: the stream axis is then unknown, -1), else None."""
    configs = [getattr(model, "config", None)]
    configs += [getattr(configs[0], k, None) for k in ("text_config", "get_text_config")]
    streams = None
    for cfg in configs:
        for key in _HC_CONFIG_KEYS:
            value = getattr(cfg, key, None) if cfg is not None and not callable(cfg) else None
            if isinstance(value, int) and value > 1:
                streams = (key, value)
                break
        if streams:
            break
    mods: list = []
    for name, m in model.named_modules():
        hc = name and (_HC_MODULE.search(name) or re.search(r"HyperConnection|HyperHead", type(m).__name__))
        if hc and not any(name.startswith(p + ".") for p in mods):
            mods.append(name)
    if streams is None or not mods:
        return None
    where = ", ".join(mods[:3]) + (f", ... ({len(mods)} modules)" if len(mods) > 3 else "")
    return NativeStreamsReport(-1, streams[1], [], mods, (
        f"config.{streams[0]} = {streams[1]} and the modules {where} say it already has hyper-connections "
        f"(its residual state carries {streams[1]} streams; it could not be captured to tell on which dim): "
        "not widened again"))
