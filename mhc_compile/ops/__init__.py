"""torch.library custom ops under the ``mhc`` namespace: the only bridge between passes and kernels.

Ops (``x`` is a stream tensor of shape (..., n, C); see ``reference`` for the math):

    mhc::coeffs(x, phi, alpha, b_pre, b_post, b_res, iters, eps, variant, kernels)
        -> (h_pre (..., n), h_post (..., n), h_res (..., n, n)), float32 (float64 for float64 x)
    mhc::pre(x, h_pre, kernels) -> h_in (..., C), dtype of x
    mhc::post_res(x, h_out, h_post, h_res, kernels) -> x' (..., n, C), dtype of x

and one ``*_backward`` op each. ``post_res_norm(x, h_out, h_post, h_res, norm, kernels)`` is no op of its
own: ``norm(post_res(...))`` for a post-LN site's end, in one CPU kernel when it may (its docstring). Every op has a fake (meta) implementation, so it traces under
``torch.compile`` / ``torch.export`` with dynamic shapes, and an autograd formula that saves
only the op's *inputs*: the backward recomputes the normalised x, the logits and the Sinkhorn
iterations instead of storing them (DESIGN.md, recomputation).

Dispatch (the ``kernels`` argument, one of ``config.KERNELS``, from ``MHCConfig.kernels``).
This module is the one place that picks the reference or the Triton kernels; the kernel
launchers only launch:
    "reference" -> plain torch (``mhc_compile.reference``) on any device;
    "auto"      -> Triton kernels for CUDA tensors, the fused C++ kernels of ``kernels_cpu`` for
                   CPU tensors (the reference where they cannot be built), reference elsewhere;
    "triton"    -> Triton kernels everywhere; on CPU that is the Triton interpreter, which
                   needs ``TRITON_INTERPRET=1`` set before triton is imported.
The coeffs and boundary kernels compute in float32: float64 inputs (gradcheck), and a boundary
whose h_out dtype differs from x's, run the reference under every setting. The pre and
post_res kernels run float64 too (accumulating in float64).

Static coefficients (``dynamic=False``) depend on biases only; :func:`coeffs` computes them in
plain torch (a handful of n x n operations per site, no op needed).

The kernel modules implement, on 3-d tensors (T, n, C) and 2-d/3-d coefficients:
    kernels.coeffs.coeffs_forward / coeffs_backward
    kernels.pre.pre_forward / pre_backward
    kernels.post_res.post_res_forward / post_res_backward

The package: ``table.py`` (the one table of the ops: outputs, saved inputs, reference / Triton /
CPU functions), ``custom.py`` (the ops registered from it, autograd), ``dispatch.py`` (which
implementation runs, the calls into the kernels), ``recording.py`` (:class:`record_coeffs`); this
module holds the public wrappers the passes emit.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import reference
from ..parallel.mixed import align as _align  # plain tensors and DTensors (parallel/mixed.py)
from . import custom as _custom  # noqa: F401  (registers the mhc:: ops)
from .dispatch import use_triton  # noqa: F401  (public)
from .recording import _RECORDERS, _record, record_coeffs  # noqa: F401  (public: record_coeffs)
from . import cpu_paths as _cpu_paths


# ============================================================================ public wrappers
def coeffs(
    x: Tensor, phi: Optional[Tensor], alpha: Optional[Tensor], b_pre: Tensor, b_post: Tensor, b_res: Tensor,
    iters: int = 20, eps: float = 1e-6, variant: str = "mhc", dynamic: bool = True, kernels: str = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    """H_pre, H_post, H_res for streams ``x``; dynamic ones through ``mhc::coeffs``."""
    if dynamic and (cpu := _cpu_paths.eager_cpu(kernels, x, phi, alpha, b_pre, b_post, b_res)):  # plain: no align
        return _cpu_paths.coeffs_eager(cpu, x, phi, alpha, b_pre, b_post, b_res, iters, eps, variant)
    (x,), (phi, alpha, b_pre, b_post, b_res) = _align((x,), (phi, alpha, b_pre, b_post, b_res))
    if not dynamic:
        outs = reference.coeffs(x, None, None, b_pre, b_post, b_res, iters=iters, eps=eps, variant=variant, dynamic=False)
        if _RECORDERS and not torch.compiler.is_compiling():
            _record(outs)
        return outs
    if (cpu := _cpu_paths.eager_cpu(kernels, x, phi, alpha, b_pre, b_post, b_res)):
        return _cpu_paths.coeffs_eager(cpu, x, phi, alpha, b_pre, b_post, b_res, iters, eps, variant)
    if (cpu := _cpu_paths.compiled_nograd(kernels, x, phi, alpha, b_pre, b_post, b_res)):
        return cpu.coeffs_forward(x, phi, alpha, b_pre, b_post, b_res, iters, eps, variant)
    if _cpu_paths.compiled_train(kernels, x, phi, alpha, b_pre, b_post, b_res):
        return _cpu_paths.coeffs_compiled(x, phi, alpha, b_pre, b_post, b_res, iters, eps, variant)
    return torch.ops.mhc.coeffs(x, phi, alpha, b_pre, b_post, b_res, iters, eps, variant, kernels)


def pre(x: Tensor, h_pre: Tensor, kernels: str = "auto") -> Tensor:
    """h_in = sum_i H_pre[i] X[i]."""
    if (cpu := _cpu_paths.eager_cpu(kernels, x, h_pre)):  # eager only, plain tensors: no align, no inlining
        return _cpu_paths.pre_eager(cpu, x, h_pre)
    (x, h_pre), _ = _align((x, h_pre), ())
    if (cpu := _cpu_paths.compiled_nograd(kernels, x, h_pre)):
        return cpu.pre_forward(x, h_pre)
    if _cpu_paths.compiling_on_cpu(kernels, x, h_pre):
        return _cpu_paths.pre_inline(x, h_pre)
    return torch.ops.mhc.pre(x, h_pre, kernels)


def post_res(x: Tensor, h_out: Tensor, h_post: Tensor, h_res: Tensor, kernels: str = "auto") -> Tensor:
    """X' = H_res X + H_post h_out."""
    if h_out.dtype == x.dtype and (cpu := _cpu_paths.eager_cpu(kernels, x, h_out, h_post, h_res)):
        return _cpu_paths.post_res_eager(cpu, x, h_out, h_post, h_res)
    (x, h_out, h_post, h_res), _ = _align((x, h_out, h_post, h_res), ())
    if h_out.dtype == x.dtype and (cpu := _cpu_paths.compiled_nograd(kernels, x, h_out, h_post, h_res)):
        return cpu.post_res_forward(x, h_out, h_post, h_res)
    if _cpu_paths.compiling_on_cpu(kernels, x, h_out, h_post, h_res):
        return _cpu_paths.post_res_inline(x, h_out, h_post, h_res)
    return torch.ops.mhc.post_res(x, h_out, h_post, h_res, kernels)


def post_res_norm(x: Tensor, h_out: Tensor, h_post: Tensor, h_res: Tensor, norm: torch.nn.Module,
                  kernels: str = "auto") -> Tensor:
    """``norm(post_res(x, h_out, h_post, h_res))``: the end of a post-LN site (BERT's ``LN(x + f(x))`` on
    streams; ``passes.post_norm`` emits it in the blocks form). A CPU call that needs no gradient, eager or
    compiled (``cpu_paths.compiled_nograd``), with ``norm`` a plain ``nn.LayerNorm`` over C
    (``cpu_paths.fusable_layer_norm``), runs both in one pass per token (``post_res_norm_fwd``); any other
    call makes the two calls as written."""
    if h_out.dtype == x.dtype and (cpu := _cpu_paths.eager_cpu(kernels, x, h_out, h_post, h_res)
                                   or _cpu_paths.compiled_nograd(kernels, x, h_out, h_post, h_res)) and \
            _cpu_paths.fusable_layer_norm(norm, x, h_out, h_post, h_res):
        return cpu.post_res_norm_forward(x, h_out, h_post, h_res, norm.weight, norm.bias, norm.eps)
    return norm(post_res(x, h_out, h_post, h_res, kernels))


def boundary(
    x: Tensor, h_out: Tensor, h_post: Tensor, h_res: Tensor,
    phi: Optional[Tensor], alpha: Optional[Tensor], b_pre: Tensor, b_post: Tensor, b_res: Tensor,
    iters: int = 20, eps: float = 1e-6, variant: str = "mhc", dynamic: bool = True, kernels: str = "auto",
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The boundary between adjacent sites l and l+1: post_res of l, then coeffs and pre of l+1.

    Takes site l's streams ``x``, branch output ``h_out`` and coefficients, plus site l+1's
    parameters. Returns ``(x_next, h_pre, h_post, h_res, h_in)``: the streams after site l,
    site l+1's coefficients, and site l+1's branch input. The fused Triton version reads
    ``x`` and ``h_out`` once.
    """
    if dynamic and h_out.dtype == x.dtype and (
            cpu := _cpu_paths.eager_cpu(kernels, x, h_out, h_post, h_res, phi, alpha, b_pre, b_post, b_res)):
        return _cpu_paths.boundary_eager(cpu, x, h_out, h_post, h_res, phi, alpha, b_pre, b_post, b_res, iters, eps, variant)
    (x, h_out, h_post, h_res), (phi, alpha, b_pre, b_post, b_res) = _align(
        (x, h_out, h_post, h_res), (phi, alpha, b_pre, b_post, b_res))
    if dynamic and h_out.dtype == x.dtype and (
            cpu := _cpu_paths.compiled_nograd(kernels, x, h_out, h_post, h_res, phi, alpha, b_pre, b_post, b_res)):
        return cpu.boundary_forward(x, h_out, h_post, h_res, phi, alpha, b_pre, b_post, b_res, iters, eps, variant)
    if dynamic and not _cpu_paths.compiling_on_cpu(kernels, x, h_out, h_post, h_res):
        if phi is None or alpha is None:
            raise ValueError("dynamic coefficients need phi and alpha")
        return torch.ops.mhc.boundary(x, h_out, h_post, h_res, phi, alpha, b_pre, b_post, b_res, iters, eps, variant, kernels)
    # static site l+1 (its coefficients do not depend on x), or compiled on CPU (cpu_paths): the
    # three ops compose directly
    x_next = post_res(x, h_out, h_post, h_res, kernels)
    hp, ho, hr = coeffs(x_next, phi, alpha, b_pre, b_post, b_res, iters, eps, variant, dynamic, kernels)
    return x_next, hp, ho, hr, pre(x_next, hp, kernels)


def expand(x: Tensor, n: int, kernels: str = "auto") -> Tensor:
    """Start of a stream (``reference.expand``): n copies of x, (..., n, C). An eager CPU call that needs no
    gradient takes the copy from the CPU kernels' output cache (``kernels_cpu/ends.cpp``: no fresh pages)."""
    if not _cpu_paths.needs_grad(x) and (cpu := _cpu_paths.eager_cpu(kernels, x)):
        return cpu.expand_forward(x, n)
    return reference.expand(x, n)


def collapse(x: Tensor, mode: str = "mean", weight: Optional[Tensor] = None, kernels: str = "auto") -> Tensor:
    """End of a stream (``reference.collapse``), with a learned weight aligned to the stream's kind. An eager
    CPU "mean" or "sum" that needs no gradient runs ``kernels_cpu/ends.cpp`` (its output from the cache)."""
    if weight is None and mode in ("mean", "sum") and not _cpu_paths.needs_grad(x) and (
            cpu := _cpu_paths.eager_cpu(kernels, x)):
        return cpu.collapse_forward(x, mode == "mean")
    (x,), (weight,) = _align((x,), (weight,))
    return reference.collapse(x, mode, weight)


if torch.distributed.is_available():  # DTensor sharding rules of the ops above
    from ..parallel import sharding as _sharding

    _sharding.register()
