"""Which implementation an ``mhc::`` op runs (Triton kernels, fused CPU kernels or the plain-torch
reference), and the calls into the kernels that reshape between the ops' (..., n, C) tensors and
the kernels' (T, n, C) ones. With ``ops/custom.py`` this is the only code that reaches the kernels.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..config import KERNELS
from ..site_grad import SiteGrad
from .table import OPS

# x dtypes the fused coefficient kernels (coeffs, boundary) run; see _fused_triton
_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def use_triton(t: Tensor, kernels: str) -> bool:
    """Whether an op on tensor ``t`` runs the Triton kernels under the ``kernels`` setting."""
    if kernels not in KERNELS:
        raise ValueError(f"kernels={kernels!r}; expected one of {KERNELS}")
    if kernels == "reference":
        return False
    if kernels == "triton":
        return True
    return t.is_cuda


def _fused_triton(kernels: str, x: Tensor, *tensors: Tensor) -> bool:
    """:func:`use_triton` for the coeffs and boundary kernels, which compute in float32: x in
    float32/float16/bfloat16 and no float64 among ``tensors``, else the reference."""
    return use_triton(x, kernels) and x.dtype in _FUSED_DTYPES and all(t.dtype != torch.float64 for t in tensors)


def _cpu(kernels: str, x: Tensor, *tensors: Tensor):
    """``kernels_cpu.launch`` when an op runs the fused CPU kernels ("auto", every tensor on CPU,
    the extension built), else None."""
    if kernels != "auto" or x.device.type != "cpu":
        return None
    from ..kernels_cpu import available, launch

    return launch if launch.supported(x, *tensors) and available() else None


def _flat3(x: Tensor) -> Tensor:
    """(..., n, C) -> (T, n, C) contiguous."""
    return x.reshape(-1, x.shape[-2], x.shape[-1]).contiguous()


def _flat_coeff(h: Tensor, tail: int) -> Tensor:
    """Flatten the token dims of a coefficient tensor; static ones keep a single broadcast row."""
    return h.reshape(-1, *h.shape[h.dim() - tail :]).contiguous()


# ============================================================================ one dX per site (eager)
# pre and post_res/boundary hand their gradients to the site's coeffs backward, whose gx kernel
# writes the site's one dX (no autograd adds; Triton, eager, plain tensors: see site_grad).
def _coeffs_bwd_joined(ctx, g_pre, g_post, g_res, box: SiteGrad, saved: tuple):
    """coeffs backward (Triton: a mailbox exists only then) plus the dX parts handed over by pre
    and post_res/boundary, summed in fp32 by the gx kernel and written once, and pre's dH_pre
    when pre left it to the dh kernel's pass over X (``g_pre`` None: no other gradient of H_pre)."""
    coeffs_backward = OPS["coeffs"].function("triton", backward=True)
    x, phi, alpha, b_pre, b_post, b_res = saved
    iters, eps, variant, _ = ctx.args
    g_add, g_hin, h_pre, g_mix, h_mix, g_hpre = box.take()
    gx, *rest = coeffs_backward(
        None if g_pre is None else _flat_coeff(g_pre, 1), _flat_coeff(g_post, 1), _flat_coeff(g_res, 2),
        _flat3(x), phi, alpha, b_pre, b_post, b_res, iters, eps, variant,
        extra=(g_add, g_hin, h_pre), mix=None if g_mix is None else (g_mix, h_mix),
        pre_grad=None if g_hpre is None else g_hpre.reshape(-1, x.shape[-1]),
    )
    return (gx.reshape(x.shape), *rest)


def _post_res_bwd_triton(grad, x, h_out, h_post, h_res, write_gx: bool = True) -> tuple:
    """The Triton post_res backward, gradients shaped like the inputs (gx None without write_gx)."""
    gx, gho, ghp, ghr = OPS["post_res"].function("triton", backward=True)(
        _flat3(grad), _flat3(x), h_out.reshape(-1, x.shape[-1]).contiguous(),
        _flat_coeff(h_post, 1), _flat_coeff(h_res, 2), write_gx=write_gx,
    )
    gx = None if gx is None else gx.reshape(x.shape)
    return gx, gho.reshape(h_out.shape), ghp.reshape(h_post.shape), ghr.reshape(h_res.shape)


def _boundary_bwd_triton(g_x_next, g_pre, g_post, g_res, g_h_in, x, h_out, h_post, h_res, *rest,
                         x_next=None, mix=None) -> tuple:
    """The Triton boundary backward (``rest``: phi, alpha, b_pre, b_post, b_res, iters, eps,
    variant), gradients shaped like the inputs; ``x_next``: the forward's X' (None: recomputed);
    ``g_x_next`` None: 0; ``mix``: (g, H_res) of the next site's post_res mix (see the kernel)."""
    c = x.shape[-1]
    grads = OPS["boundary"].function("triton", backward=True)(
        None if g_x_next is None else _flat3(g_x_next), _flat_coeff(g_pre, 1), _flat_coeff(g_post, 1), _flat_coeff(g_res, 2),
        g_h_in.reshape(-1, c).contiguous(), _flat3(x), h_out.reshape(-1, c).contiguous(),
        _flat_coeff(h_post, 1), _flat_coeff(h_res, 2), *rest, x_next=None if x_next is None else _flat3(x_next),
        mix=None if mix is None else (_flat3(mix[0]), mix[1]),
    )
    like = (x, h_out, h_post, h_res, *rest[:5])
    return tuple(g.reshape(t.shape).contiguous() for g, t in zip(grads, like))
