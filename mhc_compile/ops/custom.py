"""The ``mhc::`` custom ops (torch.library), one per entry of ``ops/table.py``: each op's
implementation (picked by ``ops/dispatch.py``) and autograd formula, which saves only the op's
inputs (the table's ``saved``; and ``saved_outputs``: the boundary's X', the next site's X) and
recomputes the rest in the backward (see the package docstring).
:func:`register` makes the four registrations of an op (custom op and fake, backward op and fake,
autograd); the fakes come from the table.
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch
from torch import Tensor

from .. import reference
from ..parallel.mixed import token_zeros  # plain tensors and DTensors (parallel/mixed.py)
from ..site_grad import SiteGrad, eager_needs_grad, site_of
from .dispatch import (_boundary_bwd_triton, _coeffs_bwd_joined, _cpu, _flat3, _flat_coeff, _fused_triton,
                       _post_res_bwd_triton, use_triton)
from .recording import _record
from .table import OPS, MHCOp, fake_outputs

_COEFFS, _PRE, _POST_RES, _BOUNDARY = OPS["coeffs"], OPS["pre"], OPS["post_res"], OPS["boundary"]


def register(op: MHCOp, forward, backward, setup_context, autograd_backward) -> tuple:
    """Register table entry ``op``: ``mhc::<name>`` running ``forward``, ``mhc::<name>_backward``
    running ``backward`` (which takes one gradient per output, then the saved inputs by the same
    names as ``forward``, then the non-tensor arguments, then the saved outputs as optional
    arguments named by the table's ``saved_outputs``), both with a fake from the table, and the
    autograd formula: ``setup_context`` after the table's ``saved`` inputs and then its
    ``saved_outputs`` are saved (``ctx.saved_tensors`` in that order), ``autograd_backward``.
    Returns the two custom ops."""
    fwd_params = list(inspect.signature(forward).parameters)
    bwd_sig = inspect.signature(backward)
    missing = [n for n in op.saved if n not in fwd_params or n not in bwd_sig.parameters]
    missing += [a for _, a in op.saved_outputs
                if a not in bwd_sig.parameters or bwd_sig.parameters[a].default is not None]
    if missing or fwd_params[0] != "x":
        raise TypeError(f"{op.qualname}: the forward takes x first and both functions name the saved inputs "
                        f"{op.saved}, the backward the saved outputs {op.saved_outputs} as optional "
                        f"arguments (missing {missing})")
    saved_at = [fwd_params.index(n) for n in op.saved]
    out_at = [op.outputs.index(o) for o, _ in op.saved_outputs]

    def fake(*args, **kwargs):
        return fake_outputs(op, args[0] if args else kwargs["x"])

    def backward_fake(*args, **kwargs):
        bound = bwd_sig.bind(*args, **kwargs).arguments
        return tuple(torch.empty_like(bound[n], memory_format=torch.contiguous_format) for n in op.saved)

    def setup(ctx, inputs, output):
        outs = output if isinstance(output, tuple) else (output,)
        ctx.save_for_backward(*(inputs[i] for i in saved_at), *(outs[j] for j in out_at))
        setup_context(ctx, inputs, output)

    fwd = torch.library.custom_op(op.qualname, forward, mutates_args=())
    fwd.register_fake(fake)
    bwd = torch.library.custom_op(op.qualname + "_backward", backward, mutates_args=())
    bwd.register_fake(backward_fake)
    fwd.register_autograd(autograd_backward, setup_context=setup)
    return fwd, bwd


# ============================================================================ coeffs
def _coeffs(
    x: Tensor, phi: Tensor, alpha: Tensor, b_pre: Tensor, b_post: Tensor, b_res: Tensor,
    iters: int, eps: float, variant: str, kernels: str,
) -> tuple[Tensor, Tensor, Tensor]:
    if _fused_triton(kernels, x, phi, alpha, b_pre, b_post, b_res):
        lead, n = x.shape[:-2], x.shape[-2]
        hp, ho, hr = _COEFFS.function("triton")(_flat3(x), phi, alpha, b_pre, b_post, b_res, iters, eps, variant)
        return _record((hp.reshape(*lead, n), ho.reshape(*lead, n), hr.reshape(*lead, n, n)))
    if _cpu(kernels, x, phi, alpha, b_pre, b_post, b_res):
        return _record(_COEFFS.function("cpu")(x, phi, alpha, b_pre, b_post, b_res, iters, eps, variant))
    outs = _COEFFS.function("reference")(
        x, phi, alpha, b_pre, b_post, b_res, iters=iters, eps=eps, variant=variant, dynamic=True
    )
    return _record(tuple(o.contiguous() for o in outs))


def _coeffs_backward(
    g_pre: Tensor, g_post: Tensor, g_res: Tensor,
    x: Tensor, phi: Tensor, alpha: Tensor, b_pre: Tensor, b_post: Tensor, b_res: Tensor,
    iters: int, eps: float, variant: str, kernels: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    if _fused_triton(kernels, x, phi, alpha, b_pre, b_post, b_res):
        gx, *rest = _COEFFS.function("triton", backward=True)(
            _flat_coeff(g_pre, 1), _flat_coeff(g_post, 1), _flat_coeff(g_res, 2),
            _flat3(x), phi, alpha, b_pre, b_post, b_res, iters, eps, variant,
        )
        return (gx.reshape(x.shape), *rest)
    if _cpu(kernels, x, phi, alpha, b_pre, b_post, b_res):
        return _COEFFS.function("cpu", backward=True)(g_pre, g_post, g_res, x, phi, alpha, b_pre, b_post, b_res, iters, eps, variant)
    grads = _COEFFS.function("reference", backward=True)(
        g_pre, g_post, g_res, x, phi, alpha, b_pre, b_post, b_res, iters=iters, eps=eps, variant=variant
    )
    return tuple(g.contiguous() for g in grads)


def _coeffs_setup(ctx, inputs, output):
    x, phi, alpha, b_pre, b_post, b_res, iters, eps, variant, kernels = inputs
    ctx.args = (iters, eps, variant, kernels)
    ctx.set_materialize_grads(False)  # autograd's zeros for an unused output of a DTensor op are plain
    ctx.site = None
    if _fused_triton(kernels, x, phi, alpha, b_pre, b_post, b_res) and eager_needs_grad(x) \
            and all(type(o) is torch.Tensor for o in output):
        ctx.site = SiteGrad(x, output)
        for o in output:
            o._mhc_site_grad = ctx.site


def _coeffs_bwd(ctx, g_pre, g_post, g_res):
    saved = ctx.saved_tensors  # once: checkpointing refuses a second unpack
    x = saved[0]
    n, cd = x.shape[-2], reference.compute_dtype(x.dtype)
    g_post = token_zeros(x, (n,), cd) if g_post is None else g_post
    g_res = token_zeros(x, (n, n), cd) if g_res is None else g_res
    box = ctx.site
    if box is not None and box.pending():
        grads = _coeffs_bwd_joined(ctx, g_pre, g_post, g_res, box, saved)  # g_pre None: 0
    else:
        g_pre = token_zeros(x, (n,), cd) if g_pre is None else g_pre
        grads = torch.ops.mhc.coeffs_backward(g_pre, g_post, g_res, *saved, *ctx.args)
    return (*grads, None, None, None, None)


register(_COEFFS, _coeffs, _coeffs_backward, _coeffs_setup, _coeffs_bwd)


# ============================================================================ pre
def _pre(x: Tensor, h_pre: Tensor, kernels: str) -> Tensor:
    if use_triton(x, kernels):
        return _PRE.function("triton")(_flat3(x), _flat_coeff(h_pre, 1)).reshape(*x.shape[:-2], x.shape[-1])
    if _cpu(kernels, x, h_pre):
        return _PRE.function("cpu")(x, h_pre)
    return _PRE.function("reference")(x, h_pre).contiguous()


def _pre_backward(grad: Tensor, x: Tensor, h_pre: Tensor, kernels: str) -> tuple[Tensor, Tensor]:
    if use_triton(x, kernels):
        gx, gh = _PRE.function("triton", backward=True)(
            grad.reshape(-1, x.shape[-1]).contiguous(), _flat3(x), _flat_coeff(h_pre, 1))
        return gx.reshape(x.shape), gh.reshape(h_pre.shape)
    if _cpu(kernels, x, h_pre, grad):
        return _PRE.function("cpu", backward=True)(grad, x, h_pre)
    gx, gh = _PRE.function("reference", backward=True)(grad, x, h_pre)
    return gx.contiguous(), gh.contiguous()


def _pre_setup(ctx, inputs, output):
    x, h_pre, kernels = inputs
    ctx.kernels = kernels
    ctx.site = site_of(x, h_pre=h_pre)


def _pre_bwd(ctx, grad):
    x, h_pre = ctx.saved_tensors
    if ctx.site is not None and ctx.site.open():
        # a mailbox means Triton: dX = H_pre * grad is added by the site's coeffs backward, and
        # so is H_pre's gradient (from the dh kernel's pass over X) when that backward runs in
        # this pass; else (a gradient of H_pre itself asked for) it is computed here
        # (the table's backward_kernels for pre)
        if ctx.site.coeffs_will_run():
            ctx.site.add(g_hin=grad, h_pre=h_pre, owe_dh=True)
            return None, None, None
        _, gh = _PRE.function("triton", backward=True)(grad.reshape(-1, x.shape[-1]).contiguous(), _flat3(x), _flat_coeff(h_pre, 1), write_gx=False)
        ctx.site.add(g_hin=grad, h_pre=h_pre)
        return None, gh.reshape(h_pre.shape), None
    gx, gh = torch.ops.mhc.pre_backward(grad, x, h_pre, ctx.kernels)
    return gx, gh, None


register(_PRE, _pre, _pre_backward, _pre_setup, _pre_bwd)


# ============================================================================ post_res
def _post_res(x: Tensor, h_out: Tensor, h_post: Tensor, h_res: Tensor, kernels: str) -> Tensor:
    if use_triton(x, kernels):
        out = _POST_RES.function("triton")(
            _flat3(x), h_out.reshape(-1, x.shape[-1]).contiguous(), _flat_coeff(h_post, 1), _flat_coeff(h_res, 2)
        )
        return out.reshape(x.shape)
    if h_out.dtype == x.dtype and _cpu(kernels, x, h_out, h_post, h_res):
        return _POST_RES.function("cpu")(x, h_out, h_post, h_res)
    return _POST_RES.function("reference")(x, h_out, h_post, h_res).contiguous()


def _post_res_backward(
    grad: Tensor, x: Tensor, h_out: Tensor, h_post: Tensor, h_res: Tensor, kernels: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if use_triton(x, kernels):
        return _post_res_bwd_triton(grad, x, h_out, h_post, h_res)
    if h_out.dtype == x.dtype and _cpu(kernels, x, grad, h_out, h_post, h_res):
        return _POST_RES.function("cpu", backward=True)(grad, x, h_out, h_post, h_res)
    grads = _POST_RES.function("reference", backward=True)(grad, x, h_out, h_post, h_res)
    return tuple(g.contiguous() for g in grads)


def _post_res_setup(ctx, inputs, output):
    x, h_out, h_post, h_res, kernels = inputs
    ctx.kernels = kernels
    ctx.site = site_of(x, h_post=h_post, h_res=h_res)


def _post_res_bwd(ctx, grad):
    site = ctx.site
    if site is not None and site.g_mix is None and site.open():
        # everything but dX (a mailbox means Triton): the site's coeffs backward adds H_res^T grad
        _, gho, ghp, ghr = _post_res_bwd_triton(grad, *ctx.saved_tensors, write_gx=False)
        site.add(g_mix=grad, h_mix=ctx.saved_tensors[3])
        return None, gho, ghp, ghr, None
    grads = torch.ops.mhc.post_res_backward(grad, *ctx.saved_tensors, ctx.kernels)
    if site is not None and site.open():
        site.add(g_add=grads[0])  # a second post_res on the site: its dX, summed by coeffs
        return (None, *grads[1:], None)
    return (*grads, None)


register(_POST_RES, _post_res, _post_res_backward, _post_res_setup, _post_res_bwd)


# ============================================================================ boundary
# mhc::boundary fuses post_res of site l with coeffs and pre of site l+1 (dynamic site l+1
# only; static coefficients need no fusion). Reference path = the composition of the
# reference functions; Triton path = kernels.boundary (one read of X and h_out).
def _boundary(
    x: Tensor, h_out: Tensor, h_post: Tensor, h_res: Tensor,
    phi: Tensor, alpha: Tensor, b_pre: Tensor, b_post: Tensor, b_res: Tensor,
    iters: int, eps: float, variant: str, kernels: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    if _fused_triton(kernels, x, h_post, h_res, phi, alpha, b_pre, b_post, b_res) and h_out.dtype == x.dtype:
        lead, n, c = x.shape[:-2], x.shape[-2], x.shape[-1]
        xn, hp, ho, hr, hin = _BOUNDARY.function("triton")(
            _flat3(x), h_out.reshape(-1, c).contiguous(), _flat_coeff(h_post, 1), _flat_coeff(h_res, 2),
            phi, alpha, b_pre, b_post, b_res, iters, eps, variant,
        )
        outs = (xn.reshape(x.shape), hp.reshape(*lead, n), ho.reshape(*lead, n), hr.reshape(*lead, n, n), hin.reshape(*lead, c))
    elif h_out.dtype == x.dtype and _cpu(kernels, x, h_out, h_post, h_res, phi, alpha, b_pre, b_post, b_res):
        outs = _BOUNDARY.function("cpu")(x, h_out, h_post, h_res, phi, alpha, b_pre, b_post, b_res, iters, eps, variant)
    else:
        outs = tuple(
            o.contiguous()
            for o in _BOUNDARY.function("reference")(x, h_out, h_post, h_res, phi, alpha, b_pre, b_post, b_res, iters, eps, variant)
        )
    _record(tuple(outs[i] for i in _BOUNDARY.coefficient_outputs))
    return outs


def _boundary_backward(
    g_x_next: Tensor, g_pre: Tensor, g_post: Tensor, g_res: Tensor, g_h_in: Tensor,
    x: Tensor, h_out: Tensor, h_post: Tensor, h_res: Tensor,
    phi: Tensor, alpha: Tensor, b_pre: Tensor, b_post: Tensor, b_res: Tensor,
    iters: int, eps: float, variant: str, kernels: str, x_next: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    # x_next: the forward's X' (saved), so the Triton backward does not recompute it
    if _fused_triton(kernels, x, h_post, h_res, phi, alpha, b_pre, b_post, b_res) and h_out.dtype == x.dtype:
        return _boundary_bwd_triton(g_x_next, g_pre, g_post, g_res, g_h_in, x, h_out, h_post, h_res,
                                    phi, alpha, b_pre, b_post, b_res, iters, eps, variant, x_next=x_next)
    if h_out.dtype == x.dtype and _cpu(kernels, x, h_out, h_post, h_res, phi, alpha, b_pre, b_post, b_res):
        return _BOUNDARY.function("cpu", backward=True)(
            g_x_next, g_pre, g_post, g_res, g_h_in, x, h_out, h_post, h_res, phi, alpha, b_pre, b_post, b_res, iters, eps, variant
        )
    grads = _BOUNDARY.function("reference", backward=True)(
        g_x_next, g_pre, g_post, g_res, g_h_in, x, h_out, h_post, h_res, phi, alpha, b_pre, b_post, b_res, iters, eps, variant
    )
    return tuple(g.contiguous() for g in grads)


def _boundary_setup(ctx, inputs, output):
    *tensors, iters, eps, variant, kernels = inputs  # saved (register): the inputs and X', see the table
    ctx.args = (iters, eps, variant, kernels)
    ctx.set_materialize_grads(False)  # unused outputs come as None (filled below, laid out like x)
    ctx.site = site_of(tensors[0], h_post=tensors[2], h_res=tensors[3])  # site l's mailbox
    ctx.site_next = None  # site l+1's: its post_res hands over its mix's gradient instead of writing dX'
    if _fused_triton(kernels, *tensors[:1], *tensors[2:]) and tensors[1].dtype == tensors[0].dtype \
            and any(eager_needs_grad(t) for t in tensors) and all(type(o) is torch.Tensor for o in output):
        ctx.site_next = SiteGrad(output[0], output[1:4], takes_dh=False)
        for o in output[1:4]:
            o._mhc_site_grad = ctx.site_next


def _boundary_bwd(ctx, g_x_next, g_pre, g_post, g_res, g_h_in):
    *saved, x_next = ctx.saved_tensors
    x, h_out = saved[0], saved[1]
    cd, n = reference.compute_dtype(x.dtype), x.shape[-2]
    nxt = ctx.site_next
    if nxt is not None and nxt.pending():  # a mailbox means Triton
        g_x_next = _boundary_next_site_grad(g_x_next, nxt)
        mix = (nxt.g_mix, nxt.h_mix) if nxt.g_mix is not None else None
        nxt.take()
    else:
        mix = None
    g_x_next = torch.zeros_like(x) if g_x_next is None and mix is None else g_x_next
    g_pre = token_zeros(x, (n,), cd) if g_pre is None else g_pre
    g_post = token_zeros(x, (n,), cd) if g_post is None else g_post
    g_res = token_zeros(x, (n, n), cd) if g_res is None else g_res
    g_h_in = torch.zeros_like(h_out) if g_h_in is None else g_h_in
    site = ctx.site
    if mix is not None:  # straight to the kernels: the op's schema has no mix, nor an absent g_x_next
        grads = _boundary_bwd_triton(g_x_next, g_pre, g_post, g_res, g_h_in, *saved, *ctx.args[:3], x_next=x_next, mix=mix)
    else:
        grads = torch.ops.mhc.boundary_backward(g_x_next, g_pre, g_post, g_res, g_h_in, *saved, *ctx.args, x_next)
    if site is not None and site.open():
        site.add(g_add=grads[0])  # summed into site l's dX by its coeffs backward
        return (None, *grads[1:], None, None, None, None)
    return (*grads, None, None, None, None)


def _boundary_next_site_grad(g_x_next, box: SiteGrad):
    """The gradient of X' from the consumers of site l+1 that handed theirs to its mailbox but the
    post_res mix (passed to the kernel as ``mix``): a dX' (g_add) and a separate pre-mix's
    H_pre * g_hin (that pre computed its own dH_pre: ``takes_dh`` is False), summed with autograd's."""
    parts = [g for g in (g_x_next, box.g_add) if g is not None]
    if box.g_hin is not None:
        parts.append(box.h_pre.to(box.g_hin.dtype).unsqueeze(-1) * box.g_hin.unsqueeze(-2))
    return None if not parts else sum(parts[1:], parts[0])


register(_BOUNDARY, _boundary, _boundary_backward, _boundary_setup, _boundary_bwd)
