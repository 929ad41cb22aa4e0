"""CPU-only shortcuts of the public ``mhc_compile.ops`` wrappers (issue #25), kept apart from the ops.

* Under ``torch.compile`` on CPU (``kernels="auto"``, plain tensors), a call that needs no gradient
  runs the fused kernels as opaque ``mhc_cpu::`` calls (:func:`compiled_nograd`; fakes in
  ``kernels_cpu/fakes.py``). One that needs a gradient runs coeffs as :class:`_CompiledCoeffs` (the
  kernels forward and backward, traced into the joint graph) and has ``pre`` and ``post_res``
  emitted as their aten math (:func:`pre_inline`, :func:`post_res_inline`) instead of the opaque
  ``mhc::`` ops, so inductor fuses the stream mixing with its neighbours (the post-LN LayerNorm, the
  residual adds) and differentiates it itself. ``COMPILED_KERNELS`` off: ``coeffs`` (the Sinkhorn
  loop) is ``mhc::coeffs`` in both cases, and the mixes are inlined. CUDA keeps the Triton kernels.
  See docs/design.md "CPU kernels".
* In eager mode on CPU (``kernels="auto"``, plain tensors, the extension built, no dispatch mode,
  functorch transform or coefficient recorder active, not compiling) every op calls the fused kernels
  of ``kernels_cpu.launch`` directly (:func:`eager_cpu`): without autograd when no input needs a
  gradient, else through one ``torch.autograd.Function`` per op with the custom op's autograd formula
  (the same launchers in the backward; inputs saved, plus the small (T, 2n+n^2) projection
  vec(X).phi of coeffs and boundary, so the backward skips one of its three skinny GEMMs). It skips the torch.library dispatch and the
  custom op's Python autograd layer (about 25-65 us per call); the numbers are the custom op's, bit
  for bit (``tests/test_cpu_paths.py``). Anything else takes the ``mhc::`` ops.
"""
from __future__ import annotations

import os
import threading
import weakref

import torch
from torch import Tensor

from .. import _torch_internals as _ti
from .. import reference
from ..kernels_cpu import available, loaded, launch as _launch
from ..parallel.mixed import any_dtensor
from .recording import _RECORDERS

_INLINE = os.environ.get("MHC_CPU_INLINE", "1") != "0"
_FAST = os.environ.get("MHC_CPU_FAST", "1") != "0"
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def compiling_on_cpu(kernels: str, *tensors: Tensor) -> bool:
    """Whether Dynamo is tracing a wrapper (a converted model under ``torch.compile``) for plain CPU
    tensors under ``kernels="auto"``. Not while AOTAutograd traces the graph the ``"mhc"`` backend
    rewrote (``is_dynamo_compiling`` is False there): that graph keeps the ``mhc::`` ops, which the
    recompute pass finds in the joint graph."""
    return (_INLINE and kernels == "auto" and torch.compiler.is_dynamo_compiling() and tensors[0].device.type == "cpu"
            and not any_dtensor(tensors))


COMPILED_KERNELS = os.environ.get("MHC_CPU_COMPILED_KERNELS", "1") != "0"
"""Whether a compiled CPU call runs the fused kernels: as opaque calls without gradient
(:func:`compiled_nograd`), as :class:`_CompiledCoeffs` with one (:func:`compiled_train`); False: the
inlined mixes and ``mhc::coeffs`` in both cases."""


def _compiled_launch(kernels: str, x: Tensor, *others: Tensor):
    """``kernels_cpu.launch`` when Dynamo traces a wrapper for plain CPU tensors under ``kernels="auto"``
    (:func:`compiling_on_cpu`), with ``COMPILED_KERNELS`` on, no coefficient recorder (which needs
    ``mhc::coeffs`` to run at run time), not under ``torch.export`` (``_torch_internals.exporting``:
    programs keep the ``mhc::`` ops, which register when ``mhc_compile`` is imported, where the
    ``mhc_cpu::`` kernels exist only once the extension is built), and the kernels loaded; else None."""
    if not (COMPILED_KERNELS and compiling_on_cpu(kernels, x, *others)) or _RECORDERS or _ti.exporting():
        return None
    if x.dtype not in _launch.DTYPES or any(t.device.type != "cpu" for t in others):
        return None
    return _launch if loaded() else None


def compiled_nograd(kernels: str, x: Tensor, *others: Tensor):
    """:func:`_compiled_launch` for a call that needs no gradient (an eval forward under ``torch.compile``;
    Dynamo guards on grad mode and on each input's ``requires_grad``): the graph then calls the fused
    kernels (``mhc_cpu::``, with the fakes of ``kernels_cpu/fakes.py``) directly, as the eager fast path
    does, without the custom op's Python layer. Else None."""
    launch = _compiled_launch(kernels, x, *others)
    return None if launch is None or needs_grad(x, *others) else launch


def compiled_train(kernels: str, x: Tensor, *others: Tensor):
    """:func:`_compiled_launch` for ``coeffs`` in a compiled call (taken after :func:`compiled_nograd`, so
    one that needs a gradient: a compiled train step): :func:`coeffs_compiled` then puts the fused kernels
    and their backward in the graph, keeping the forward's projection for the backward as the eager path
    does. Else None (``mhc::coeffs``)."""
    return _compiled_launch(kernels, x, *others)


class _CompiledCoeffs(torch.autograd.Function):
    """``mhc::coeffs`` for Dynamo (which traces both methods into the joint graph): the launchers' C++
    kernels, the projection vec(X).phi saved for the backward instead of recomputed (the eager
    ``_Coeffs`` does the same), no custom-op Python layer at run time."""

    @staticmethod
    def forward(ctx, x, phi, alpha, b_pre, b_post, b_res, iters, eps, variant):
        keep = []
        outs = _launch.coeffs_forward(x, phi, alpha, b_pre, b_post, b_res, iters, eps, variant, keep)
        ctx.save_for_backward(x, phi, alpha, b_pre, b_post, b_res, keep[0])
        ctx.args = (iters, eps, variant)
        return outs

    @staticmethod
    def backward(ctx, g_pre, g_post, g_res):
        x, phi, alpha, b_pre, b_post, b_res, proj = ctx.saved_tensors
        iters, eps, variant = ctx.args
        grads = _launch.coeffs_backward(g_pre, g_post, g_res, x, phi, alpha, b_pre, b_post, b_res, iters, eps, variant,
                                        proj=proj)
        return (*grads, None, None, None)


def coeffs_compiled(x, phi, alpha, b_pre, b_post, b_res, iters, eps, variant):
    """coeffs in a compiled call that needs a gradient (:func:`compiled_train`)."""
    return _CompiledCoeffs.apply(x, phi, alpha, b_pre, b_post, b_res, iters, eps, variant)


def pre_inline(x: Tensor, h_pre: Tensor) -> Tensor:
    """``mhc::pre`` as aten ops (:func:`mhc_compile.reference.pre_mix`)."""
    return reference.pre_mix(x, h_pre)


def post_res_inline(x: Tensor, h_out: Tensor, h_post: Tensor, h_res: Tensor) -> Tensor:
    """``mhc::post_res`` as one pointwise-and-reduce expression (no bmm: inductor fuses it), the math of
    :func:`mhc_compile.reference.post_res_mix`."""
    cd = reference.compute_dtype(x.dtype)
    mixed = (h_res.to(cd).unsqueeze(-1) * x.to(cd).unsqueeze(-3)).sum(-2)
    return (mixed + h_post.to(cd).unsqueeze(-1) * h_out.to(cd).unsqueeze(-2)).to(x.dtype)


# ============================================================================ eager fast path
def eager_cpu(kernels: str, x: Tensor, *others: Tensor):
    """``kernels_cpu.launch`` when an eager call may skip the ``mhc::`` custom op (module docstring), else None.

    Plain tensors only (so the caller may run it before ``parallel.mixed.align``, a no-op for them), the
    conditions of ``dispatch._cpu`` (x in a float dtype, everything on CPU, the extension built)
    checked inline: this runs three times per site and call, every check on every call."""
    if not _FAST or kernels != "auto" or _RECORDERS or torch.compiler.is_compiling():
        return None
    if type(x) not in _PLAIN or not x.is_cpu or x.dtype not in _launch.DTYPES:
        return None
    for t in others:
        if type(t) not in _PLAIN or not t.is_cpu:
            return None
    return _launch if _ti.plain_dispatch() and available() else None


def needs_grad(*tensors: Tensor) -> bool:
    """Whether autograd records a call on these tensors (grad mode on and one of them requires grad)."""
    if not torch.is_grad_enabled():
        return False
    for t in tensors:
        if t.requires_grad:
            return True
    return False


def _zeros_for(x: Tensor, g, tail: tuple) -> Tensor:
    """``g``, or zeros for an output that got no gradient (per token, in the compute dtype)."""
    return x.new_zeros((*x.shape[:-2], *tail), dtype=_launch.compute_dtype(x.dtype)) if g is None else g


def _grads_or_zeros(x: Tensor, g_pre, g_post, g_res) -> tuple:
    """The H_pre, H_post, H_res gradients a backward got, zeros for those it did not."""
    if g_pre is None or g_post is None or g_res is None:
        n = x.shape[-2]
        g_pre, g_post, g_res = _zeros_for(x, g_pre, (n,)), _zeros_for(x, g_post, (n,)), _zeros_for(x, g_res, (n, n))
    return g_pre, g_post, g_res


def _autocast_on_cpu() -> bool:
    return torch.is_autocast_enabled("cpu")


def fusable_layer_norm(norm: torch.nn.Module, x: Tensor, *others: Tensor) -> bool:
    """Whether ``norm(post_res(x, ...))`` may run as one kernel (``ops.post_res_norm``): no gradient
    needed and no CPU autocast (which runs LayerNorm in float32), ``norm`` exactly an ``nn.LayerNorm``
    over x's last dim whose call runs just its forward (no hooks, ``_torch_internals``), its weight and
    bias (or None) plain CPU tensors in x's dtype; and the one-pass kernels on (``launch.FUSED``).
    Anything else calls the module."""
    if not _launch.FUSED or type(norm) is not torch.nn.LayerNorm or tuple(norm.normalized_shape) != (x.shape[-1],):
        return False
    params = [p for p in (norm.weight, norm.bias) if p is not None]
    for p in params:
        if type(p) not in _PLAIN or not p.is_cpu or p.dtype != x.dtype:
            return False
    if needs_grad(x, *others, *params) or _autocast_on_cpu():
        return False
    return _ti.module_call_is_plain(norm)


# ---------------------------------------------------------------------------- a site's start in one pass
# A site's coeffs and its pre read the same streams X. The eager coeffs computes h_in with the gates in
# the same pass (launch.site_start_forward) and leaves it here, per thread; the pre that follows takes
# it when it is called on that X, unmodified (identity and version counter), with bit-equal H_pre,
# which makes it the h_in pre would compute (same kernel bits); anything else computes pre anew.
_START = threading.local()


def _coeffs_and_start(launch, x, phi, alpha, b_pre, b_post, b_res, iters, eps, variant, keep=None):
    start = launch.site_start_forward(x, phi, alpha, b_pre, b_post, b_res, iters, eps, variant, keep)
    if start is None:
        _START.slot = None
        return launch.coeffs_forward(x, phi, alpha, b_pre, b_post, b_res, iters, eps, variant, keep)
    *outs, h_in = start
    # inference tensors (torch.inference_mode) track no version: their pre computes h_in anew
    _START.slot = None if x.is_inference() else (weakref.ref(x), x._version, outs[0], outs[0]._version, h_in)
    return tuple(outs)


def _started_h_in(x: Tensor, h_pre: Tensor) -> Tensor | None:
    """The h_in the last coeffs call on this thread computed, when this pre is that site's (above)."""
    slot = getattr(_START, "slot", None)
    if slot is None:
        return None
    _START.slot = None
    ref, version, hp, hp_version, h_in = slot
    # X and the slot's H_pre unmodified since coeffs (the slot holds that very tensor: an in-place change
    # of it would make it equal to itself with new values), then H_pre that tensor (what the generated
    # code passes on: no aten call) or equal to it
    if ref() is not x or x.is_inference() or x._version != version or hp._version != hp_version:
        return None
    if h_pre is hp or (h_pre.shape == hp.shape and h_pre.dtype == hp.dtype and torch.equal(h_pre, hp)):
        return h_in
    return None


def _pre_forward(launch, x: Tensor, h_pre: Tensor) -> Tensor:
    """pre's h_in: the one its site's coeffs handed over (above), else the kernel's."""
    h_in = _started_h_in(x, h_pre)
    return launch.pre_forward(x, h_pre) if h_in is None else h_in


def _kept(kept) -> tuple:
    """(projection, RMS or None) from what a forward launcher's ``keep`` received: the projection, then each
    token's RMS where the one-pass kernels ran (``site_start_forward``, ``boundary_forward``)."""
    return kept[0], (kept[1] if len(kept) > 1 else None)


class _Coeffs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, launch, x, phi, alpha, b_pre, b_post, b_res, iters, eps, variant):
        keep = []
        outs = _coeffs_and_start(launch, x, phi, alpha, b_pre, b_post, b_res, iters, eps, variant, keep)
        ctx.save_for_backward(x, phi, alpha, b_pre, b_post, b_res, *keep)
        ctx.args, ctx.launch = (iters, eps, variant), launch
        ctx.set_materialize_grads(False)
        return outs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_pre, g_post, g_res):
        x, *params = ctx.saved_tensors[:6]
        proj, rms = _kept(ctx.saved_tensors[6:])
        g_pre, g_post, g_res = _grads_or_zeros(x, g_pre, g_post, g_res)
        grads = ctx.launch.coeffs_backward(g_pre, g_post, g_res, x, *params, *ctx.args, proj=proj, rms=rms)
        return (None, *grads, None, None, None)


class _Pre(torch.autograd.Function):
    @staticmethod
    def forward(ctx, launch, x, h_pre):
        ctx.save_for_backward(x, h_pre)
        ctx.launch = launch
        return _pre_forward(launch, x, h_pre)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        return (None, *ctx.launch.pre_backward(grad, *ctx.saved_tensors))


class _PostRes(torch.autograd.Function):
    @staticmethod
    def forward(ctx, launch, x, h_out, h_post, h_res):
        ctx.save_for_backward(x, h_out, h_post, h_res)
        ctx.launch = launch
        return launch.post_res_forward(x, h_out, h_post, h_res)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        return (None, *ctx.launch.post_res_backward(grad, *ctx.saved_tensors))


class _Boundary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, launch, x, h_out, h_post, h_res, phi, alpha, b_pre, b_post, b_res, iters, eps, variant):
        keep = []
        outs = launch.boundary_forward(x, h_out, h_post, h_res, phi, alpha, b_pre, b_post, b_res, iters, eps, variant, keep)
        # x_next and H_pre of site l+1 saved too (outputs: x_next stays alive as the next op's input),
        # so the backward does not recompute them (autograd's version check guards in-place changes)
        ctx.save_for_backward(x, h_out, h_post, h_res, phi, alpha, b_pre, b_post, b_res, outs[0], outs[1], *keep)
        ctx.args, ctx.launch = (iters, eps, variant), launch
        ctx.set_materialize_grads(False)
        return outs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_x_next, g_pre, g_post, g_res, g_h_in):
        saved, (x_next, h_pre_next) = ctx.saved_tensors[:9], ctx.saved_tensors[9:11]
        proj, rms = _kept(ctx.saved_tensors[11:])
        x, h_out = saved[0], saved[1]
        g_x_next = torch.zeros_like(x) if g_x_next is None else g_x_next
        g_pre, g_post, g_res = _grads_or_zeros(x, g_pre, g_post, g_res)
        g_h_in = torch.zeros_like(h_out) if g_h_in is None else g_h_in
        grads = ctx.launch.boundary_backward(g_x_next, g_pre, g_post, g_res, g_h_in, *saved, *ctx.args, proj=proj,
                                             x_next=x_next, h_pre_next=h_pre_next, rms=rms)
        return (None, *grads, None, None, None)


def coeffs_eager(launch, x, phi, alpha, b_pre, b_post, b_res, iters, eps, variant):
    if needs_grad(x, phi, alpha, b_pre, b_post, b_res):
        return _Coeffs.apply(launch, x, phi, alpha, b_pre, b_post, b_res, iters, eps, variant)
    return _coeffs_and_start(launch, x, phi, alpha, b_pre, b_post, b_res, iters, eps, variant)


def pre_eager(launch, x, h_pre):
    return _Pre.apply(launch, x, h_pre) if needs_grad(x, h_pre) else _pre_forward(launch, x, h_pre)


def post_res_eager(launch, x, h_out, h_post, h_res):
    if needs_grad(x, h_out, h_post, h_res):
        return _PostRes.apply(launch, x, h_out, h_post, h_res)
    return launch.post_res_forward(x, h_out, h_post, h_res)


def boundary_eager(launch, *args):
    if needs_grad(*args[:9]):
        return _Boundary.apply(launch, *args)
    return launch.boundary_forward(*args)
