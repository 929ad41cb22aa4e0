"""Fake (meta) implementations of the fused CPU kernels' ops (``torch.ops.mhc_cpu``), so that Dynamo,
AOTAutograd and inductor can put them in a compiled graph as opaque calls (``ops/cpu_paths.py``: the
forward kernels in a compiled call that needs no gradient; coeffs forward and backward in a compiled
train step). Each fake gives the shapes, dtypes and (contiguous) strides the kernel returns;
``tests/test_compiled_cpu.py`` checks them against the kernels."""
from __future__ import annotations

import torch


def _gates(t: int, n: int, like: torch.Tensor, cd: torch.dtype) -> list:
    return [like.new_empty((t, n), dtype=cd), like.new_empty((t, n), dtype=cd), like.new_empty((t, n, n), dtype=cd)]


def register() -> None:
    """Registers the fakes; called once, by ``kernels_cpu.available`` right after the extension is loaded
    (the ops must exist, and a second registration would raise)."""
    lib = "mhc_cpu::"

    @torch.library.register_fake(lib + "proj_mm")
    def _proj_mm(flat, phi):
        return flat.new_empty((flat.shape[0], phi.shape[1]), dtype=phi.dtype)

    @torch.library.register_fake(lib + "coeffs_fwd")
    def _coeffs_fwd(flat, proj, alpha, b_pre, b_post, b_res, eps, n, iters, hc):
        return tuple(_gates(flat.shape[0], n, flat, proj.dtype))

    @torch.library.register_fake(lib + "coeffs_bwd")
    def _coeffs_bwd(g_pre, g_post, g_res, flat, proj, alpha, b_pre, b_post, b_res, eps, n, iters, hc, rms=None):
        t, k = proj.shape
        return [flat.new_empty((t, k)), flat.new_empty((t, 1)), flat.new_empty((3,)), flat.new_empty((n,)),
                flat.new_empty((n,)), flat.new_empty((n, n))]

    @torch.library.register_fake(lib + "coeffs_gx")
    def _coeffs_gx(dh_r, phi, x, coef, g_x_next=None, g_h_in=None, h_pre=None):
        return x.new_empty(x.shape)

    @torch.library.register_fake(lib + "phi_grad_mm")
    def _phi_grad_mm(flat, dh_r):
        return flat.new_empty((flat.shape[1], dh_r.shape[1]))

    @torch.library.register_fake(lib + "pre_fwd")
    def _pre_fwd(x, h_pre):
        return x.new_empty((x.shape[0], x.shape[2]))

    @torch.library.register_fake(lib + "post_res_fwd")
    def _post_res_fwd(x, h_out, h_post, h_res):
        return x.new_empty(x.shape)

    @torch.library.register_fake(lib + "post_res_norm_fwd")
    def _post_res_norm_fwd(x, h_out, h_post, h_res, weight, bias, eps):
        return x.new_empty(x.shape)

    @torch.library.register_fake(lib + "site_start_fwd")
    def _site_start_fwd(x, phi, alpha, b_pre, b_post, b_res, eps, iters, hc):
        t, n, c = x.shape
        return [*_gates(t, n, x, phi.dtype), x.new_empty((t, c)), x.new_empty((t, phi.shape[1]), dtype=phi.dtype),
                x.new_empty((t,), dtype=phi.dtype)]

    @torch.library.register_fake(lib + "boundary_fwd")
    def _boundary_fwd(x, h_out, h_post, h_res, phi, alpha, b_pre, b_post, b_res, eps, iters, hc):
        t, n, c = x.shape
        return [x.new_empty(x.shape), *_gates(t, n, x, phi.dtype), x.new_empty((t, c)),
                x.new_empty((t, phi.shape[1]), dtype=phi.dtype), x.new_empty((t,), dtype=phi.dtype)]

    @torch.library.register_fake(lib + "expand_fwd")
    def _expand_fwd(x, n):
        return x.new_empty((x.shape[0], n, x.shape[1]))

    @torch.library.register_fake(lib + "collapse_fwd")
    def _collapse_fwd(x, mean):
        return x.new_empty((x.shape[0], x.shape[2]))
