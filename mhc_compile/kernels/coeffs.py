"""Fused Triton kernels for ``mhc::coeffs``: RMS + projection + activations + Sinkhorn, fwd and bwd.

Owns the forward kernel, the two backward kernels, the ``@triton.jit`` building blocks they
share with ``kernels.boundary`` (logit layout, activations, Sinkhorn forward and its on-chip
reverse-mode replay) and the launch wrappers :func:`coeffs_forward` / :func:`coeffs_backward`
called by ``mhc_compile.ops``. The math is exactly ``reference.coeffs(..., dynamic=True)``.

Per token (x = vec(X), K = n*C, J = 2n + n^2):
    r = sqrt(mean(x^2) + eps);  p = x . phi (J);  h = p / r
    u = h ("mhc") or tanh(h) ("hc");  logits = alpha * u + b
    "mhc": H_pre = sigmoid, H_post = 2 sigmoid, H_res = Sinkhorn(exp(clamp(z - max, -50)), iters)
    "hc":  the logits themselves.

Logit layout in registers. The J logits of a token block live in one (BLOCK_T, W) fp32 tile,
W = G * NP * NP with NP = max(2, next_pow2(n)) and W >= 16 (a legal ``tl.dot`` width): group 0
holds the res logits at [i * NP + j], group 1 holds pre in row 0 and post in row 1. The phi
columns are gathered into that order while loading, so one reshape to (BLOCK_T, G, NP, NP)
and masked sums split the tile into res (BLOCK_T, NP, NP), pre and post (BLOCK_T, NP)
without any shared-memory round trip. Padded rows/columns are masked to zero.

Kernels and grids (T tokens, BT = BLOCK_T):
    forward   grid (cdiv(T, BT),): one pass over x in BLOCK_K chunks of the flat nC axis,
              fp32 ``tl.dot`` (BT, BK) x (BK, W) plus the sum of squares, then the
              epilogue in registers; writes H_pre, H_post, H_res.
    backward  kernel 1, grid (cdiv(T, BT),): the same pass over x (recompute r and p), then
              the activations' backward and Sinkhorn's backward replayed on chip: for each
              iteration k from last to first, the iterate M_k is recomputed from M_0 by k
              forward iterations (O(iters^2) tiny n x n steps per token, no storage), then
              reverse-mode through column- and row-normalisation. Writes dp = dh / r (T, W)
              fp32, the per-token RMS term s = -<dh, h> / (K r^2), and per-block partial sums
              of galpha and the bias gradients (summed over blocks in torch).
              kernel 2, grid (cdiv(K, BK), S): gx = dp . phi^T + s * x over x chunks, and
              gphi partials x^T dp over S token splits (summed in torch; deterministic, no
              atomics).
Bytes per token (x element size e): forward reads n*C*e, writes (2n + n^2)*4. Backward reads
x twice (2 n*C*e), writes gx (n*C*e), plus ~(2W + 1)*4 of dp scratch. phi is re-read per
block from L2.

float64 inputs are not run by these kernels: the wrappers fall back to the reference (with
``reference.coeffs_backward``), so gradcheck still works through ``kernels="triton"``.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import interpreting, next_power_of_2, num_sms

SPREAD = 50.0  # == reference.SINKHORN_LOGIT_SPREAD


# ============================================================================ layout helpers
def logit_layout(n: int) -> tuple[int, int, int]:
    """(NP, G, W): padded stream count, groups and width of the in-register logit tile."""
    np_ = max(2, next_power_of_2(n))
    w = max(16, 2 * np_ * np_)
    return np_, w // (np_ * np_), w


@triton.jit
def _colmap(N: tl.constexpr, NP: tl.constexpr, W: tl.constexpr):
    """phi column feeding each of the W tile columns, and whether it is a real logit."""
    col = tl.arange(0, W)
    g = col // (NP * NP)
    rem = col % (NP * NP)
    a = rem // NP
    b = rem % NP
    is_res = (g == 0) & (a < N) & (b < N)
    is_pre = (g == 1) & (a == 0) & (b < N)
    is_post = (g == 1) & (a == 1) & (b < N)
    j = tl.where(is_res, 2 * N + a * N + b, tl.where(is_pre, b, N + b))
    valid = is_res | is_pre | is_post
    return tl.where(valid, j, 0), valid


@triton.jit
def _split(acc, BT: tl.constexpr, G: tl.constexpr, NP: tl.constexpr):
    """(BT, W) logit tile -> res (BT, NP, NP), pre (BT, NP), post (BT, NP)."""
    a4 = tl.reshape(acc, (BT, G, NP, NP))
    g = tl.arange(0, G)[None, :, None, None]
    res = tl.sum(tl.where(g == 0, a4, 0.0), axis=1)
    oth = tl.sum(tl.where(g == 1, a4, 0.0), axis=1)
    a = tl.arange(0, NP)[None, :, None]
    pre = tl.sum(tl.where(a == 0, oth, 0.0), axis=1)
    post = tl.sum(tl.where(a == 1, oth, 0.0), axis=1)
    return res, pre, post


@triton.jit
def _merge(res, pre, post, BT: tl.constexpr, G: tl.constexpr, NP: tl.constexpr, W: tl.constexpr):
    """Inverse of :func:`_split`."""
    a = tl.arange(0, NP)[None, :, None]
    oth = tl.where(a == 0, pre[:, None, :], tl.where(a == 1, post[:, None, :], 0.0))
    g = tl.arange(0, G)[None, :, None, None]
    a4 = tl.where(g == 0, res[:, None, :, :], tl.where(g == 1, oth[:, None, :, :], 0.0))
    return tl.reshape(a4, (BT, W))


@triton.jit
def _tanh(x):
    """tanh in fp32: odd series near 0 (no cancellation), exp form elsewhere (saturates, no inf)."""
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    big = (1.0 - e) / (1.0 + e)
    x2 = x * x
    small = ax * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0))))
    t = tl.where(ax < 0.2, small, big)
    return tl.where(x < 0, -t, t)


@triton.jit
def _sk_init(z, valid, SPREAD_: tl.constexpr):
    """M_0 = exp(clamp(z - max, -SPREAD)) on valid entries, 0 elsewhere; also the pieces for bwd."""
    zm = tl.where(valid, z, float("-inf"))
    mx = tl.max(tl.max(zm, axis=2), axis=1)
    sh = zm - mx[:, None, None]
    keep = (sh >= -SPREAD_) & valid
    m0 = tl.where(valid, tl.exp(tl.maximum(sh, -SPREAD_)), 0.0)
    is_max = (zm == mx[:, None, None]) & valid
    return m0, keep, is_max


@triton.jit
def _sk_step(m, vrow, vcol):
    """One Sinkhorn iteration: normalise columns (sum over rows i), then rows (sum over cols j)."""
    cs = tl.sum(m, axis=1)
    a = m / tl.where(vcol, cs, 1.0)[:, None, :]
    rs = tl.sum(a, axis=2)
    return a / tl.where(vrow, rs, 1.0)[:, :, None]


@triton.jit
def _sinkhorn(z, valid, vrow, vcol, iters, SPREAD_: tl.constexpr):
    m, keep, is_max = _sk_init(z, valid, SPREAD_)
    for _ in range(iters):
        m = _sk_step(m, vrow, vcol)
    return m


@triton.jit
def _sinkhorn_bwd(z, gout, valid, vrow, vcol, iters, SPREAD_: tl.constexpr):
    """d(loss)/dz given d(loss)/dSinkhorn(z); replays the iterates on chip (no storage)."""
    m0, keep, is_max = _sk_init(z, valid, SPREAD_)
    gm = tl.where(valid, gout, 0.0)
    for kk in range(iters):
        k = iters - 1 - kk
        m = m0
        for _ in range(k):
            m = _sk_step(m, vrow, vcol)
        cs = tl.where(vcol, tl.sum(m, axis=1), 1.0)
        a = m / cs[:, None, :]
        rs = tl.where(vrow, tl.sum(a, axis=2), 1.0)
        b = a / rs[:, :, None]
        ga = tl.where(valid, (gm - tl.sum(gm * b, axis=2)[:, :, None]) / rs[:, :, None], 0.0)
        gm = tl.where(valid, (ga - tl.sum(ga * a, axis=1)[:, None, :]) / cs[:, None, :], 0.0)
    dz = tl.where(keep, gm * m0, 0.0)
    # the max subtraction: its argmax entries (shared evenly among ties, as torch.amax does)
    tot = tl.sum(tl.sum(dz, axis=2), axis=1)
    cnt = tl.sum(tl.sum(is_max.to(tl.float32), axis=2), axis=1)
    return dz - tl.where(is_max, (tot / cnt)[:, None, None], 0.0)


@triton.jit
def _masks(N: tl.constexpr, NP: tl.constexpr):
    i = tl.arange(0, NP)
    vec = i < N
    vrow = vec[None, :]
    vcol = vec[None, :]
    valid = vec[None, :, None] & vec[None, None, :]
    return vec, vrow, vcol, valid


@triton.jit
def _logits(acc, sumsq, alpha_ptr, bpre_ptr, bpost_ptr, bres_ptr, K, eps,
            N: tl.constexpr, NP: tl.constexpr, G: tl.constexpr, BT: tl.constexpr, HC: tl.constexpr):
    """From the projection tile and sum of squares: r, h, u (as tiles) and the three logits."""
    r = tl.sqrt(sumsq / K + eps)
    h = acc / r[:, None]
    if HC:
        u = _tanh(h)
    else:
        u = h
    ures, upre, upost = _split(u, BT, G, NP)
    vec, vrow, vcol, valid = _masks(N, NP)
    i = tl.arange(0, NP)
    a0 = tl.load(alpha_ptr)
    a1 = tl.load(alpha_ptr + 1)
    a2 = tl.load(alpha_ptr + 2)
    bp = tl.load(bpre_ptr + i, mask=vec, other=0.0)
    bo = tl.load(bpost_ptr + i, mask=vec, other=0.0)
    br = tl.load(bres_ptr + i[:, None] * N + i[None, :], mask=vec[:, None] & vec[None, :], other=0.0)
    lpre = tl.where(vrow, a0 * upre + bp[None, :], 0.0)
    lpost = tl.where(vrow, a1 * upost + bo[None, :], 0.0)
    lres = tl.where(valid, a2 * ures + br[None, :, :], 0.0)
    return r, h, u, ures, upre, upost, lpre, lpost, lres


@triton.jit
def _activate(lpre, lpost, lres, iters, N: tl.constexpr, NP: tl.constexpr, HC: tl.constexpr,
              SPREAD_: tl.constexpr):
    if HC:
        return lpre, lpost, lres
    vec, vrow, vcol, valid = _masks(N, NP)
    hp = tl.where(vrow, tl.sigmoid(lpre), 0.0)
    ho = tl.where(vrow, 2.0 * tl.sigmoid(lpost), 0.0)
    hr = _sinkhorn(lres, valid, vrow, vcol, iters, SPREAD_)
    return hp, ho, hr


@triton.jit
def _store_coeffs(hp_ptr, ho_ptr, hr_ptr, t, tm, hp, ho, hr, N: tl.constexpr, NP: tl.constexpr):
    i = tl.arange(0, NP)
    vec = i < N
    t64 = t.to(tl.int64)
    m2 = tm[:, None] & vec[None, :]
    tl.store(hp_ptr + t64[:, None] * N + i[None, :], hp, mask=m2)
    tl.store(ho_ptr + t64[:, None] * N + i[None, :], ho, mask=m2)
    offs = t64[:, None, None] * (N * N) + i[None, :, None] * N + i[None, None, :]
    m3 = tm[:, None, None] & vec[None, :, None] & vec[None, None, :]
    tl.store(hr_ptr + offs, hr, mask=m3)


@triton.jit
def _project(x_ptr, phi_ptr, t, tm, K, J,
             N: tl.constexpr, NP: tl.constexpr, W: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
             DOT_P: tl.constexpr):
    """One pass over the flat (BT, K) rows of x: fp32 projection tile (BT, W) and sum of squares."""
    jcol, jvalid = _colmap(N, NP, W)
    acc = tl.zeros((BT, W), dtype=tl.float32)
    sumsq = tl.zeros((BT,), dtype=tl.float32)
    t64 = t.to(tl.int64)
    for k0 in range(0, K, BK):
        k = k0 + tl.arange(0, BK)
        km = k < K
        xt = tl.load(x_ptr + t64[:, None] * K + k[None, :], mask=tm[:, None] & km[None, :], other=0.0)
        xt = xt.to(tl.float32)
        ph = tl.load(phi_ptr + k.to(tl.int64)[:, None] * J + jcol[None, :],
                     mask=km[:, None] & jvalid[None, :], other=0.0)
        sumsq += tl.sum(xt * xt, axis=1)
        acc += tl.dot(xt, ph, input_precision=DOT_P)
    return acc, sumsq


# ============================================================================ kernels
@triton.jit
def _coeffs_fwd_kernel(
    x_ptr, phi_ptr, alpha_ptr, bpre_ptr, bpost_ptr, bres_ptr,
    hp_ptr, ho_ptr, hr_ptr,
    T, K, J, eps, iters,
    N: tl.constexpr, NP: tl.constexpr, G: tl.constexpr, W: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, HC: tl.constexpr, SPREAD_: tl.constexpr,
    DOT_P: tl.constexpr,
):
    pid = tl.program_id(0)
    t = pid * BT + tl.arange(0, BT)
    tm = t < T
    acc, sumsq = _project(x_ptr, phi_ptr, t, tm, K, J, N, NP, W, BT, BK, DOT_P)
    r, h, u, ures, upre, upost, lpre, lpost, lres = _logits(
        acc, sumsq, alpha_ptr, bpre_ptr, bpost_ptr, bres_ptr, K, eps, N, NP, G, BT, HC)
    hp, ho, hr = _activate(lpre, lpost, lres, iters, N, NP, HC, SPREAD_)
    _store_coeffs(hp_ptr, ho_ptr, hr_ptr, t, tm, hp, ho, hr, N, NP)


@triton.jit
def _coeffs_bwd_dh_kernel(
    gp_ptr, go_ptr, gr_ptr,
    x_ptr, phi_ptr, alpha_ptr, bpre_ptr, bpost_ptr, bres_ptr,
    dp_ptr, s_ptr, part_ptr,
    T, K, J, eps, iters,
    N: tl.constexpr, NP: tl.constexpr, G: tl.constexpr, W: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, HC: tl.constexpr, SPREAD_: tl.constexpr,
    DOT_P: tl.constexpr,
):
    """Recompute the logits, backprop the activations (Sinkhorn replayed on chip) to dh.

    Writes dp = dh / r (T, W), s = -<dh, h> / (K r^2) (T,), and this block's partial sums
    (W + 3 floats: bias gradients in the tile layout, then galpha) to part[pid].
    """
    pid = tl.program_id(0)
    t = pid * BT + tl.arange(0, BT)
    tm = t < T
    t64 = t.to(tl.int64)
    acc, sumsq = _project(x_ptr, phi_ptr, t, tm, K, J, N, NP, W, BT, BK, DOT_P)
    r, h, u, ures, upre, upost, lpre, lpost, lres = _logits(
        acc, sumsq, alpha_ptr, bpre_ptr, bpost_ptr, bres_ptr, K, eps, N, NP, G, BT, HC)
    vec, vrow, vcol, valid = _masks(N, NP)
    i = tl.arange(0, NP)
    m2 = tm[:, None] & vec[None, :]
    gp = tl.load(gp_ptr + t64[:, None] * N + i[None, :], mask=m2, other=0.0).to(tl.float32)
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
        dres = _sinkhorn_bwd(lres, gr, valid, vrow, vcol, iters, SPREAD_)
    dpre = tl.where(m2, dpre, 0.0)
    dpost = tl.where(m2, dpost, 0.0)
    dres = tl.where(m3, dres, 0.0)
    a0 = tl.load(alpha_ptr)
    a1 = tl.load(alpha_ptr + 1)
    a2 = tl.load(alpha_ptr + 2)
    # per-block partials: bias grads in tile layout, then galpha
    col = tl.arange(0, W)
    gb = tl.sum(_merge(dres, dpre, dpost, BT, G, NP, W), axis=0)
    pbase = part_ptr + pid.to(tl.int64) * (W + 3)
    tl.store(pbase + col, gb)
    tl.store(pbase + W, tl.sum(tl.sum(dpre * upre, axis=1), axis=0))
    tl.store(pbase + W + 1, tl.sum(tl.sum(dpost * upost, axis=1), axis=0))
    tl.store(pbase + W + 2, tl.sum(tl.sum(tl.sum(dres * ures, axis=2), axis=1), axis=0))
    du = _merge(a2 * dres, a0 * dpre, a1 * dpost, BT, G, NP, W)
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
    gadd_ptr, ghin_ptr, hp_ptr,
    T, K, J, C, tblocks, splits,
    N: tl.constexpr, NP: tl.constexpr, W: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
    DOT_P: tl.constexpr, EXTRA: tl.constexpr,
):
    """gx = dp . phi^T + s * x for one BK chunk of the flat axis, and its gphi partial.

    EXTRA (the boundary's backward): also add gadd[t, k] + hp[t, k // C] * ghin[t, k % C], the
    incoming gradient of X' and the pre-mix's gradient, so dX' is summed in fp32 and written once.
    """
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    k = pid_k * BK + tl.arange(0, BK)
    km = k < K
    k64 = k.to(tl.int64)
    jcol, jvalid = _colmap(N, NP, W)
    col = tl.arange(0, W)
    phT = tl.load(phi_ptr + k64[None, :] * J + jcol[:, None], mask=jvalid[:, None] & km[None, :], other=0.0)
    gphi = tl.zeros((BK, W), dtype=tl.float32)
    for tb in range(pid_s, tblocks, splits):
        t = tb * BT + tl.arange(0, BT)
        tm = t < T
        t64 = t.to(tl.int64)
        mx = tm[:, None] & km[None, :]
        xr = tl.load(x_ptr + t64[:, None] * K + k64[None, :], mask=mx, other=0.0)
        xt = xr.to(tl.float32)
        dp = tl.load(dp_ptr + t64[:, None] * W + col[None, :], mask=tm[:, None], other=0.0)
        s = tl.load(s_ptr + t, mask=tm, other=0.0)
        gx = tl.dot(dp, phT, input_precision=DOT_P) + s[:, None] * xt
        if EXTRA:
            ga = tl.load(gadd_ptr + t64[:, None] * K + k64[None, :], mask=mx, other=0.0).to(tl.float32)
            gh = tl.load(ghin_ptr + t64[:, None] * C + (k % C)[None, :], mask=mx, other=0.0).to(tl.float32)
            hp = tl.load(hp_ptr + t64[:, None] * N + (k // C)[None, :], mask=mx, other=0.0)
            gx += ga + hp * gh
        tl.store(gx_ptr + t64[:, None] * K + k64[None, :], gx.to(gx_ptr.dtype.element_ty), mask=mx)
        gphi += tl.dot(tl.trans(xt), dp, input_precision=DOT_P)
    base = gphi_part_ptr + pid_s.to(tl.int64) * K * J
    tl.store(base + k64[:, None] * J + jcol[None, :], gphi, mask=km[:, None] & jvalid[None, :])


# ============================================================================ launch helpers
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _variant_flag(variant: str) -> bool:
    if variant not in ("mhc", "hc"):
        raise ValueError(f"unknown variant {variant!r}; expected 'mhc' or 'hc'")
    return variant == "hc"


def _check(x, phi, alpha, b_pre, b_post, b_res):
    if x.dim() != 3:
        raise ValueError(f"x must be (T, n, C), got shape {tuple(x.shape)}")
    T, n, C = x.shape
    J = 2 * n + n * n
    if tuple(phi.shape) != (n * C, J):
        raise ValueError(f"phi must be ({n * C}, {J}) for x of shape {tuple(x.shape)}, got {tuple(phi.shape)}")
    if alpha.numel() != 3 or b_pre.numel() != n or b_post.numel() != n or b_res.numel() != n * n:
        raise ValueError("alpha must have 3 entries, b_pre/b_post n, b_res n*n")
    if not 1 <= n <= 8:
        raise ValueError(f"the Triton coeffs kernels support 1 <= n <= 8 streams, got {n}")


def _use_kernel(x, *params) -> bool:
    return x.dtype in _KERNEL_DTYPES and all(p.dtype != torch.float64 for p in params)


def _f32(*ts):
    return tuple(t.detach().to(torch.float32).contiguous() for t in ts)


def dot_precision(device: torch.device) -> str:
    """``tl.dot`` input precision. "ieee" (exact fp32 FMA) in the interpreter; "tf32x3" on CUDA:
    fp32-level accuracy on tensor cores (AOT-compiled for sm_90, the ieee FMA path spills
    registers heavily in the backward). Override with MHC_DOT_PRECISION=ieee|tf32x3|tf32."""
    env = os.environ.get("MHC_DOT_PRECISION")
    if env:
        return env
    return "ieee" if interpreting() or device.type != "cuda" else "tf32x3"


def fwd_blocks_cuda(n: int) -> tuple[int, int, int]:
    """GPU (BLOCK_T, BLOCK_K, num_warps), checked by AOT-compiling for sm_90 (no spills, shared
    memory well under the limit); untuned on hardware."""
    np_, _, _ = logit_layout(n)
    return (64, 64, 4) if np_ <= 4 else (32, 32, 8)


def fwd_blocks(n: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_K, num_warps) for the forward and both backward kernels."""
    if interpreting() or device.type != "cuda":
        return 16, 32, 1
    return fwd_blocks_cuda(n)


def _reference(x, phi, alpha, b_pre, b_post, b_res, iters, eps, variant):
    from .. import reference

    return reference.coeffs(x, phi, alpha, b_pre, b_post, b_res, iters=iters, eps=eps, variant=variant, dynamic=True)


# ============================================================================ public wrappers
def coeffs_forward(
    x: torch.Tensor,
    phi: torch.Tensor,
    alpha: torch.Tensor,
    b_pre: torch.Tensor,
    b_post: torch.Tensor,
    b_res: torch.Tensor,
    iters: int,
    eps: float,
    variant: str,
    out: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """H_pre (T, n), H_post (T, n), H_res (T, n, n) in fp32 from x (T, n, C).

    ``out``: optional preallocated contiguous fp32 outputs (tests poison them with NaN to
    prove every element is written). float64 inputs go to the reference.
    """
    _check(x, phi, alpha, b_pre, b_post, b_res)
    hc = _variant_flag(variant)
    if not _use_kernel(x, phi, alpha, b_pre, b_post, b_res):
        return tuple(o.contiguous() for o in _reference(x, phi, alpha, b_pre, b_post, b_res, iters, eps, variant))
    T, n, C = x.shape
    x = x.contiguous()
    phi, alpha, b_pre, b_post, b_res = _f32(phi, alpha, b_pre, b_post, b_res)
    dev = x.device
    if out is None:
        out = (
            torch.empty((T, n), dtype=torch.float32, device=dev),
            torch.empty((T, n), dtype=torch.float32, device=dev),
            torch.empty((T, n, n), dtype=torch.float32, device=dev),
        )
    if T == 0:
        return out
    np_, g, w = logit_layout(n)
    bt, bk, warps = fwd_blocks(n, dev)
    _coeffs_fwd_kernel[(triton.cdiv(T, bt),)](
        x, phi, alpha, b_pre, b_post, b_res, *out,
        T, n * C, 2 * n + n * n, float(eps), int(iters),
        N=n, NP=np_, G=g, W=w, BT=bt, BK=bk, HC=hc, SPREAD_=SPREAD, DOT_P=dot_precision(dev), num_warps=warps,
    )
    return out


def coeffs_backward(
    g_pre: torch.Tensor,
    g_post: torch.Tensor,
    g_res: torch.Tensor,
    x: torch.Tensor,
    phi: torch.Tensor,
    alpha: torch.Tensor,
    b_pre: torch.Tensor,
    b_post: torch.Tensor,
    b_res: torch.Tensor,
    iters: int,
    eps: float,
    variant: str,
    gx: Optional[torch.Tensor] = None,
    extra: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
) -> tuple[torch.Tensor, ...]:
    """(gx (T, n, C) in x's dtype, gphi, galpha, gb_pre, gb_post, gb_res) shaped like the params.

    Recomputes everything from the inputs (nothing saved from the forward). ``gx``: optional
    preallocated contiguous output. float64 inputs go to ``reference.coeffs_backward``.

    ``extra = (g_add (T, n, C), g_hin (T, C), h_pre (T, n))`` (used by the boundary backward):
    gx then also includes ``g_add + h_pre[i] * g_hin``, summed in fp32 and rounded once.
    """
    _check(x, phi, alpha, b_pre, b_post, b_res)
    hc = _variant_flag(variant)
    T, n, C = x.shape
    params = (phi, alpha, b_pre, b_post, b_res)
    if not _use_kernel(x, *params):
        from .. import reference

        grads = reference.coeffs_backward(
            g_pre.reshape(T, n), g_post.reshape(T, n), g_res.reshape(T, n, n), x, *params,
            iters=iters, eps=eps, variant=variant,
        )
        if extra is not None:
            g_add, g_hin, h_pre = extra
            cd = grads[0].dtype if grads[0].dtype == torch.float64 else torch.float32
            gx0 = grads[0].to(cd) + g_add.to(cd) + h_pre.to(cd).reshape(T, n, 1) * g_hin.to(cd).reshape(T, 1, C)
            grads = (gx0.to(x.dtype), *grads[1:])
        return tuple(g.contiguous() for g in grads)
    x = x.contiguous()
    p32 = _f32(*params)
    gp, go, gr = (g.reshape(T, *s).contiguous() for g, s in ((g_pre, (n,)), (g_post, (n,)), (g_res, (n, n))))
    dev = x.device
    if gx is None:
        gx = torch.empty_like(x, memory_format=torch.contiguous_format)
    K, J = n * C, 2 * n + n * n
    if T == 0:
        return (gx, *(torch.zeros_like(p) for p in params))
    np_, g, w = logit_layout(n)
    bt, bk, warps = fwd_blocks(n, dev)
    tblocks = triton.cdiv(T, bt)
    dp = torch.empty((T, w), dtype=torch.float32, device=dev)
    s = torch.empty((T,), dtype=torch.float32, device=dev)
    part = torch.empty((tblocks, w + 3), dtype=torch.float32, device=dev)
    _coeffs_bwd_dh_kernel[(tblocks,)](
        gp, go, gr, x, *p32, dp, s, part,
        T, K, J, float(eps), int(iters),
        N=n, NP=np_, G=g, W=w, BT=bt, BK=bk, HC=hc, SPREAD_=SPREAD, DOT_P=dot_precision(dev), num_warps=warps,
    )
    kblocks = triton.cdiv(K, bk)
    if interpreting() or dev.type != "cuda":
        splits = min(tblocks, 2)
    else:
        splits = max(1, min(tblocks, triton.cdiv(4 * num_sms(dev), kblocks), 32))
    gphi_part = torch.empty((splits, K, J), dtype=torch.float32, device=dev)
    if extra is not None:
        g_add, g_hin, h_pre = extra
        g_add = g_add.reshape(T, n, C).contiguous()
        g_hin = g_hin.reshape(T, C).contiguous()
        h_pre = h_pre.reshape(T, n).to(torch.float32).contiguous()
    else:
        g_add = g_hin = h_pre = s  # unused dummies
    _coeffs_bwd_x_kernel[(kblocks, splits)](
        x, p32[0], dp, s, gx, gphi_part, g_add, g_hin, h_pre, T, K, J, C, tblocks, splits,
        N=n, NP=np_, W=w, BT=bt, BK=bk, DOT_P=dot_precision(dev), EXTRA=extra is not None, num_warps=warps,
    )
    gphi = gphi_part[0] if splits == 1 else gphi_part.sum(0)
    tot = part.sum(0)
    gb4 = tot[:w].reshape(g, np_, np_)
    gb_res = gb4[0, :n, :n]
    gb_pre = gb4[1, 0, :n]
    gb_post = gb4[1, 1, :n]
    galpha = tot[w:]
    outs = (gphi, galpha, gb_pre, gb_post, gb_res)
    # clone: the small gradients are views of one buffer and custom-op outputs may not alias
    return (gx, *(o.reshape(p.shape).to(p.dtype).clone() for o, p in zip(outs, params)))


# ============================================================================ AOT check
def aot_compile_kernel(fn, ptr_types: dict, scalars: dict, consts: dict, num_warps: int, num_stages: int = 3, arch: int = 90):
    """Compile a ``@triton.jit`` kernel for CUDA ``sm_<arch>`` without a GPU (Triton's bundled
    ptxas); returns the compiled kernel (``.metadata.shared``, ``.asm["cubin"]``).

    ``ptr_types``: Triton pointer type per pointer argument (default ``*fp32``); ``scalars``:
    type per scalar argument (default ``i32``). Needs TRITON_INTERPRET unset (a jitted, not an
    interpreted, function). Used by the tests to prove the GPU launch configurations compile.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {}
    for p in fn.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name.endswith("_ptr"):
            sig[p.name] = ptr_types.get(p.name, "*fp32")
        else:
            sig[p.name] = scalars.get(p.name, "i32")
    src = ASTSource(fn=fn, signature=sig, constexprs=consts)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "num_stages": num_stages})


def aot_compile(n: int, dtype: str = "bf16", variant: str = "mhc", arch: int = 90) -> dict:
    """AOT-compile the three coeffs kernels with the CUDA launch configuration for ``n`` streams.

    Returns {kernel name: shared memory bytes}.
    """
    np_, g, w = logit_layout(n)
    bt, bk, warps = fwd_blocks_cuda(n)
    dp = dot_precision(torch.device("cuda"))
    hc = _variant_flag(variant)
    xt = "*" + dtype
    c1 = dict(N=n, NP=np_, G=g, W=w, BT=bt, BK=bk, HC=hc, SPREAD_=SPREAD, DOT_P=dp)
    c2 = dict(N=n, NP=np_, W=w, BT=bt, BK=bk, DOT_P=dp, EXTRA=True)
    out = {}
    for fn, consts, ptrs in (
        (_coeffs_fwd_kernel, c1, {"x_ptr": xt}),
        (_coeffs_bwd_dh_kernel, c1, {"x_ptr": xt}),
        (_coeffs_bwd_x_kernel, c2, {"x_ptr": xt, "gx_ptr": xt, "gadd_ptr": xt, "ghin_ptr": xt}),
    ):
        k = aot_compile_kernel(fn, ptrs, {"eps": "fp32"}, consts, warps, 3, arch)
        out[fn.__name__] = k.metadata.shared
    return out
