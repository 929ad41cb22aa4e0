"""Triton building blocks shared by the two coefficient kernels, ``kernels.coeffs`` and
``kernels.boundary``: the in-register logit tile, the activations, Sinkhorn forward and its
on-chip reverse-mode replay, the coeffs backward's projection over every stream's channel
chunks (:func:`project_streams`), and the launch helpers both wrappers use (variant flag,
parameter checks, fp32 parameter copies, ``tl.dot`` precision, output buffers, the constexprs every
coefficient kernel takes). Nothing here launches a kernel; the math is exactly
``reference.coeffs(..., dynamic=True)``.

Logit layout in registers. The J = 2n + n^2 logits of a token block live in one (BLOCK_T, W)
fp32 tile, W = G * NP * NP with NP = max(2, next_pow2(n)) and W >= 16 (a legal ``tl.dot``
width): group 0 holds the res logits at [i * NP + j], group 1 holds pre in row 0 and post in
row 1. The phi columns are gathered into that order while loading (:func:`colmap`), so one
reshape to (BLOCK_T, G, NP, NP) and masked sums split the tile into res (BLOCK_T, NP, NP), pre
and post (BLOCK_T, NP) without any shared-memory round trip (:func:`split_tile`). Padded
rows/columns are masked to zero.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._common import next_power_of_2

SPREAD = 50.0  # == reference.SINKHORN_LOGIT_SPREAD


# ============================================================================ layout
def logit_layout(n: int) -> tuple[int, int, int]:
    """(NP, G, W): padded stream count, groups and width of the in-register logit tile."""
    np_ = max(2, next_power_of_2(n))
    w = max(16, 2 * np_ * np_)
    return np_, w // (np_ * np_), w


@triton.jit
def dot_acc(a, b, acc, A16: tl.constexpr, DOT_P: tl.constexpr):
    """acc + a @ b, fp32 operands and accumulator, at precision DOT_P. ``A16``: a holds values of
    a 16-bit float (x or X' upcast), exact in tf32, so tf32x3's a_lo * b_hi product is zero: with
    DOT_P = "tf32x3" this takes two tf32 MMAs instead, a * hi(b) + a * (b - hi(b)), hi(b) = b
    rounded to tf32 (10 mantissa bits; the MMA drops the lower bits of b - hi(b), an error below
    2^-22 |b|, as tf32x3's). One wgmma of three saved per chunk, and the registers of a's split."""
    if A16:
        if DOT_P == "tf32x3":
            hi = ((b.to(tl.int32, bitcast=True) + 0x1000) & -8192).to(tl.float32, bitcast=True)
            acc = tl.dot(a, hi, acc, input_precision="tf32")
            return tl.dot(a, b - hi, acc, input_precision="tf32")
    return tl.dot(a, b, acc, input_precision=DOT_P)


@triton.jit
def project_streams(x_ptr, phi_ptr, ghin_ptr, t, tm, C, J,
                    N: tl.constexpr, NP: tl.constexpr, W: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                    DOT_P: tl.constexpr, GHP: tl.constexpr):
    """The coeffs dh kernel's projection and sum of squares (as ``coeffs._project``) over
    channel chunks of every stream at once ((BT, NP, BC) tiles of x), and with GHP the pre-mix's
    gradient of H_pre, ghp[t, i] = sum_c ghin[t, c] x[t, i, c], from the same chunks (ghin read
    once per channel, not once per stream)."""
    jcol, jvalid = colmap(N, NP, W)
    i = tl.arange(0, NP)
    vec = i < N
    t64 = t.to(tl.int64)
    acc = tl.zeros((BT, W), dtype=tl.float32)
    sumsq = tl.zeros((BT,), dtype=tl.float32)
    ghp = tl.zeros((BT, NP), dtype=tl.float32)
    for c0 in range(0, C, BC):
        c = c0 + tl.arange(0, BC)
        cm = c < C
        m3 = tm[:, None, None] & vec[None, :, None] & cm[None, None, :]
        xf = tl.load(x_ptr + (t64[:, None, None] * N + i[None, :, None]) * C + c[None, None, :],
                     mask=m3, other=0.0).to(tl.float32)
        sumsq += tl.sum(tl.sum(xf * xf, axis=2), axis=1)
        if GHP:
            gh = tl.load(ghin_ptr + t64[:, None] * C + c[None, :], mask=tm[:, None] & cm[None, :], other=0.0)
            ghp += tl.sum(xf * gh.to(tl.float32)[:, None, :], axis=2)
        krow = (i[:, None] * C + c[None, :]).to(tl.int64)  # flat index of (stream, channel)
        ph = tl.load(phi_ptr + krow[:, :, None] * J + jcol[None, None, :],
                     mask=(vec[:, None] & cm[None, :])[:, :, None] & jvalid[None, None, :], other=0.0)
        acc = dot_acc(tl.reshape(xf, (BT, NP * BC)), tl.reshape(ph, (NP * BC, W)), acc,
                      x_ptr.dtype.element_ty.primitive_bitwidth == 16, DOT_P)
    return acc, sumsq, ghp


@triton.jit
def colmap(N: tl.constexpr, NP: tl.constexpr, W: tl.constexpr):
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
def split_tile(acc, BT: tl.constexpr, G: tl.constexpr, NP: tl.constexpr):
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
def merge_tile(res, pre, post, BT: tl.constexpr, G: tl.constexpr, NP: tl.constexpr, W: tl.constexpr):
    """Inverse of :func:`split_tile`."""
    a = tl.arange(0, NP)[None, :, None]
    oth = tl.where(a == 0, pre[:, None, :], tl.where(a == 1, post[:, None, :], 0.0))
    g = tl.arange(0, G)[None, :, None, None]
    a4 = tl.where(g == 0, res[:, None, :, :], tl.where(g == 1, oth[:, None, :, :], 0.0))
    return tl.reshape(a4, (BT, W))


@triton.jit
def tanh_f32(x):
    """tanh in fp32: odd series near 0 (no cancellation), exp form elsewhere (saturates, no inf)."""
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    big = (1.0 - e) / (1.0 + e)
    x2 = x * x
    small = ax * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0))))
    t = tl.where(ax < 0.2, small, big)
    return tl.where(x < 0, -t, t)


@triton.jit
def sinkhorn_init(z, valid, SPREAD_: tl.constexpr):
    """M_0 = exp(clamp(z - max, -SPREAD)) on valid entries, 0 elsewhere; also the pieces for bwd."""
    zm = tl.where(valid, z, float("-inf"))
    mx = tl.max(tl.max(zm, axis=2), axis=1)
    sh = zm - mx[:, None, None]
    keep = (sh >= -SPREAD_) & valid
    m0 = tl.where(valid, tl.exp(tl.maximum(sh, -SPREAD_)), 0.0)
    is_max = (zm == mx[:, None, None]) & valid
    return m0, keep, is_max


@triton.jit
def sinkhorn_step(m, vrow, vcol):
    """One Sinkhorn iteration: normalise columns (sum over rows i), then rows (sum over cols j)."""
    cs = tl.sum(m, axis=1)
    a = m / tl.where(vcol, cs, 1.0)[:, None, :]
    rs = tl.sum(a, axis=2)
    return a / tl.where(vrow, rs, 1.0)[:, :, None]


@triton.jit
def sinkhorn(z, valid, vrow, vcol, iters, SPREAD_: tl.constexpr):
    """H_res (BT, NP, NP) = ``iters`` Sinkhorn iterations from M_0 of the res logits ``z``."""
    m, keep, is_max = sinkhorn_init(z, valid, SPREAD_)
    for _ in range(iters):
        m = sinkhorn_step(m, vrow, vcol)
    return m


@triton.jit
def sinkhorn_bwd(z, gout, valid, vrow, vcol, iters, SPREAD_: tl.constexpr):
    """d(loss)/dz given d(loss)/dSinkhorn(z); replays the iterates on chip (no storage)."""
    m0, keep, is_max = sinkhorn_init(z, valid, SPREAD_)
    gm = tl.where(valid, gout, 0.0)
    for kk in range(iters):
        k = iters - 1 - kk
        m = m0
        for _ in range(k):
            m = sinkhorn_step(m, vrow, vcol)
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
def stream_masks(N: tl.constexpr, NP: tl.constexpr):
    """Real-stream masks of the padded axis: vec (NP,), row/column (1, NP), valid (1, NP, NP)."""
    i = tl.arange(0, NP)
    vec = i < N
    vrow = vec[None, :]
    vcol = vec[None, :]
    valid = vec[None, :, None] & vec[None, None, :]
    return vec, vrow, vcol, valid


@triton.jit
def site_logits(acc, sumsq, alpha_ptr, bpre_ptr, bpost_ptr, bres_ptr, K, eps,
                N: tl.constexpr, NP: tl.constexpr, G: tl.constexpr, BT: tl.constexpr, HC: tl.constexpr):
    """From the projection tile and sum of squares: r, h, u (as tiles) and the three logits."""
    r = tl.sqrt(sumsq / K + eps)
    h = acc / r[:, None]
    if HC:
        u = tanh_f32(h)
    else:
        u = h
    ures, upre, upost = split_tile(u, BT, G, NP)
    vec, vrow, vcol, valid = stream_masks(N, NP)
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
def activate(lpre, lpost, lres, iters, N: tl.constexpr, NP: tl.constexpr, HC: tl.constexpr,
              SPREAD_: tl.constexpr):
    """H_pre, H_post, H_res from the gate logits: sigmoid, 2 sigmoid, Sinkhorn ("mhc"), or the
    logits themselves (HC)."""
    if HC:
        return lpre, lpost, lres
    vec, vrow, vcol, valid = stream_masks(N, NP)
    hp = tl.where(vrow, tl.sigmoid(lpre), 0.0)
    ho = tl.where(vrow, 2.0 * tl.sigmoid(lpost), 0.0)
    hr = sinkhorn(lres, valid, vrow, vcol, iters, SPREAD_)
    return hp, ho, hr


@triton.jit
def store_coeffs(hp_ptr, ho_ptr, hr_ptr, t, tm, hp, ho, hr, N: tl.constexpr, NP: tl.constexpr):
    """Store the token block's H_pre (T, N), H_post (T, N), H_res (T, N, N), padding masked."""
    i = tl.arange(0, NP)
    vec = i < N
    t64 = t.to(tl.int64)
    m2 = tm[:, None] & vec[None, :]
    tl.store(hp_ptr + t64[:, None] * N + i[None, :], hp, mask=m2)
    tl.store(ho_ptr + t64[:, None] * N + i[None, :], ho, mask=m2)
    offs = t64[:, None, None] * (N * N) + i[None, :, None] * N + i[None, None, :]
    m3 = tm[:, None, None] & vec[None, :, None] & vec[None, None, :]
    tl.store(hr_ptr + offs, hr, mask=m3)



# ============================================================================ launch helpers
def variant_flag(variant: str) -> bool:
    """The kernels' HC constexpr: True for "hc" (tanh, no activations), False for "mhc"."""
    if variant not in ("mhc", "hc"):
        raise ValueError(f"unknown variant {variant!r}; expected 'mhc' or 'hc'")
    return variant == "hc"


def check_phi(n: int, C: int, phi: torch.Tensor, kernel: str) -> None:
    """phi must be (n*C, 2n + n^2), and the coefficient kernels run 1 <= n <= 8 streams."""
    J = 2 * n + n * n
    if tuple(phi.shape) != (n * C, J):
        raise ValueError(f"phi must be ({n * C}, {J}) for {n} streams of {C} channels, got {tuple(phi.shape)}")
    if not 1 <= n <= 8:
        raise ValueError(f"the Triton {kernel} kernels support 1 <= n <= 8 streams, got {n}")


def check_not_float64(*ts: torch.Tensor) -> None:
    """The coefficient kernels compute in fp32; float64 (gradcheck) is run by the reference, and
    ``mhc_compile.ops`` is what sends it there."""
    if any(t.dtype == torch.float64 for t in ts):
        raise TypeError("the Triton coefficient kernels do not run float64 inputs (ops routes them to the reference)")


def as_f32(*ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Detached contiguous fp32 copies (the parameters and coefficients the kernels read)."""
    return tuple(t.detach().to(torch.float32).contiguous() for t in ts)


def coeff_outputs(T: int, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Uninitialised fp32 H_pre (T, n), H_post (T, n), H_res (T, n, n)."""
    return (
        torch.empty((T, n), dtype=torch.float32, device=device),
        torch.empty((T, n), dtype=torch.float32, device=device),
        torch.empty((T, n, n), dtype=torch.float32, device=device),
    )


def dot_precision(gpu: bool) -> str:
    """``tl.dot`` input precision. "ieee" (exact fp32 FMA) in the interpreter; "tf32x3" on CUDA
    (``gpu``): fp32-level accuracy on tensor cores (AOT-compiled for sm_90, the ieee FMA path
    spills registers heavily in the backward). Override with MHC_DOT_PRECISION=ieee|tf32x3|tf32."""
    env = os.environ.get("MHC_DOT_PRECISION")
    if env:
        return env
    return "tf32x3" if gpu else "ieee"


def logit_consts(n: int, variant: str, gpu: bool) -> dict:
    """The constexprs of the logit tile that every coefficient kernel taking logits has:
    N, NP, G, W, HC, SPREAD_, DOT_P (``gpu``: compiled for CUDA, not the interpreter)."""
    np_, g, w = logit_layout(n)
    return dict(N=n, NP=np_, G=g, W=w, HC=variant_flag(variant), SPREAD_=SPREAD, DOT_P=dot_precision(gpu))
