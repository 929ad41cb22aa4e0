"""DTensor sharding rules of the ``mhc::`` custom ops (``torch.distributed.tensor.experimental.register_sharding``).

The mHC math is per token: every op reads one position's ``(n, C)`` streams and that position's
coefficients, nothing else. So for a stream ``x`` of shape ``(*tokens, n, C)``:

* ``x`` sharded on a token dim ``d`` (batch, sequence: every dim but the last two), or replicated,
  passes through: the outputs that have token dims follow ``x`` (``Shard(d)``);
* the parameters (``phi``, ``alpha``, the biases) are ``Replicate``; their gradients are sums over
  tokens, so a backward op returns them ``Partial()`` when ``x`` is sharded (DTensor reduces them,
  as it does for a SequenceParallel norm weight);
* a coefficient tensor with size-1 token dims (static coefficients, broadcast over tokens) is
  ``Replicate`` and its gradient ``Partial()``.

Any other input layout (the stream or channel dim sharded, a ``Partial`` stream) is redistributed
by DTensor to the cheapest of these strategies before the kernels run; the kernels only ever see
whole ``(n, C)`` rows. Registered once, from ``mhc_compile.ops``, by :func:`register`.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch.distributed.tensor import Partial, Replicate, Shard
from torch.distributed.tensor.experimental import register_sharding

_REGISTERED = False
_R = Replicate()


def _is_spec(a: Any) -> bool:
    return hasattr(a, "placements") and hasattr(a, "shape")


def _follow(t: Any, x: Any, d: int, grad: bool = False) -> Optional[Any]:
    """Placement of a token-shaped tensor ``t`` when ``x`` is ``Shard(d)``: ``Shard(d)`` when ``t``
    has ``x``'s size on ``d``; broadcast (size 1) -> ``Replicate`` (its gradient ``Partial``)."""
    if not _is_spec(t):
        return None
    if t.shape[d] == x.shape[d]:
        return Shard(d)
    return Partial() if grad else _R


def _strategies(x: Any, build) -> list:
    """``[all Replicate] + [build(d) for every token dim d of x]``."""
    out = [build(None)]
    for d in range(len(x.shape) - 2):
        out.append(build(d))
    return out


def _rep(args: tuple) -> list:
    return [_R if _is_spec(a) else None for a in args]


def _coeffs(x, phi, alpha, b_pre, b_post, b_res, iters, eps, variant, kernels):
    args = (x, phi, alpha, b_pre, b_post, b_res, iters, eps, variant, kernels)

    def build(d):
        if d is None:
            return [_R] * 3, _rep(args)
        return [Shard(d)] * 3, [Shard(d)] + _rep(args[1:])
    return _strategies(x, build)


def _coeffs_backward(g_pre, g_post, g_res, x, phi, alpha, b_pre, b_post, b_res, iters, eps, variant, kernels):
    args = (g_pre, g_post, g_res, x, phi, alpha, b_pre, b_post, b_res, iters, eps, variant, kernels)

    def build(d):
        if d is None:
            return [_R] * 6, _rep(args)
        return [Shard(d)] + [Partial()] * 5, [Shard(d)] * 4 + _rep(args[4:])
    return _strategies(x, build)


def _pre(x, h_pre, kernels):
    def build(d):
        if d is None:
            return [_R], _rep((x, h_pre, kernels))
        return [Shard(d)], [Shard(d), _follow(h_pre, x, d), None]
    return _strategies(x, build)


def _pre_backward(grad, x, h_pre, kernels):
    def build(d):
        if d is None:
            return [_R, _R], _rep((grad, x, h_pre, kernels))
        return [Shard(d), _follow(h_pre, x, d, grad=True)], [Shard(d), Shard(d), _follow(h_pre, x, d), None]
    return _strategies(x, build)


def _post_res(x, h_out, h_post, h_res, kernels):
    def build(d):
        if d is None:
            return [_R], _rep((x, h_out, h_post, h_res, kernels))
        return [Shard(d)], [Shard(d), Shard(d), _follow(h_post, x, d), _follow(h_res, x, d), None]
    return _strategies(x, build)


def _post_res_backward(grad, x, h_out, h_post, h_res, kernels):
    def build(d):
        if d is None:
            return [_R] * 4, _rep((grad, x, h_out, h_post, h_res, kernels))
        outs = [Shard(d), Shard(d), _follow(h_post, x, d, grad=True), _follow(h_res, x, d, grad=True)]
        return outs, [Shard(d)] * 3 + [_follow(h_post, x, d), _follow(h_res, x, d), None]
    return _strategies(x, build)


def _boundary(x, h_out, h_post, h_res, phi, alpha, b_pre, b_post, b_res, iters, eps, variant, kernels):
    args = (x, h_out, h_post, h_res, phi, alpha, b_pre, b_post, b_res, iters, eps, variant, kernels)

    def build(d):
        if d is None:
            return [_R] * 5, _rep(args)
        ins = [Shard(d), Shard(d), _follow(h_post, x, d), _follow(h_res, x, d)] + _rep(args[4:])
        return [Shard(d)] * 5, ins
    return _strategies(x, build)


def _boundary_backward(g_x_next, g_pre, g_post, g_res, g_h_in, x, h_out, h_post, h_res,
                       phi, alpha, b_pre, b_post, b_res, iters, eps, variant, kernels, x_next=None):
    grads = (g_x_next, g_pre, g_post, g_res, g_h_in)
    rest = (phi, alpha, b_pre, b_post, b_res, iters, eps, variant, kernels)

    def build(d):  # x_next (the forward's X', optional) is laid out like x
        if d is None:
            return [_R] * 9, _rep(grads + (x, h_out, h_post, h_res) + rest + (x_next,))
        outs = [Shard(d), Shard(d), _follow(h_post, x, d, grad=True), _follow(h_res, x, d, grad=True)] + [Partial()] * 5
        ins = [Shard(d)] * 7 + [_follow(h_post, x, d), _follow(h_res, x, d)] + _rep(rest)
        return outs, ins + [Shard(d) if _is_spec(x_next) else None]
    return _strategies(x, build)


RULES = {
    "coeffs": _coeffs, "coeffs_backward": _coeffs_backward,
    "pre": _pre, "pre_backward": _pre_backward,
    "post_res": _post_res, "post_res_backward": _post_res_backward,
    "boundary": _boundary, "boundary_backward": _boundary_backward,
}


def register() -> None:
    """Register :data:`RULES` for ``torch.ops.mhc.<name>.default`` (once; the ops must exist)."""
    global _REGISTERED
    if _REGISTERED:
        return
    for name, rule in RULES.items():
        register_sharding(getattr(torch.ops.mhc, name).default)(rule)
    _REGISTERED = True
