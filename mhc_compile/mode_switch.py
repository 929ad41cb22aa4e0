"""Let ``.train()`` / ``.eval()`` switch dropout and batch norm of a captured ``GraphModule`` (adds modules, restores train/eval).

``ExportedProgram.module()`` bakes the train flag of ``aten.dropout`` / ``aten.batch_norm`` into
the graph and makes ``train()`` / ``eval()`` raise. :func:`make_mode_switchable` routes those ops
through two stateless modules (``mhc_mode_dropout``, ``mhc_mode_batch_norm``) whose ``training``
flag follows the usual ``nn.Module`` mode, and restores ``nn.Module``'s ``train``/``eval``.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import fx, nn


class _ModeDropout(nn.Module):
    """aten.dropout with the train flag read from this module's mode."""

    def forward(self, x, p):
        return F.dropout(x, p, self.training)


class _ModeBatchNorm(nn.Module):
    """aten.batch_norm with the training flag read from this module's mode."""

    def forward(self, x, weight, bias, running_mean, running_var, momentum, eps):
        return F.batch_norm(x, running_mean, running_var, weight, bias, self.training, momentum, eps)


def make_mode_switchable(gm: fx.GraphModule, training: bool) -> None:
    """Let ``gm.train()`` / ``gm.eval()`` switch dropout and batch norm of a captured graph.

    ``ExportedProgram.module()`` bakes the train flag of ``aten.dropout`` / ``aten.batch_norm``
    into the graph and makes ``train()`` / ``eval()`` raise. This routes those ops through two
    stateless modules whose ``training`` flag follows the usual ``nn.Module`` mode.
    """
    graph = gm.graph
    drop = bn = None
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is torch.ops.aten.dropout.default and len(node.args) >= 2 and not node.kwargs:
            if drop is None:
                gm.add_module("mhc_mode_dropout", _ModeDropout())
                drop = "mhc_mode_dropout"
            with graph.inserting_before(node):
                new = graph.call_module(drop, (node.args[0], node.args[1]))
        elif node.target is torch.ops.aten.batch_norm.default and len(node.args) >= 8 and not node.kwargs:
            if bn is None:
                gm.add_module("mhc_mode_batch_norm", _ModeBatchNorm())
                bn = "mhc_mode_batch_norm"
            x, w, b, rm, rv, _, momentum, eps = node.args[:8]
            with graph.inserting_before(node):
                new = graph.call_module(bn, (x, w, b, rm, rv, momentum, eps))
        else:
            continue
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    # ExportedProgram.module() binds raising train()/eval() on the instance; restore nn.Module's.
    for name in ("train", "eval"):
        gm.__dict__.pop(name, None)
        if getattr(getattr(gm, name), "__func__", None) is not getattr(nn.Module, name):
            setattr(gm, name, types.MethodType(getattr(nn.Module, name), gm))
    gm.recompile()
    nn.Module.train(gm, training)


def set_training(model: nn.Module, training: bool) -> nn.Module:
    """``model.train(training)``, tolerating modules that refuse it (torch.export's unlifted
    ``GraphModule`` raises ``NotImplementedError`` until :func:`make_mode_switchable` ran)."""
    try:
        model.train(training)
    except NotImplementedError:
        pass
    return model
