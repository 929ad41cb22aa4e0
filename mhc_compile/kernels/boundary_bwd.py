"""Second pass of the boundary backward (``kernels.boundary.boundary_backward``): site l+1's dX'
and site l's post_res backward in one kernel, dX' never written.

The boundary's backward (no recompute of X' before it: the forward's X' is saved, it is site
l+1's X anyway):
  pass 1  ``kernels.coeffs``'s dh kernel on X' (reads X' and g_h_in): site l+1's dlogits, with
          the pre-mix's dH_pre summed from the same chunks, and H_pre recomputed (coefficient-
          sized outputs dp, s, H_pre, partials);
  pass 2  this kernel, grid (token blocks, C splits), each program walking its C range in
          chunks of BC channels of every stream: dX' = dp . phi^T + s * X' + g_x_next +
          H_pre g_h_in in fp32, then from that fp32 dX' in registers site l's post_res
          backward: dX = H_res^T dX' (written, x's dtype), dh_out = sum_i H_post[i] dX'[i]
          (written), dH_post = sum_c dX' h_out and dH_res = sum_c dX' (x) X summed in registers
          over the program's C range (per-split partials summed in torch: deterministic, no
          atomics). XREC (n >= 4, ``mix_config``): the X' of s * X' is recomputed from the X and
          h_out tiles this pass reads anyway (H_res X + H_post h_out in the forward's fp32 order,
          rounded to X's dtype: the values the forward stored), so X' is not read here;
  pass 3  ``coeffs._coeffs_bwd_x_kernel`` with GX=False: gphi = X'^T dp (a reduction over
          tokens, which pass 2's grid cannot hold: docs/benchmarks.md).
Stream bytes per token (units of C * e): pass 1 reads X' (n) and g_h_in (1); pass 2 reads
g_x_next (n), g_h_in (1), X (n), h_out (1) (and X' (n) without XREC) and writes dX (n),
dh_out (1); pass 3 reads X' (n): 5n + 4 with XREC (6n + 4 without), against 9n + 8 for
recompute + dh + gx + post_res backward.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import num_sms, on_gpu
from .coeff_common import colmap, logit_layout

Tensor = torch.Tensor


@triton.jit
def _boundary_bwd_mix_kernel(
    x_ptr, hout_ptr, hpost_ptr, hres_ptr,
    xn_ptr, phi_ptr, dp_ptr, s_ptr, gxn_ptr, ghin_ptr, hp_ptr, gmix_ptr, hmix_ptr,
    gx_ptr, gho_ptr, ghp_part_ptr, ghr_part_ptr,
    T, C, J, C_CHUNK, stride_post, stride_res,
    N: tl.constexpr, NP: tl.constexpr, W: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
    DOT_P: tl.constexpr, GADD: tl.constexpr, GMIX: tl.constexpr, XREC: tl.constexpr,
):
    """GADD: add g_x_next (the gradient of X' from its consumers); GMIX: add H_mix^T g_mix, the
    dX' of site l+1's post_res mix from its incoming gradient (ops' site mailbox: that post_res's
    backward writes no dX'), g_mix read once, H_mix (T, N, N) fp32."""
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    t = pid_t * BT + tl.arange(0, BT)
    tm = t < T
    t64 = t.to(tl.int64)
    i = tl.arange(0, NP)
    vec = i < N
    mi = tm[:, None] & vec[None, :]
    jcol, jvalid = colmap(N, NP, W)
    col = tl.arange(0, W)
    # per token: site l+1's dp, s, H_pre; site l's H_post, H_res (fp32, token stride 0 when static)
    dp = tl.load(dp_ptr + t64[:, None] * W + col[None, :], mask=tm[:, None], other=0.0)
    s = tl.load(s_ptr + t, mask=tm, other=0.0)
    hp = tl.load(hp_ptr + t64[:, None] * N + i[None, :], mask=mi, other=0.0)
    hpost = tl.load(hpost_ptr + t64[:, None] * stride_post + i[None, :], mask=mi, other=0.0)
    hres = tl.load(hres_ptr + t64[:, None, None] * stride_res + i[None, :, None] * N + i[None, None, :],
                   mask=mi[:, :, None] & vec[None, None, :], other=0.0)
    if GMIX:
        hmix = tl.load(hmix_ptr + t64[:, None, None] * (N * N) + i[None, :, None] * N + i[None, None, :],
                       mask=mi[:, :, None] & vec[None, None, :], other=0.0)
    ghp = tl.zeros((BT, NP), dtype=tl.float32)
    ghr = tl.zeros((BT, NP, NP), dtype=tl.float32)
    c_lo = pid_s * C_CHUNK
    for c0 in range(c_lo, c_lo + C_CHUNK, BC):
        c = c0 + tl.arange(0, BC)
        cm = c < C
        m2 = tm[:, None] & cm[None, :]
        m3 = tm[:, None, None] & vec[None, :, None] & cm[None, None, :]
        offs3 = (t64[:, None, None] * N + i[None, :, None]) * C + c[None, None, :]
        # ---- site l+1: dX' = dp . phi^T + s X' + g_x_next + H_pre g_h_in, fp32, never written
        krow = (i[:, None] * C + c[None, :]).to(tl.int64)  # flat index of (stream, channel)
        phT = tl.load(phi_ptr + krow[None, :, :] * J + jcol[:, None, None],
                      mask=jvalid[:, None, None] & (vec[:, None] & cm[None, :])[None, :, :], other=0.0)
        g3 = tl.reshape(tl.dot(dp, tl.reshape(phT, (W, NP * BC)), input_precision=DOT_P), (BT, NP, BC))
        # XREC: X' from the X and h_out tiles read anyway, as the forward made it (the same fp32
        # sum order, rounded to X's dtype); else the saved X' is read
        if XREC:
            xl = tl.load(x_ptr + offs3, mask=m3, other=0.0).to(tl.float32)
            ho = tl.load(hout_ptr + t64[:, None] * C + c[None, :], mask=m2, other=0.0).to(tl.float32)
            mixed = tl.zeros((BT, NP, BC), dtype=tl.float32)
            for jj in tl.static_range(N):
                xj = tl.sum(tl.where(i[None, :, None] == jj, xl, 0.0), axis=1)  # X[t, jj, c]
                hcol = tl.sum(tl.where(i[None, None, :] == jj, hres, 0.0), axis=2)  # H_res[t, :, jj]
                mixed += hcol[:, :, None] * xj[:, None, :]
            xn = (mixed + hpost[:, :, None] * ho[:, None, :]).to(gx_ptr.dtype.element_ty).to(tl.float32)
            g3 += s[:, None, None] * xn
        else:
            g3 += s[:, None, None] * tl.load(xn_ptr + offs3, mask=m3, other=0.0).to(tl.float32)
        if GADD:
            g3 += tl.load(gxn_ptr + offs3, mask=m3, other=0.0).to(tl.float32)
        if GMIX:
            for r in tl.static_range(N):
                gm_r = tl.load(gmix_ptr + (t64[:, None] * N + r) * C + c[None, :], mask=m2, other=0.0).to(tl.float32)
                hm_r = tl.sum(tl.where(i[None, :, None] == r, hmix, 0.0), axis=1)  # H_mix[t, r, :]
                g3 += hm_r[:, :, None] * gm_r[:, None, :]
        gh = tl.load(ghin_ptr + t64[:, None] * C + c[None, :], mask=m2, other=0.0).to(tl.float32)
        g3 += hp[:, :, None] * gh[:, None, :]
        # ---- site l's post_res backward from dX'
        if not XREC:
            xl = tl.load(x_ptr + offs3, mask=m3, other=0.0).to(tl.float32)
            ho = tl.load(hout_ptr + t64[:, None] * C + c[None, :], mask=m2, other=0.0).to(tl.float32)
        gho = tl.sum(hpost[:, :, None] * g3, axis=1)
        tl.store(gho_ptr + t64[:, None] * C + c[None, :], gho.to(gho_ptr.dtype.element_ty), mask=m2)
        ghp += tl.sum(g3 * ho[:, None, :], axis=2)
        gxl = tl.zeros((BT, NP, BC), dtype=tl.float32)
        for r in tl.static_range(N):
            g_r = tl.sum(tl.where(i[None, :, None] == r, g3, 0.0), axis=1)  # dX'[t, r, c], picked in registers
            hrow = tl.sum(tl.where(i[None, :, None] == r, hres, 0.0), axis=1)  # H_res[t, r, :]
            gxl += hrow[:, :, None] * g_r[:, None, :]  # dX[t, j, c] += H_res[t, r, j] dX'[t, r, c]
            grow = tl.sum(xl * g_r[:, None, :], axis=2)  # dH_res[t, r, j] over this chunk
            ghr += tl.where(i[None, :, None] == r, grow[:, None, :], 0.0)
        tl.store(gx_ptr + offs3, gxl.to(gx_ptr.dtype.element_ty), mask=m3)
    prow = pid_s.to(tl.int64) * T + t64  # this C split's partial row of token t
    tl.store(ghp_part_ptr + prow[:, None] * N + i[None, :], ghp, mask=mi)
    tl.store(ghr_part_ptr + (prow[:, None, None] * N + i[None, :, None]) * N + i[None, None, :], ghr,
             mask=mi[:, :, None] & vec[None, None, :])


def mix_config(n: int, gpu: bool) -> tuple[dict, int]:
    """(BT, BC, XREC) and num_warps of :func:`_boundary_bwd_mix_kernel`: NP * BC = 64 flat columns
    per chunk on CUDA (the tl.dot's K), small tiles in the interpreter. XREC (n >= 4, on CUDA and
    in the interpreter alike): X' recomputed from X and h_out, not read (n units of C * e per
    token less); at n = 1 and 3 it spilled 8-16 B on sm_90, so those read X'. Checked for sm_90
    by tests/test_kernel_aot.py (kernels.aot); untuned on hardware."""
    np_, _, _ = logit_layout(n)
    xrec = n >= 4
    if not gpu:
        return dict(BT=16, BC=max(16 // np_, 8), XREC=xrec), 1
    if np_ == 8:
        # n_pad = 8: 32 tokens x 64 columns held 255 registers and spilled 280-760 B on sm_90;
        # 16 tokens x 32 flat columns (BC = 4 of each stream) spill nothing (triton 3.6 and 3.9)
        return dict(BT=16, BC=4, XREC=xrec), 4
    # n = 4: 16-token tiles (32 spilled 8 B on triton 3.6 in bf16; 16 gives 128-168 registers,
    # 3-4 CTAs/SM, no spills on 3.6 and 3.9); n = 3 keeps 32 (16 spills there in bf16)
    return dict(BT=16 if n == 4 else 32, BC=max(64 // np_, 8), XREC=xrec), 4


def post_res_pass(
    x: Tensor, h_out: Tensor, h_post: Tensor, h_res: Tensor, xn: Tensor, phi32: Tensor,
    dp: Tensor, s: Tensor, g_xn: Optional[Tensor], g_hin: Tensor, hp: Tensor, post_static: bool, res_static: bool,
    consts: dict, mix: Optional[tuple[Tensor, Tensor]] = None,
) -> tuple[Tensor, ...]:
    """Launch pass 2: (gx, gh_out, gh_post, gh_res) of site l (fp32 coefficient gradients).

    ``g_xn`` (None: 0) and ``mix = (g_mix (T, n, C), h_mix (T, n, n) fp32)``: the parts of dX'
    beyond site l+1's own coefficients and pre-mix (see the kernel's GADD, GMIX).

    ``consts``: the dh kernel's logit constexprs (N, NP, W, DOT_P used). All inputs contiguous
    (T, n, C) / (T, C) / fp32 coefficients (one row when static). Grid (token blocks, C splits):
    each program walks its C range, so dH_post / dH_res are summed in registers over C; C
    splits (for parallelism at small T, on CUDA only) leave per-split partials summed in torch."""
    T, n, C = x.shape
    J = 2 * n + n * n
    dev = x.device
    gpu = on_gpu(dev)
    blocks, warps = mix_config(n, gpu)
    gx = torch.empty_like(x)
    gho = torch.empty_like(h_out)
    tblocks = triton.cdiv(T, blocks["BT"])
    cblocks = triton.cdiv(C, blocks["BC"])
    splits = max(1, min(cblocks, triton.cdiv(2 * num_sms(dev), tblocks), 8)) if gpu else 1
    chunk = triton.cdiv(cblocks, splits) * blocks["BC"]
    splits = triton.cdiv(C, chunk)
    ghp_part = torch.empty((splits, T, n), dtype=torch.float32, device=dev)
    ghr_part = torch.empty((splits, T, n, n), dtype=torch.float32, device=dev)
    g_mix, h_mix = (s, s) if mix is None else mix  # s: an unread dummy
    _boundary_bwd_mix_kernel[(tblocks, splits)](
        x, h_out, h_post, h_res, xn, phi32, dp, s, s if g_xn is None else g_xn, g_hin, hp, g_mix, h_mix,
        gx, gho, ghp_part, ghr_part, T, C, J, chunk, 0 if post_static else n, 0 if res_static else n * n,
        N=n, NP=consts["NP"], W=consts["W"], DOT_P=consts["DOT_P"], **blocks,
        GADD=g_xn is not None, GMIX=mix is not None, num_warps=warps,
    )
    gh_post = (ghp_part[0] if splits == 1 else ghp_part.sum(0))
    gh_res = (ghr_part[0] if splits == 1 else ghr_part.sum(0))
    if post_static:
        gh_post = gh_post.sum(0, keepdim=True)
    if res_static:
        gh_res = gh_res.sum(0, keepdim=True)
    return gx, gho, gh_post.reshape(h_post.shape), gh_res.reshape(h_res.shape)
