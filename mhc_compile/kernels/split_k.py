"""Split-K for the coefficient kernels at decode shapes: the shared finish step.

Owns :func:`_finish_kernel` (launched by ``kernels.coeffs`` and ``kernels.boundary``), its launch
configuration :func:`finish_config`, and the boundary's h_in pass :func:`hin_pass` (also used by
the unsplit boundary kernel). Nothing here decides whether to split: ``_common.reduction_splits``
does, and the two launchers call it.

When a launch has fewer token blocks than the GPU has SMs (decode: T = 8 is one 64-token block,
one SM), the coeffs forward and the boundary kernel share each token block's reduction over the
flat nC axis (the projection x . phi and the sum of squares; the boundary also its X' pass and,
in the backward recompute, sum_c g_h_in X') among S programs, each writing fp32 partials
acc (S, T, W), sumsq (S, T) and ghp (S, T, NP). The finish kernel, grid (token blocks, S), sums
them over s = 0 .. S-1 in that fixed order (fp32, deterministic, no atomics), then runs exactly the
epilogue of the unsplit kernels (``coeff_common.site_logits``, ``activate``, ``store_coeffs``: the
same RMS, sigmoid and 20-step Sinkhorn math); program 0 of a token block stores the coefficients
(and ghp), and for the boundary every program s also runs the h_in pass over its own share of C,
so that pass is spread over S programs too (each recomputes its block's coefficients from the
partials: ~(W + 1) S loads and a few hundred flops per token, negligible next to nC).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .coeff_common import activate, logit_consts, site_logits, store_coeffs


@triton.jit
def hin_pass(xn_ptr, hin_ptr, hp, t64, tm, i, vec, c_lo, c_hi, C, N: tl.constexpr, BC: tl.constexpr):
    """h_in[t, c] = sum_i H_pre[t, i] X'[t, i, c] for c in [c_lo, c_hi) (c_hi - c_lo a multiple
    of BC or c_hi = C), from the X' (T, N, C) in memory; ``hp`` (BT, NP) fp32."""
    for c0 in range(c_lo, c_hi, BC):
        c = c0 + tl.arange(0, BC)
        cm = c < C
        m3 = tm[:, None, None] & vec[None, :, None] & cm[None, None, :]
        offs3 = (t64[:, None, None] * N + i[None, :, None]) * C + c[None, None, :]
        xf = tl.load(xn_ptr + offs3, mask=m3, other=0.0).to(tl.float32)
        hin = tl.sum(hp[:, :, None] * xf, axis=1)
        tl.store(hin_ptr + t64[:, None] * C + c[None, :], hin.to(hin_ptr.dtype.element_ty),
                 mask=tm[:, None] & cm[None, :])


@triton.jit
def _finish_kernel(
    accp_ptr, ssp_ptr, ghpp_ptr, alpha_ptr, bpre_ptr, bpost_ptr, bres_ptr,
    hp_ptr, ho_ptr, hr_ptr, ghp_ptr, xn_ptr, hin_ptr,
    T, C, K, S, CSPLIT, eps, iters,
    N: tl.constexpr, NP: tl.constexpr, G: tl.constexpr, W: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
    HC: tl.constexpr, SPREAD_: tl.constexpr, DOT_P: tl.constexpr, GHP: tl.constexpr, HIN: tl.constexpr,
):
    """Sum the S partials of a token block, then the coefficients (stored by program 0 of the
    block, with the ghp sum if GHP) and, if HIN, h_in over channels [s CSPLIT, (s+1) CSPLIT)."""
    pid = tl.program_id(0)
    ps = tl.program_id(1)
    t = pid * BT + tl.arange(0, BT)
    tm = t < T
    t64 = t.to(tl.int64)
    col = tl.arange(0, W)
    i = tl.arange(0, NP)
    vec = i < N
    acc = tl.zeros((BT, W), dtype=tl.float32)
    sumsq = tl.zeros((BT,), dtype=tl.float32)
    for s in range(S):
        row = t64 + s * T
        acc += tl.load(accp_ptr + row[:, None] * W + col[None, :], mask=tm[:, None], other=0.0)
        sumsq += tl.load(ssp_ptr + row, mask=tm, other=0.0)
    r, h, u, ures, upre, upost, lpre, lpost, lres = site_logits(
        acc, sumsq, alpha_ptr, bpre_ptr, bpost_ptr, bres_ptr, K, eps, N, NP, G, BT, HC)
    hp, ho, hr = activate(lpre, lpost, lres, iters, N, NP, HC, SPREAD_)
    if ps == 0:
        store_coeffs(hp_ptr, ho_ptr, hr_ptr, t, tm, hp, ho, hr, N, NP)
        if GHP:
            ghp = tl.zeros((BT, NP), dtype=tl.float32)
            for s in range(S):
                ghp += tl.load(ghpp_ptr + (t64 + s * T)[:, None] * NP + i[None, :], mask=tm[:, None], other=0.0)
            tl.store(ghp_ptr + t64[:, None] * N + i[None, :], ghp, mask=tm[:, None] & vec[None, :])
    if HIN:
        c_lo = ps * CSPLIT
        hin_pass(xn_ptr, hin_ptr, hp, t64, tm, i, vec, c_lo, tl.minimum(c_lo + CSPLIT, C), C, N, BC)


@triton.jit
def store_partials(accp_ptr, ssp_ptr, acc, sumsq, t64, tm, T, W: tl.constexpr):
    """Program (token block, s)'s partial projection tile and sum of squares into row s."""
    row = t64 + tl.program_id(1) * T
    col = tl.arange(0, W)
    tl.store(accp_ptr + row[:, None] * W + col[None, :], acc, mask=tm[:, None])
    tl.store(ssp_ptr + row, sumsq, mask=tm)


def finish_config(n: int, variant: str, gpu: bool, block_c: int) -> tuple[dict, int]:
    """(constexprs but GHP and HIN, num_warps) of :func:`_finish_kernel`: 16-token blocks, the
    h_in pass in chunks of ``block_c`` channels (the split kernel's, so a split's channel range
    is a whole number of chunks); 4 warps on the GPU, 1 in the interpreter."""
    return dict(logit_consts(n, variant, gpu), BT=16, BC=block_c), 4 if gpu else 1
