"""Fused Triton kernel for ``mhc::boundary``: post_res of site l + coeffs and pre of site l+1.

Owns the boundary forward kernel, its launch configuration (:func:`launch_config`, also what
``kernels.aot`` compiles) and the launch wrappers :func:`boundary_forward` and
:func:`boundary_backward` called by ``mhc_compile.ops``. The math is exactly the composition
of the reference functions (``reference.post_res_mix`` -> ``reference.coeffs`` ->
``reference.pre_mix``), including the rounding of X' to x's dtype before site l+1 reads it.

Per token block (grid (cdiv(T, BLOCK_T),)), in two passes over C:
  pass 1, per BLOCK_C chunk: load X[:, j, chunk] for each stream j and h_out[chunk] once,
          X' = H_res X + H_post h_out (fp32, site l's n x n matrix in registers, static
          coefficients broadcast with token stride 0), round to x's dtype and store X';
          from the rounded X' accumulate the sum of squares and the projection
          (BLOCK_T, n_pad*BLOCK_C) x (n_pad*BLOCK_C, W) in fp32 (``tl.dot``).
  epilogue: site l+1's logits, sigmoid / 2 sigmoid / Sinkhorn in registers (the blocks of
          ``kernels.coeff_common``); store H_pre, H_post, H_res.
  pass 2: h_in = sum_i H_pre[i] X'[i] needs H_pre, which needs all of X', so X' is read back
          (just written by this program, mostly from L2) and h_in stored.
Bytes per token (element size e): reads X (nC e) + h_out (C e) once, writes X' (nC e),
reads X' back (nC e), writes h_in (C e) and the coefficients ((2n + n^2) * 4). The unfused
chain (post_res, coeffs, pre) moves (2n+1)C e + nC e + (n+1)C e.

Backward (:func:`boundary_backward`), two passes over the streams (``kernels.boundary_bwd``):
the coeffs dh kernel on the forward's saved X' (recomputed by this kernel with WRITE_HIN=False
only when not given), then one kernel for dX' and site l's post_res backward; 5n + 4 units of
C * e per token with X' saved (it is site l+1's X anyway).
float64 inputs, and h_out in another dtype than x, are not run here: ``mhc_compile.ops`` sends
them to the reference composition (forward and backward), so gradcheck runs through the same
entry points; the wrappers refuse them.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import check_post_res_shapes, coeff_rows, num_sms, on_gpu, reduction_splits
from .coeff_common import activate, as_f32, check_not_float64, check_phi, coeff_outputs, colmap, dot_acc, logit_consts
from .coeff_common import logit_layout, site_logits, store_coeffs
from .boundary_bwd import post_res_pass
from .coeffs import dh_pass, small_grads, x_pass
from .split_k import _finish_kernel, finish_config, hin_pass, store_partials

Tensor = torch.Tensor


# ============================================================================ kernel
@triton.jit
def _boundary_fwd_kernel(
    x_ptr, hout_ptr, hpost_ptr, hres_ptr,
    phi_ptr, alpha_ptr, bpre_ptr, bpost_ptr, bres_ptr,
    xn_ptr, hp_ptr, ho_ptr, hr_ptr, hin_ptr,
    ghin_ptr, ghp_ptr, accp_ptr, ssp_ptr, ghpp_ptr,
    T, C, J, stride_post, stride_res, CSPLIT, eps, iters,
    N: tl.constexpr, NP: tl.constexpr, G: tl.constexpr, W: tl.constexpr,
    BT: tl.constexpr, BC: tl.constexpr, HC: tl.constexpr, SPREAD_: tl.constexpr,
    DOT_P: tl.constexpr, WRITE_HIN: tl.constexpr, GHP: tl.constexpr, SPLIT: tl.constexpr,
):
    # GHP (backward recompute): also ghp[t, i] = sum_c g_hin[t, c] X'[t, i, c], the pre-mix's
    # gradient of H_pre, accumulated from the same X' chunks.
    # SPLIT (split-K, grid (token blocks, S)): pass 1 over channels [s CSPLIT, (s+1) CSPLIT) only,
    # then store the fp32 partials (acc, sumsq, ghp) for split_k._finish_kernel; otherwise
    # CSPLIT = C, one program per token block runs everything.
    pid = tl.program_id(0)
    c_lo = tl.program_id(1) * CSPLIT
    t = pid * BT + tl.arange(0, BT)
    tm = t < T
    t64 = t.to(tl.int64)
    i = tl.arange(0, NP)
    vec = i < N
    K = N * C

    # site l's coefficients (fp32, token stride 0 when static)
    hpost = tl.load(hpost_ptr + t64[:, None] * stride_post + i[None, :],
                    mask=tm[:, None] & vec[None, :], other=0.0).to(tl.float32)
    hres = tl.load(hres_ptr + t64[:, None, None] * stride_res + i[None, :, None] * N + i[None, None, :],
                   mask=tm[:, None, None] & vec[None, :, None] & vec[None, None, :], other=0.0).to(tl.float32)
    jcol, jvalid = colmap(N, NP, W)
    acc = tl.zeros((BT, W), dtype=tl.float32)
    sumsq = tl.zeros((BT,), dtype=tl.float32)
    ghp = tl.zeros((BT, NP), dtype=tl.float32)

    # ---- pass 1: X' = H_res X + H_post h_out; projection and sum of squares of rounded X'
    for c0 in range(c_lo, tl.minimum(c_lo + CSPLIT, C), BC):
        c = c0 + tl.arange(0, BC)
        cm = c < C
        m2 = tm[:, None] & cm[None, :]
        mixed = tl.zeros((BT, NP, BC), dtype=tl.float32)
        for jj in tl.static_range(N):
            xj = tl.load(x_ptr + (t64[:, None] * N + jj) * C + c[None, :], mask=m2, other=0.0).to(tl.float32)
            hcol = tl.sum(tl.where(i[None, None, :] == jj, hres, 0.0), axis=2)  # H_res[:, :, jj]
            mixed += hcol[:, :, None] * xj[:, None, :]
        hout = tl.load(hout_ptr + t64[:, None] * C + c[None, :], mask=m2, other=0.0).to(tl.float32)
        xn = mixed + hpost[:, :, None] * hout[:, None, :]
        xq = xn.to(xn_ptr.dtype.element_ty)
        m3 = tm[:, None, None] & vec[None, :, None] & cm[None, None, :]
        offs3 = (t64[:, None, None] * N + i[None, :, None]) * C + c[None, None, :]
        tl.store(xn_ptr + offs3, xq, mask=m3)
        xf = tl.where(m3, xq.to(tl.float32), 0.0)
        sumsq += tl.sum(tl.sum(xf * xf, axis=2), axis=1)
        if GHP:
            gh = tl.load(ghin_ptr + t64[:, None] * C + c[None, :], mask=m2, other=0.0).to(tl.float32)
            ghp += tl.sum(xf * gh[:, None, :], axis=2)
        krow = (i[:, None] * C + c[None, :]).to(tl.int64)  # flat index of (stream, channel)
        kmask = vec[:, None] & cm[None, :]
        ph = tl.load(phi_ptr + krow[:, :, None] * J + jcol[None, None, :],
                     mask=kmask[:, :, None] & jvalid[None, None, :], other=0.0)
        acc = dot_acc(tl.reshape(xf, (BT, NP * BC)), tl.reshape(ph, (NP * BC, W)), acc,
                      xn_ptr.dtype.element_ty.primitive_bitwidth == 16, DOT_P)

    if SPLIT:
        store_partials(accp_ptr, ssp_ptr, acc, sumsq, t64, tm, T, W)
        if GHP:
            row = t64 + tl.program_id(1) * T
            tl.store(ghpp_ptr + row[:, None] * NP + i[None, :], ghp, mask=tm[:, None])
    else:
        # ---- site l+1's coefficients, in registers
        r, h, u, ures, upre, upost, lpre, lpost, lres = site_logits(
            acc, sumsq, alpha_ptr, bpre_ptr, bpost_ptr, bres_ptr, K, eps, N, NP, G, BT, HC)
        hp, ho, hr = activate(lpre, lpost, lres, iters, N, NP, HC, SPREAD_)
        store_coeffs(hp_ptr, ho_ptr, hr_ptr, t, tm, hp, ho, hr, N, NP)
        if GHP:
            tl.store(ghp_ptr + t64[:, None] * N + i[None, :], ghp, mask=tm[:, None] & vec[None, :])
        # ---- pass 2: h_in = sum_i H_pre[i] X'[i] from the X' this program just wrote
        if WRITE_HIN:  # False when the backward only recomputes X' and the coefficients
            tl.debug_barrier()
            hin_pass(xn_ptr, hin_ptr, hp, t64, tm, i, vec, 0, C, C, N, BC)


# ============================================================================ launch configuration
def launch_config(n: int, C: int, variant: str, gpu: bool) -> tuple[dict, int, int]:
    """(constexprs but WRITE_HIN, GHP and SPLIT, num_warps, num_stages) for ``n`` streams of
    ``C`` channels; ``gpu``: compiled for CUDA rather than the interpreter. The wrappers below
    and ``kernels.aot`` launch and compile from this one place.

    GPU, n <= 4: 64-token tiles on one warpgroup (4 warps), so the projection
    (64, n_pad*BLOCK_C) x (n_pad*BLOCK_C, W) is a wgmma (Hopper's tensor-core MMA needs M = 64
    per warpgroup; W = 16 or 32, tf32x3 = three tf32 wgmmas per chunk), with a K chunk of
    n_pad*BLOCK_C = 32: the fp32 X' tile (64, n_pad, BLOCK_C) then stays at 16 registers a
    thread, and the kernel at 96-245 registers x 128 threads, <= 39 KiB of shared memory, so
    >= 2 CTAs per SM and no spills (sm_90 AOT compile with a launch's divisibility, triton 3.6
    and 3.9, tests/test_kernel_aot.py; a chunk of 64 held 255 registers and spilled at n = 3
    in fp32). n > 4: 16-token tiles, n_pad*BLOCK_C = 64, 8 warps (mma.sync). Untuned on hardware.
    Interpreter: small blocks (its cost is per op)."""
    np_, _, _ = logit_layout(n)
    if not gpu:
        bt, bc, warps = 16, 16, 1
    elif np_ <= 4:
        bt, bc, warps = 64, max(16 // np_, min(32 // np_, triton.next_power_of_2(C))), 4
    else:
        bt, bc, warps = 16, 8, 8
    return dict(logit_consts(n, variant, gpu), BT=bt, BC=bc), warps, 2


def launch_grid(T: int, C: int, consts: dict, sms: int, splits: Optional[int] = None) -> tuple[int, int, int]:
    """(token blocks, S, channels per split) of a launch at T tokens of C channels with
    :func:`launch_config`'s ``consts`` on ``sms`` SMs (0 in the interpreter: no split unless
    ``splits`` asks). S > 1: split-K, the kernel with SPLIT then ``split_k._finish_kernel``."""
    tblocks = triton.cdiv(T, consts["BT"])
    s, per = reduction_splits(tblocks, triton.cdiv(C, consts["BC"]), sms, splits)
    return tblocks, s, per * consts["BC"]


def hin_grid(T: int, C: int, fconsts: dict, sms: int, splits: Optional[int] = None) -> tuple[int, int, int]:
    """(token blocks, programs per block, channels each) of the split-K finish kernel with its h_in
    pass (``fconsts``: ``split_k.finish_config``'s). Every program re-sums its block's S partials,
    so the blocks get at most 16 programs each (the partials' L2 re-reads grow with S x programs)."""
    tblocks = triton.cdiv(T, fconsts["BT"])
    s, per = reduction_splits(tblocks, triton.cdiv(C, fconsts["BC"]), sms, splits, max_splits=16)
    return tblocks, s, per * fconsts["BC"]


def _check(x, h_out, h_post, h_res, phi, *params) -> tuple[bool, bool]:
    check_post_res_shapes(x, h_out, h_post, h_res)
    T, n, C = x.shape
    check_phi(n, C, phi, "boundary")
    check_not_float64(x, h_out, h_post, h_res, phi, *params)
    if h_out.dtype != x.dtype:
        raise TypeError(f"h_out ({h_out.dtype}) must have x's dtype ({x.dtype}); ops routes mixed dtypes to the reference")
    return coeff_rows(h_post, T, 1, "h_post"), coeff_rows(h_res, T, 2, "h_res")


# ============================================================================ wrappers
def boundary_forward(
    x: Tensor, h_out: Tensor, h_post: Tensor, h_res: Tensor,
    phi: Tensor, alpha: Tensor, b_pre: Tensor, b_post: Tensor, b_res: Tensor,
    iters: int, eps: float, variant: str, out: Optional[tuple[Tensor, ...]] = None,
    write_h_in: bool = True, g_h_in: Optional[Tensor] = None, splits: Optional[int] = None,
) -> tuple[Tensor, ...]:
    """(x_next (T, n, C), h_pre (T, n), h_post (T, n), h_res (T, n, n), h_in (T, C)).

    x (T, n, C) and h_out (T, C) in the model dtype (float32/float16/bfloat16, the same for
    both); site l's h_post (T or 1, n) and h_res (T or 1, n, n); site l+1's phi, alpha, biases.
    ``out``: optional preallocated outputs in that order (tests poison them).
    ``write_h_in=False`` skips the second pass (h_in is then left unwritten; the backward uses
    it to recompute X' and H_pre only). ``g_h_in`` (T, C): also return a sixth output,
    ``sum_c g_h_in * X'`` (T, n) fp32 (the pre-mix's gradient of H_pre, for the backward).
    ``splits``: split-K programs per token block (None: :func:`launch_grid` picks, 1 in the
    interpreter; tests force it).
    """
    post_static, res_static = _check(x, h_out, h_post, h_res, phi, alpha, b_pre, b_post, b_res)
    T, n, C = x.shape
    gpu = on_gpu(x.device)
    consts, warps, stages = launch_config(n, C, variant, gpu)
    x, h_out = x.contiguous(), h_out.contiguous()
    h_post, h_res, phi, alpha, b_pre, b_post, b_res = as_f32(h_post, h_res, phi, alpha, b_pre, b_post, b_res)
    dev = x.device
    if out is None:
        out = (
            torch.empty_like(x, memory_format=torch.contiguous_format),
            *coeff_outputs(T, n, dev),
            torch.empty((T, C), dtype=x.dtype, device=dev),
        )
    ghp = None if g_h_in is None else torch.empty((T, n), dtype=torch.float32, device=dev)
    if T == 0:
        return out if ghp is None else (*out, ghp)
    ghin = out[4] if g_h_in is None else g_h_in.reshape(T, C).contiguous()
    tblocks, S, csplit = launch_grid(T, C, consts, num_sms(dev) if gpu else 0, splits)
    w, np_ = consts["W"], consts["NP"]
    accp = torch.empty((S, T, w) if S > 1 else (1,), dtype=torch.float32, device=dev)
    ssp = torch.empty((S, T) if S > 1 else (1,), dtype=torch.float32, device=dev)
    ghpp = torch.empty((S, T, np_) if S > 1 and ghp is not None else (1,), dtype=torch.float32, device=dev)
    hgp = out[1] if ghp is None else ghp
    _boundary_fwd_kernel[(tblocks, S)](
        x, h_out, h_post, h_res, phi, alpha, b_pre, b_post, b_res, *out, ghin, hgp, accp, ssp, ghpp,
        T, C, 2 * n + n * n, 0 if post_static else n, 0 if res_static else n * n, csplit, float(eps), int(iters),
        **consts, WRITE_HIN=bool(write_h_in), GHP=ghp is not None, SPLIT=S > 1, num_warps=warps, num_stages=stages,
    )
    if S > 1:
        fconsts, fwarps = finish_config(n, variant, gpu, consts["BC"])
        ftb, fs, hsplit = hin_grid(T, C, fconsts, num_sms(dev) if gpu else 0, splits)
        _finish_kernel[(ftb, fs if write_h_in else 1)](
            accp, ssp, ghpp, alpha, b_pre, b_post, b_res, *out[1:4], hgp, out[0], out[4],
            T, C, n * C, S, hsplit, float(eps), int(iters),
            **fconsts, GHP=ghp is not None, HIN=bool(write_h_in), num_warps=fwarps,
        )
    return out if ghp is None else (*out, ghp)


def boundary_backward(
    g_xn: Tensor, g_hp: Tensor, g_ho: Tensor, g_hr: Tensor, g_hin: Tensor,
    x: Tensor, h_out: Tensor, h_post: Tensor, h_res: Tensor,
    phi: Tensor, alpha: Tensor, b_pre: Tensor, b_post: Tensor, b_res: Tensor,
    iters: int, eps: float, variant: str, x_next: Optional[Tensor] = None,
    mix: Optional[tuple[Tensor, Tensor]] = None,
) -> tuple[Tensor, ...]:
    """(gx, gh_out, gh_post, gh_res, gphi, galpha, gb_pre, gb_post, gb_res), each shaped like its input.

    ``x_next``: the forward's X' (saved; it is site l+1's X); None recomputes it (this kernel,
    no h_in pass). Then two passes (``kernels.boundary_bwd``): the coeffs dh kernel on X' (with
    the pre-mix's dH_pre and H_pre from the same pass), and one kernel for dX' (fp32, never
    written) and site l's post_res backward. Same dtypes as :func:`boundary_forward`.
    ``g_xn`` None: 0; ``mix = (g (T, n, C), h_res (T, n, n))`` adds ``H_res^T g`` to dX' (the
    next post_res mix's dX' from its incoming gradient: ops' site mailbox).
    """
    post_static, res_static = _check(x, h_out, h_post, h_res, phi, alpha, b_pre, b_post, b_res)
    T, n, C = x.shape
    params = (phi, alpha, b_pre, b_post, b_res)
    if T == 0:
        return (torch.zeros_like(x), torch.zeros_like(h_out), torch.zeros_like(h_post), torch.zeros_like(h_res),
                *(torch.zeros_like(p) for p in params))
    x, h_out = x.contiguous(), h_out.contiguous()
    if x_next is None:
        xn = boundary_forward(x, h_out, h_post, h_res, *params, iters, eps, variant, write_h_in=False)[0]
    else:
        xn = x_next.reshape(T, n, C).contiguous()
    g_hin = g_hin.reshape(T, C).contiguous()
    dh = dh_pass(g_hp.reshape(T, n), g_ho, g_hr, xn, params, iters, eps, variant, pre_grad=g_hin, want_hp=True)
    hpost32, hres32 = as_f32(h_post, h_res)
    gx, gho, ghp, ghr = post_res_pass(
        x, h_out, hpost32, hres32, xn, dh.p32[0], dh.dp, dh.s, None if g_xn is None else g_xn.reshape(T, n, C).contiguous(),
        g_hin, dh.hp, post_static, res_static, dh.consts,
        None if mix is None else (mix[0].reshape(T, n, C).contiguous(), as_f32(mix[1].reshape(T, n, n))[0]),
    )
    gphi = x_pass(dh, xn, None)  # X'^T dp: one more read of X' (see kernels.boundary_bwd)
    return (gx, gho, ghp.to(h_post.dtype), ghr.to(h_res.dtype), *small_grads(dh, gphi, params))
