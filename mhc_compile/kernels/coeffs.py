"""Fused Triton kernels for ``mhc::coeffs``: RMS + projection + activations + Sinkhorn, fwd and bwd.

Owns the forward kernel, the two backward kernels, their launch configuration
(:func:`launch_config`, also what ``kernels.aot`` compiles) and the launch wrappers
:func:`coeffs_forward` / :func:`coeffs_backward` called by ``mhc_compile.ops``. The math is
exactly ``reference.coeffs(..., dynamic=True)``; the building blocks it shares with
``kernels.boundary`` (logit tile layout, activations, Sinkhorn and its on-chip replay) live in
``kernels.coeff_common``.

Per token (x = vec(X), K = n*C, J = 2n + n^2):
    r = sqrt(mean(x^2) + eps);  p = x . phi (J);  h = p / r
    u = h ("mhc") or tanh(h) ("hc");  logits = alpha * u + b
    "mhc": H_pre = sigmoid, H_post = 2 sigmoid, H_res = Sinkhorn(exp(clamp(z - max, -50)), iters)
    "hc":  the logits themselves.

Kernels and grids (T tokens, BT = BLOCK_T):
    forward   grid (cdiv(T, BT),): one pass over x in BLOCK_K chunks of the flat nC axis,
              fp32 ``tl.dot`` (BT, BK) x (BK, W) plus the sum of squares, then the
              epilogue in registers; writes H_pre, H_post, H_res.
    backward  kernel 1 (dh), grid (cdiv(T, BT),) (its own BT at n > 4: dh_consts): the same
              projection over x, in (BT, NP, BC) channel chunks of every stream (recompute r
              and p) and, with GHP, the pre-mix's dH_pre = sum_c g_hin x from the same chunks
              (so pre's backward reads no x), then
              the activations' backward and Sinkhorn's backward replayed on chip: for each
              iteration k from last to first, the iterate M_k is recomputed from M_0 by k
              forward iterations (O(iters^2) tiny n x n steps per token, no storage), then
              reverse-mode through column- and row-normalisation. Writes dp = dh / r (T, W)
              fp32, the per-token RMS term s = -<dh, h> / (K r^2), per-block partial sums
              of galpha and the bias gradients (summed over blocks in torch), and with
              WRITE_HP the recomputed H_pre.
              kernel 2 (gx), grid (cdiv(C, BC), S): gx = dp . phi^T + s * x over chunks of BC
              channels of every stream (the flat columns i * C + c), plus the dX of the
              streams' other consumers (pre-mix, post_res mix, a given dX) summed in fp32, and
              gphi partials x^T dp over S token splits (summed in torch; deterministic, no
              atomics); GX=False: gphi only (the boundary backward's, kernels.boundary_bwd).
Bytes per token (x element size e): forward reads n*C*e, writes (2n + n^2)*4. Backward reads
x twice (2 n*C*e) and g_hin once per pass that takes it, writes gx (n*C*e), plus ~(2W + 1)*4
of dp scratch. phi is re-read per block from L2. The backward is the least two passes allow:
dlogits needs full-row reductions over x (r, p, dH_pre), and gx needs dlogits.

float64 inputs are not run by these kernels: ``mhc_compile.ops`` sends them to the reference
(``reference.coeffs_backward`` for the backward), so gradcheck still works through
``kernels="triton"``; the wrappers refuse them.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ._common import num_sms, on_gpu, reduction_splits
from .coeff_common import activate, as_f32, check_not_float64, check_phi, coeff_outputs, colmap, dot_acc, logit_consts
from .coeff_common import logit_layout, merge_tile, project_streams, site_logits, sinkhorn_bwd, store_coeffs
from .coeff_common import stream_masks
from .split_k import _finish_kernel, finish_config, store_partials

Tensor = torch.Tensor


# ============================================================================ kernels
@triton.jit
def _project(x_ptr, phi_ptr, t, tm, K, J,
             N: tl.constexpr, NP: tl.constexpr, W: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
             DOT_P: tl.constexpr):
    """One pass over the flat (BT, K) rows of x: fp32 projection tile (BT, W) and sum of squares."""
    return _project_range(x_ptr, phi_ptr, t, tm, 0, K, K, J, N, NP, W, BT, BK, DOT_P)


@triton.jit
def _project_range(x_ptr, phi_ptr, t, tm, k_lo, k_hi, K, J,
                   N: tl.constexpr, NP: tl.constexpr, W: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                   DOT_P: tl.constexpr):
    """:func:`_project` over the flat columns [k_lo, k_hi) only (k_hi - k_lo a multiple of BK,
    or k_hi = K): a split-K program's partial tile and sum of squares."""
    jcol, jvalid = colmap(N, NP, W)
    acc = tl.zeros((BT, W), dtype=tl.float32)
    sumsq = tl.zeros((BT,), dtype=tl.float32)
    t64 = t.to(tl.int64)
    for k0 in range(k_lo, k_hi, BK):
        k = k0 + tl.arange(0, BK)
        km = k < K
        xt = tl.load(x_ptr + t64[:, None] * K + k[None, :], mask=tm[:, None] & km[None, :], other=0.0)
        xt = xt.to(tl.float32)
        ph = tl.load(phi_ptr + k.to(tl.int64)[:, None] * J + jcol[None, :],
                     mask=km[:, None] & jvalid[None, :], other=0.0)
        sumsq += tl.sum(xt * xt, axis=1)
        acc = dot_acc(xt, ph, acc, x_ptr.dtype.element_ty.primitive_bitwidth == 16, DOT_P)
    return acc, sumsq


@triton.jit
def _block_logits(x_ptr, phi_ptr, alpha_ptr, bpre_ptr, bpost_ptr, bres_ptr, T, K, J, eps,
                  N: tl.constexpr, NP: tl.constexpr, G: tl.constexpr, W: tl.constexpr, BT: tl.constexpr,
                  BK: tl.constexpr, HC: tl.constexpr, DOT_P: tl.constexpr):
    """This program's token block t (mask tm) and, from one pass over its x, the tiles of
    :func:`coeff_common.site_logits`: (t, tm, r, h, u, ures, upre, upost, lpre, lpost, lres)."""
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    tm = t < T
    acc, sumsq = _project(x_ptr, phi_ptr, t, tm, K, J, N, NP, W, BT, BK, DOT_P)
    r, h, u, ures, upre, upost, lpre, lpost, lres = site_logits(
        acc, sumsq, alpha_ptr, bpre_ptr, bpost_ptr, bres_ptr, K, eps, N, NP, G, BT, HC)
    return t, tm, r, h, u, ures, upre, upost, lpre, lpost, lres


@triton.jit
def _coeffs_fwd_kernel(
    x_ptr, phi_ptr, alpha_ptr, bpre_ptr, bpost_ptr, bres_ptr,
    hp_ptr, ho_ptr, hr_ptr,
    T, K, J, eps, iters,
    N: tl.constexpr, NP: tl.constexpr, G: tl.constexpr, W: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
    HC: tl.constexpr, SPREAD_: tl.constexpr, DOT_P: tl.constexpr,  # launch_config's constexprs
):
    t, tm, r, h, u, ures, upre, upost, lpre, lpost, lres = _block_logits(
        x_ptr, phi_ptr, alpha_ptr, bpre_ptr, bpost_ptr, bres_ptr, T, K, J, eps, N, NP, G, W, BT, BK, HC, DOT_P)
    hp, ho, hr = activate(lpre, lpost, lres, iters, N, NP, HC, SPREAD_)
    store_coeffs(hp_ptr, ho_ptr, hr_ptr, t, tm, hp, ho, hr, N, NP)


@triton.jit
def _coeffs_part_kernel(
    x_ptr, phi_ptr, accp_ptr, ssp_ptr,
    T, K, J, KSPLIT,
    N: tl.constexpr, NP: tl.constexpr, W: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, DOT_P: tl.constexpr,
):
    """Split-K forward, grid (token blocks, S): the partial projection and sum of squares of the
    flat columns [s KSPLIT, (s+1) KSPLIT), for split_k._finish_kernel."""
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    tm = t < T
    k_lo = tl.program_id(1) * KSPLIT
    acc, sumsq = _project_range(x_ptr, phi_ptr, t, tm, k_lo, tl.minimum(k_lo + KSPLIT, K), K, J,
                                N, NP, W, BT, BK, DOT_P)
    store_partials(accp_ptr, ssp_ptr, acc, sumsq, t.to(tl.int64), tm, T, W)


@triton.jit
def _coeffs_bwd_dh_kernel(
    gp_ptr, go_ptr, gr_ptr, ghin_ptr,
    x_ptr, phi_ptr, alpha_ptr, bpre_ptr, bpost_ptr, bres_ptr,
    dp_ptr, s_ptr, part_ptr, hp_ptr,
    T, C, J, eps, iters,
    N: tl.constexpr, NP: tl.constexpr, G: tl.constexpr, W: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
    HC: tl.constexpr, SPREAD_: tl.constexpr, DOT_P: tl.constexpr,  # dh_consts
    GP: tl.constexpr, GHP: tl.constexpr, WRITE_HP: tl.constexpr,
):
    """Recompute the logits, backprop the activations (Sinkhorn replayed on chip) to dh.

    Writes dp = dh / r (T, W), s = -<dh, h> / (K r^2) (T,), and this block's partial sums
    (W + 3 floats: bias gradients in the tile layout, then galpha) to part[pid].
    GP: gp (the gradient of H_pre) is given (else 0); GHP: the pre-mix's part
    sum_c ghin * x is added to it, from the same pass over x (the pre backward's dH_pre, with
    no read of x of its own); WRITE_HP: store the recomputed H_pre (T, N) (the boundary backward,
    which then needs no recompute of X' to get it).
    """
    pid = tl.program_id(0)
    t = pid * BT + tl.arange(0, BT)
    tm = t < T
    K = N * C
    acc, sumsq, ghp = project_streams(x_ptr, phi_ptr, ghin_ptr, t, tm, C, J, N, NP, W, BT, BC, DOT_P, GHP)
    r, h, u, ures, upre, upost, lpre, lpost, lres = site_logits(
        acc, sumsq, alpha_ptr, bpre_ptr, bpost_ptr, bres_ptr, K, eps, N, NP, G, BT, HC)
    t64 = t.to(tl.int64)
    vec, vrow, vcol, valid = stream_masks(N, NP)
    i = tl.arange(0, NP)
    m2 = tm[:, None] & vec[None, :]
    if GP:
        gp = tl.load(gp_ptr + t64[:, None] * N + i[None, :], mask=m2, other=0.0).to(tl.float32)
    else:
        gp = tl.zeros((BT, NP), dtype=tl.float32)
    if GHP:
        gp += ghp
    if WRITE_HP:
        if HC:
            tl.store(hp_ptr + t64[:, None] * N + i[None, :], lpre, mask=m2)
        else:
            tl.store(hp_ptr + t64[:, None] * N + i[None, :], tl.sigmoid(lpre), mask=m2)
    go = tl.load(go_ptr + t64[:, None] * N + i[None, :], mask=m2, other=0.0).to(tl.float32)
    m3 = tm[:, None, None] & valid
    gr = tl.load(gr_ptr + t64[:, None, None] * (N * N) + i[None, :, None] * N + i[None, None, :],
                 mask=m3, other=0.0).to(tl.float32)
    if HC:
        dpre = gp
        dpost = go
        dres = gr
    else:
        sp = tl.sigmoid(lpre)
        dpre = gp * sp * (1.0 - sp)
        so = tl.sigmoid(lpost)
        dpost = go * 2.0 * so * (1.0 - so)
        dres = sinkhorn_bwd(lres, gr, valid, vrow, vcol, iters, SPREAD_)
    dpre = tl.where(m2, dpre, 0.0)
    dpost = tl.where(m2, dpost, 0.0)
    dres = tl.where(m3, dres, 0.0)
    a0 = tl.load(alpha_ptr)
    a1 = tl.load(alpha_ptr + 1)
    a2 = tl.load(alpha_ptr + 2)
    # per-block partials: bias grads in tile layout, then galpha
    col = tl.arange(0, W)
    gb = tl.sum(merge_tile(dres, dpre, dpost, BT, G, NP, W), axis=0)
    pbase = part_ptr + pid.to(tl.int64) * (W + 3)
    tl.store(pbase + col, gb)
    tl.store(pbase + W, tl.sum(tl.sum(dpre * upre, axis=1), axis=0))
    tl.store(pbase + W + 1, tl.sum(tl.sum(dpost * upost, axis=1), axis=0))
    tl.store(pbase + W + 2, tl.sum(tl.sum(tl.sum(dres * ures, axis=2), axis=1), axis=0))
    du = merge_tile(a2 * dres, a0 * dpre, a1 * dpost, BT, G, NP, W)
    if HC:
        dh = du * (1.0 - u * u)
    else:
        dh = du
    dp = dh / r[:, None]
    s = -tl.sum(dh * h, axis=1) / (K * r * r)
    tl.store(dp_ptr + t64[:, None] * W + col[None, :], dp, mask=tm[:, None])
    tl.store(s_ptr + t, s, mask=tm)


@triton.jit
def _coeffs_bwd_x_kernel(
    x_ptr, phi_ptr, dp_ptr, s_ptr, gx_ptr, gphi_part_ptr,
    gadd_ptr, ghin_ptr, hp_ptr, gmix_ptr, hmix_ptr,
    T, K, J, C, tblocks, splits,
    N: tl.constexpr, NP: tl.constexpr, W: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
    DOT_P: tl.constexpr, GADD: tl.constexpr, GPRE: tl.constexpr, GMIX: tl.constexpr, GX: tl.constexpr,
):
    """gx = dp . phi^T + s * x for one chunk of channels c of every stream (the flat columns
    k = i * C + c, i < N: a (BT, NP * BC) tile), and its gphi partial.

    Extra terms of the streams' other consumers, summed in fp32 and written once:
    GADD gadd[t, i, c] (a dX computed elsewhere); GPRE hp[t, i] * ghin[t, c] (the pre-mix's dX,
    ghin loaded once per chunk for all streams); GMIX sum_r hmix[t, r, i] * gmix[t, r, c] (the
    post_res mix's dX = H_res^T g, from its incoming gradient g, loaded once).
    GX False: gphi only (no gx, no extra terms; the boundary backward's dX' is another kernel's).
    """
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    kk = tl.arange(0, NP * BC)
    i = kk // BC
    c = pid_c * BC + kk % BC
    km = (i < N) & (c < C)
    k64 = i.to(tl.int64) * C + c
    cc = pid_c * BC + tl.arange(0, BC)  # the chunk's channels, once
    ccm = cc < C
    ii = tl.arange(0, NP)
    iim = ii < N
    jcol, jvalid = colmap(N, NP, W)
    col = tl.arange(0, W)
    phT = tl.load(phi_ptr + k64[None, :] * J + jcol[:, None], mask=jvalid[:, None] & km[None, :], other=0.0)
    gphi = tl.zeros((NP * BC, W), dtype=tl.float32)
    for tb in range(pid_s, tblocks, splits):
        t = tb * BT + tl.arange(0, BT)
        tm = t < T
        t64 = t.to(tl.int64)
        mx = tm[:, None] & km[None, :]
        xr = tl.load(x_ptr + t64[:, None] * K + k64[None, :], mask=mx, other=0.0)
        xt = xr.to(tl.float32)
        dp = tl.load(dp_ptr + t64[:, None] * W + col[None, :], mask=tm[:, None], other=0.0)
        if GX:
            s = tl.load(s_ptr + t, mask=tm, other=0.0)
            gx = tl.dot(dp, phT, input_precision=DOT_P) + s[:, None] * xt
            if GADD:
                gx += tl.load(gadd_ptr + t64[:, None] * K + k64[None, :], mask=mx, other=0.0).to(tl.float32)
            m2 = tm[:, None] & ccm[None, :]
            mi = tm[:, None] & iim[None, :]
            if GPRE:
                gh = tl.load(ghin_ptr + t64[:, None] * C + cc[None, :], mask=m2, other=0.0).to(tl.float32)
                hp = tl.load(hp_ptr + t64[:, None] * N + ii[None, :], mask=mi, other=0.0)
                gx += tl.reshape(hp[:, :, None] * gh[:, None, :], (BT, NP * BC))
            if GMIX:
                mixed = tl.zeros((BT, NP, BC), dtype=tl.float32)
                for r in tl.static_range(N):
                    g_r = tl.load(gmix_ptr + (t64[:, None] * N + r) * C + cc[None, :], mask=m2, other=0.0).to(tl.float32)
                    h_r = tl.load(hmix_ptr + t64[:, None] * (N * N) + r * N + ii[None, :], mask=mi, other=0.0)
                    mixed += h_r[:, :, None] * g_r[:, None, :]  # H_res[t, r, i] g[t, r, c]
                gx += tl.reshape(mixed, (BT, NP * BC))
            tl.store(gx_ptr + t64[:, None] * K + k64[None, :], gx.to(gx_ptr.dtype.element_ty), mask=mx)
        gphi += tl.dot(tl.trans(xt), dp, input_precision=DOT_P)
    base = gphi_part_ptr + pid_s.to(tl.int64) * K * J
    tl.store(base + k64[:, None] * J + jcol[None, :], gphi, mask=km[:, None] & jvalid[None, :])


# ============================================================================ launch configuration
def fwd_blocks(n: int, gpu: bool) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_K, num_warps) for the forward and both backward kernels. On the GPU
    (``gpu``) checked by AOT-compiling for sm_90 (no spills, shared memory well under the
    limit), untuned on hardware; small blocks in the interpreter."""
    if not gpu:
        return 16, 32, 1
    np_, _, _ = logit_layout(n)
    return (64, 64, 4) if np_ <= 4 else (32, 32, 8)


def launch_config(n: int, variant: str, gpu: bool) -> tuple[dict, dict, int]:
    """(constexprs of the forward and dh kernels, constexprs of the gx kernel but GADD/GPRE/GMIX,
    num_warps) for ``n`` streams; ``gpu``: compiled for CUDA rather than the interpreter.
    The wrappers below and ``kernels.aot`` launch and compile from this one place."""
    bt, bk, warps = fwd_blocks(n, gpu)
    consts = dict(logit_consts(n, variant, gpu), BT=bt, BK=bk)
    x_consts = {k: consts[k] for k in ("N", "NP", "W", "BT", "DOT_P")}
    # the gx kernel's chunk: BC channels of every stream, NP * BC columns (>= 16 for tl.dot)
    x_consts["BC"] = max(16 // consts["NP"], bk // consts["NP"], 8 if gpu else 1)
    if gpu and bt == 64:
        # the gx kernel holds dp, x, gx and the extra tiles at once: on sm_90 64-token tiles spill
        # (fp32, n = 3, 4), 32 at n_pad = 4 too (8-16 B, triton 3.9); 16 hold 128-166 registers
        x_consts["BT"] = 16 if consts["NP"] == 4 else 32
    elif gpu and consts["NP"] == 8:
        # n_pad = 8: 32-token tiles spilled 56-296 B on sm_90 (bf16, fp32, triton 3.6, 3.9); 16 none
        x_consts["BT"] = 16
    return consts, x_consts, warps


def dh_consts(consts: dict) -> dict:
    """The dh kernel's constexprs from :func:`launch_config`'s first dict: its channel chunk BC
    of every stream (NP * BC = BLOCK_K flat columns, >= 16 for ``tl.dot``) replaces BLOCK_K.
    At NP = 4 at most 32 columns (64 spilled 40-72 B at n = 3 in fp32 on sm_90, triton 3.9); at
    NP = 8 its own token tile of at most 16 (grid cdiv(T, BT)): with the forward's 32, triton 3.6
    spilled 24 B in bf16 at n = 6, 8; 16 hold 107-128 registers, 2 CTAs/SM (tests/test_kernel_aot.py)."""
    np_ = consts["NP"]
    out = {k: v for k, v in consts.items() if k != "BK"}
    bk = min(consts["BK"], 32) if np_ == 4 else consts["BK"]
    out["BC"] = max(bk // np_, 16 // np_)
    if np_ == 8:
        out["BT"] = min(consts["BT"], 16)
    return out


def launch_grid(T: int, K: int, consts: dict, sms: int, splits: Optional[int] = None) -> tuple[int, int, int]:
    """(token blocks, S, flat columns per split) of the forward at T tokens of K = nC columns
    with :func:`launch_config`'s ``consts`` on ``sms`` SMs (0 in the interpreter: no split unless
    ``splits`` asks). S > 1: split-K, ``_coeffs_part_kernel`` then ``split_k._finish_kernel``."""
    tblocks = triton.cdiv(T, consts["BT"])
    s, per = reduction_splits(tblocks, triton.cdiv(K, consts["BK"]), sms, splits)
    return tblocks, s, per * consts["BK"]


def gphi_splits(tblocks: int, kblocks: int, device: torch.device) -> int:
    """Token splits S of the gx kernel's grid (cdiv(C, BC), S): each writes one gphi partial."""
    if not on_gpu(device):
        return min(tblocks, 2)
    return max(1, min(tblocks, triton.cdiv(4 * num_sms(device), kblocks), 32))


def _check(x, phi, alpha, b_pre, b_post, b_res) -> tuple[int, int, int]:
    if x.dim() != 3:
        raise ValueError(f"x must be (T, n, C), got shape {tuple(x.shape)}")
    T, n, C = x.shape
    check_phi(n, C, phi, "coeffs")
    if alpha.numel() != 3 or b_pre.numel() != n or b_post.numel() != n or b_res.numel() != n * n:
        raise ValueError("alpha must have 3 entries, b_pre/b_post n, b_res n*n")
    check_not_float64(x, phi, alpha, b_pre, b_post, b_res)
    return T, n, C


# ============================================================================ public wrappers
def coeffs_forward(
    x: Tensor, phi: Tensor, alpha: Tensor, b_pre: Tensor, b_post: Tensor, b_res: Tensor,
    iters: int, eps: float, variant: str, out: Optional[tuple[Tensor, Tensor, Tensor]] = None,
    splits: Optional[int] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """H_pre (T, n), H_post (T, n), H_res (T, n, n) in fp32 from x (T, n, C).

    ``out``: optional preallocated contiguous fp32 outputs (tests poison them with NaN to
    prove every element is written). x in float32/float16/bfloat16, no float64 parameter.
    ``splits``: split-K programs per token block (None: :func:`launch_grid` picks, 1 in the
    interpreter; tests force it).
    """
    T, n, C = _check(x, phi, alpha, b_pre, b_post, b_res)
    gpu = on_gpu(x.device)
    consts, _, warps = launch_config(n, variant, gpu)
    x = x.contiguous()
    params = as_f32(phi, alpha, b_pre, b_post, b_res)
    if out is None:
        out = coeff_outputs(T, n, x.device)
    if T == 0:
        return out
    K, J = n * C, 2 * n + n * n
    tblocks, S, ksplit = launch_grid(T, K, consts, num_sms(x.device) if gpu else 0, splits)
    if S == 1:
        _coeffs_fwd_kernel[(tblocks,)](x, *params, *out, T, K, J, float(eps), int(iters), **consts, num_warps=warps)
        return out
    accp = torch.empty((S, T, consts["W"]), dtype=torch.float32, device=x.device)
    ssp = torch.empty((S, T), dtype=torch.float32, device=x.device)
    pconsts = {k: consts[k] for k in ("N", "NP", "W", "BT", "BK", "DOT_P")}
    _coeffs_part_kernel[(tblocks, S)](x, params[0], accp, ssp, T, K, J, ksplit, **pconsts, num_warps=warps)
    fconsts, fwarps = finish_config(n, variant, gpu, 16)
    _finish_kernel[(triton.cdiv(T, fconsts["BT"]), 1)](
        accp, ssp, ssp, *params[1:], *out, ssp, ssp, ssp, T, C, K, S, ksplit, float(eps), int(iters),
        **fconsts, GHP=False, HIN=False, num_warps=fwarps,
    )
    return out


def coeffs_backward(
    g_pre: Optional[Tensor], g_post: Tensor, g_res: Tensor,
    x: Tensor, phi: Tensor, alpha: Tensor, b_pre: Tensor, b_post: Tensor, b_res: Tensor,
    iters: int, eps: float, variant: str,
    gx: Optional[Tensor] = None, extra: Optional[tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]] = None,
    mix: Optional[tuple[Tensor, Tensor]] = None, pre_grad: Optional[Tensor] = None,
) -> tuple[Tensor, ...]:
    """(gx (T, n, C) in x's dtype, gphi, galpha, gb_pre, gb_post, gb_res) shaped like the params.

    Recomputes everything from the inputs (nothing saved from the forward). ``gx``: optional
    preallocated contiguous output. Same dtypes as :func:`coeffs_forward`. ``g_pre`` None: 0.

    ``pre_grad`` (T, C): the incoming gradient of a pre-mix ``sum_i H_pre[i] x[i]`` whose
    gradient of H_pre, ``sum_c pre_grad * x``, is not in ``g_pre``: the dh kernel adds it from its
    own pass over x (the pre backward then reads nothing; ops' site mailbox, the boundary).

    The streams' other consumers' gradients, added into gx in fp32 and rounded once:
    ``extra = (g_add (T, n, C) or None, g_hin (T, C) or None, h_pre (T, n) or None)`` adds
    ``g_add + h_pre[i] * g_hin`` (the boundary backward; ops' site mailbox); h_pre None: the
    H_pre the dh kernel recomputes from x;
    ``mix = (g (T, n, C), h_res (T, n, n))`` adds ``H_res^T g``, the post_res mix's dX from its
    incoming gradient (ops' site mailbox, with post_res's backward skipping its own dX).
    """
    T, n, C = _check(x, phi, alpha, b_pre, b_post, b_res)
    params = (phi, alpha, b_pre, b_post, b_res)
    x = x.contiguous()
    if gx is None:
        gx = torch.empty_like(x, memory_format=torch.contiguous_format)
    if T == 0:
        return (gx, *(torch.zeros_like(p) for p in params))
    g_add, g_hin, h_pre = extra if extra is not None else (None, None, None)
    dh = dh_pass(g_pre, g_post, g_res, x, params, iters, eps, variant, pre_grad, g_hin is not None and h_pre is None)
    g_mix, h_mix = mix if mix is not None else (None, None)
    gphi = x_pass(dh, x, gx, g_add, g_hin, dh.hp if h_pre is None else h_pre, g_mix, h_mix)
    return (gx, *small_grads(dh, gphi, params))


def x_pass(dh: "DhPass", x: Tensor, gx: Optional[Tensor], g_add: Optional[Tensor] = None,
           g_hin: Optional[Tensor] = None, h_pre: Optional[Tensor] = None, g_mix: Optional[Tensor] = None,
           h_mix: Optional[Tensor] = None) -> Tensor:
    """Launch the gx kernel after :func:`dh_pass` on the same contiguous x (T, n, C): writes gx
    (None: gphi only) with the extra terms of :func:`coeffs_backward`; returns the summed gphi."""
    T, n, C = x.shape
    K, J = n * C, 2 * n + n * n
    x_consts, dev, s = dh.x_consts, x.device, dh.s
    cblocks = triton.cdiv(C, x_consts["BC"])
    x_tblocks = triton.cdiv(T, x_consts["BT"])
    splits = gphi_splits(x_tblocks, cblocks, dev)
    gphi_part = torch.empty((splits, K, J), dtype=torch.float32, device=dev)
    g_add = s if g_add is None else g_add.reshape(T, n, C).contiguous()  # s: an unread dummy
    h_pre = s if g_hin is None else h_pre.reshape(T, n).to(torch.float32).contiguous()
    g_hin = s if g_hin is None else g_hin.reshape(T, C).contiguous()
    h_mix = s if g_mix is None else h_mix.reshape(T, n, n).to(torch.float32).contiguous()
    g_mix = s if g_mix is None else g_mix.reshape(T, n, C).contiguous()
    _coeffs_bwd_x_kernel[(cblocks, splits)](
        x, dh.p32[0], dh.dp, s, s if gx is None else gx, gphi_part, g_add, g_hin, h_pre, g_mix, h_mix,
        T, K, J, C, x_tblocks, splits, **x_consts, GADD=g_add is not s, GPRE=g_hin is not s, GMIX=g_mix is not s,
        GX=gx is not None, num_warps=dh.warps,
    )
    return gphi_part[0] if splits == 1 else gphi_part.sum(0)


class DhPass(NamedTuple):
    """What the dh kernel leaves for a gx pass: dp (T, W), s (T,), the per-block partials, the
    recomputed H_pre (T, n) or None, the fp32 parameters, the gx kernel's constexprs, warps."""
    dp: Tensor
    s: Tensor
    part: Tensor
    hp: Optional[Tensor]
    p32: tuple
    consts: dict
    x_consts: dict
    warps: int


def dh_pass(g_pre: Optional[Tensor], g_post: Tensor, g_res: Tensor, x: Tensor, params: tuple, iters: int,
            eps: float, variant: str, pre_grad: Optional[Tensor] = None, want_hp: bool = False) -> DhPass:
    """Launch the dh kernel on contiguous x (T, n, C), T > 0 (see :func:`coeffs_backward` for
    ``g_pre`` None and ``pre_grad``); ``want_hp``: also write the recomputed H_pre."""
    T, n, C = x.shape
    consts, x_consts, warps = launch_config(n, variant, on_gpu(x.device))
    kconsts = dh_consts(consts)
    p32 = as_f32(*params)
    go, gr = (g.reshape(T, *s).contiguous() for g, s in ((g_post, (n,)), (g_res, (n, n))))
    dev = x.device
    w, bt = kconsts["W"], kconsts["BT"]
    tblocks = triton.cdiv(T, bt)
    dp = torch.empty((T, w), dtype=torch.float32, device=dev)
    s = torch.empty((T,), dtype=torch.float32, device=dev)
    part = torch.empty((tblocks, w + 3), dtype=torch.float32, device=dev)
    hp = torch.empty((T, n), dtype=torch.float32, device=dev) if want_hp else None
    gp = s if g_pre is None else g_pre.reshape(T, n).contiguous()  # s: an unread dummy
    ghin = s if pre_grad is None else pre_grad.reshape(T, C).contiguous()
    _coeffs_bwd_dh_kernel[(tblocks,)](
        gp, go, gr, ghin, x, *p32, dp, s, part, s if hp is None else hp, T, C, 2 * n + n * n, float(eps), int(iters),
        **kconsts, GP=g_pre is not None, GHP=pre_grad is not None, WRITE_HP=want_hp, num_warps=warps,
    )
    return DhPass(dp, s, part, hp, p32, consts, x_consts, warps)


def small_grads(dh: DhPass, gphi: Tensor, params: tuple) -> tuple[Tensor, ...]:
    """(gphi, galpha, gb_pre, gb_post, gb_res) shaped and typed like ``params`` from the dh
    kernel's partials (summed here) and the summed gphi."""
    n, np_, g, w = dh.consts["N"], dh.consts["NP"], dh.consts["G"], dh.consts["W"]
    tot = dh.part.sum(0)
    gb4 = tot[:w].reshape(g, np_, np_)
    outs = (gphi, tot[w:], gb4[1, 0, :n], gb4[1, 1, :n], gb4[0, :n, :n])
    # clone: the small gradients are views of one buffer and custom-op outputs may not alias
    return tuple(o.reshape(p.shape).to(p.dtype).clone() for o, p in zip(outs, params))
