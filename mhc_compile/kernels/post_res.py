"""Fused Triton kernels for ``mhc::post_res``:
``out[t, i, c] = sum_j h_res[t, i, j] * x[t, j, c] + h_post[t, i] * h_out[t, c]``.

Owns the forward and backward kernels of the post/residual mix and their launch wrappers
(:func:`post_res_forward`, :func:`post_res_backward`), called by ``mhc_compile.ops``.

Layout: ``x`` (T, n, C) and ``h_out`` (T, C) contiguous; ``h_post`` (T or 1, n) and ``h_res``
(T or 1, n, n) fp32, per token or static (token stride 0). Any n >= 1 (padded to a power of two
with masks; the n x n mixes are broadcast-multiply-and-reduce in registers, no tl.dot), any C,
any T >= 1, x in float32/float16/bfloat16 (float64 accumulates in float64). fp32 accumulate,
one rounding to x's dtype (h_out's dtype for its gradient).

Memory traffic per token (memory-bound):
  forward   reads x (nC) + h_out (C), writes out (nC)                        = (2n+1)C elements
  backward  reads g (nC) + x (nC) + h_out (C), writes gx (nC) + gh_out (C)    = (4n+2)C elements
            plus the coefficient gradients gh_post (n) and gh_res (n*n), accumulated in fp32
            over C in registers (and over tokens when static) and written as small
            per-program partials; no T*n*n*C intermediate exists anywhere.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import (
    acc_dtype,
    check_post_res_shapes,
    coeff_rows,
    mix_blocks,
    mix_bwd_grid,
    mix_fwd_block,
    next_power_of_2,
    stream_tile,
    sum_partials,
)


# ============================================================================ kernels
@triton.jit
def _post_res_fwd_kernel(
    x_ptr, ho_ptr, hp_ptr, hr_ptr, out_ptr,
    T, C, stride_hp, stride_hr,
    N: tl.constexpr, N_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    # Stream-major tiles (N_PAD, BLOCK_T, BLOCK_C): threads spread over C then T, so the
    # reductions over the stream axis j stay inside a thread.
    t64, tm, c, cm, j, jm = mix_fwd_block(T, C, N, N_PAD, BLOCK_T, BLOCK_C)
    x_offs, x_mask = stream_tile(t64, tm, j, jm, c, cm, N, C)
    x = tl.load(x_ptr + x_offs, mask=x_mask, other=0.0).to(ACC)  # (N_PAD, BLOCK_T, BLOCK_C)
    tc_offs = t64[:, None] * C + c[None, :]
    tc_mask = tm[:, None] & cm[None, :]
    ho = tl.load(ho_ptr + tc_offs, mask=tc_mask, other=0.0).to(ACC)  # (BLOCK_T, BLOCK_C)
    jt_mask = jm[:, None] & tm[None, :]

    for i in tl.static_range(N):
        # row i of h_res as (N_PAD over j, BLOCK_T); stride 0 broadcasts a static matrix
        w = tl.load(hr_ptr + t64[None, :] * stride_hr + i * N + j[:, None], mask=jt_mask, other=0.0).to(ACC)
        p = tl.load(hp_ptr + t64 * stride_hp + i, mask=tm, other=0.0).to(ACC)
        o = tl.sum(w[:, :, None] * x, axis=0) + p[:, None] * ho
        tl.store(out_ptr + (t64[:, None] * N + i) * C + c[None, :], o.to(out_ptr.dtype.element_ty), mask=tc_mask)


@triton.jit
def _post_res_bwd_kernel(
    g_ptr, x_ptr, ho_ptr, hp_ptr, hr_ptr,
    gx_ptr, gho_ptr, ghp_part_ptr, ghr_part_ptr,
    T, C, C_CHUNK, stride_hp, stride_hr,
    N: tl.constexpr, N_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
    POST_STATIC: tl.constexpr, RES_STATIC: tl.constexpr, ACC: tl.constexpr, WRITE_GX: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    k = tl.arange(0, N_PAD)  # stream index, used as i (rows) or j (columns)
    tm = t < T
    km = k < N
    t64 = t.to(tl.int64)
    kt_mask = km[:, None] & tm[None, :]
    hp = tl.load(hp_ptr + t64[None, :] * stride_hp + k[:, None], mask=kt_mask, other=0.0).to(ACC)  # (N_PAD, BLOCK_T)

    ghp = tl.zeros([N_PAD, BLOCK_T], dtype=ACC)
    ghr = tl.zeros([N_PAD, N_PAD, BLOCK_T], dtype=ACC)  # [i, j, t]
    c_lo = pid_s * C_CHUNK
    for c0 in range(c_lo, c_lo + C_CHUNK, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cm = c < C
        s_offs, s_mask = stream_tile(t64, tm, k, km, c, cm, N, C)
        g = tl.load(g_ptr + s_offs, mask=s_mask, other=0.0).to(ACC)  # (N_PAD over i, BLOCK_T, BLOCK_C)
        x = tl.load(x_ptr + s_offs, mask=s_mask, other=0.0).to(ACC)  # (N_PAD over j, BLOCK_T, BLOCK_C)
        tc_offs = t64[:, None] * C + c[None, :]
        tc_mask = tm[:, None] & cm[None, :]
        ho = tl.load(ho_ptr + tc_offs, mask=tc_mask, other=0.0).to(ACC)

        # gh_out[t, c] = sum_i h_post[t, i] g[t, i, c]
        gho = tl.sum(hp[:, :, None] * g, axis=0)
        tl.store(gho_ptr + tc_offs, gho.to(gho_ptr.dtype.element_ty), mask=tc_mask)
        # gh_post[t, i] += sum_c g[t, i, c] h_out[t, c]
        ghp += tl.sum(g * ho[None, :, :], axis=2)
        for s in tl.static_range(N):
            if WRITE_GX:  # False: the coeffs backward computes H_res^T g into its own dX (ops)
                # gx[t, s, c] = sum_i h_res[t, i, s] g[t, i, c]   (column s of h_res)
                col = tl.load(hr_ptr + t64[None, :] * stride_hr + k[:, None] * N + s, mask=kt_mask, other=0.0).to(ACC)
                gxs = tl.sum(col[:, :, None] * g, axis=0)
                row_offs = (t64[:, None] * N + s) * C + c[None, :]
                tl.store(gx_ptr + row_offs, gxs.to(gx_ptr.dtype.element_ty), mask=tc_mask)
            # gh_res[t, s, j] += sum_c g[t, s, c] x[t, j, c]   (row s of the gradient); stream s of
            # the g tile is picked in registers (the stream axis lives inside each thread)
            gs = tl.sum(tl.where(k[:, None, None] == s, g, 0.0), axis=0)
            grow = tl.sum(gs[None, :, :] * x, axis=2)  # (N_PAD over j, BLOCK_T)
            ghr += tl.where(k[:, None, None] == s, grow[None, :, :], 0.0)

    prog = (pid_s * tl.num_programs(0) + pid_t).to(tl.int64)
    if POST_STATIC:
        tl.store(ghp_part_ptr + prog * N + k, tl.sum(ghp, axis=1), mask=km)
    else:
        base = pid_s.to(tl.int64) * T * N
        tl.store(ghp_part_ptr + base + t64[None, :] * N + k[:, None], ghp, mask=kt_mask)
    ij_offs = k[:, None] * N + k[None, :]
    ij_mask = km[:, None] & km[None, :]
    if RES_STATIC:
        tl.store(ghr_part_ptr + prog * N * N + ij_offs, tl.sum(ghr, axis=2), mask=ij_mask)
    else:
        base = pid_s.to(tl.int64) * T * N * N
        offs = base + t64[None, None, :] * (N * N) + ij_offs[:, :, None]
        tl.store(ghr_part_ptr + offs, ghr, mask=ij_mask[:, :, None] & tm[None, None, :])


# ============================================================================ launchers
def _check(x, h_out, h_post, h_res) -> tuple[bool, bool]:
    check_post_res_shapes(x, h_out, h_post, h_res)
    T = x.shape[0]
    return coeff_rows(h_post, T, 1, "h_post"), coeff_rows(h_res, T, 2, "h_res")


def post_res_forward(
    x: torch.Tensor,
    h_out: torch.Tensor,
    h_post: torch.Tensor,
    h_res: torch.Tensor,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """out (T, n, C) in x's dtype = h_res @ x + h_post (x) h_out, per token.

    ``out``: optional preallocated contiguous output (tests poison it).
    """
    post_static, res_static = _check(x, h_out, h_post, h_res)
    x, h_out, h_post, h_res = (t.contiguous() for t in (x, h_out, h_post, h_res))
    T, n, C = x.shape
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if T == 0 or C == 0:
        return out
    block_t, block_c, warps = mix_blocks(T, n, C, x.device, x.element_size())
    grid = (triton.cdiv(T, block_t), triton.cdiv(C, block_c))
    _post_res_fwd_kernel[grid](
        x, h_out, h_post, h_res, out, T, C, 0 if post_static else n, 0 if res_static else n * n,
        N=n, N_PAD=next_power_of_2(n), BLOCK_T=block_t, BLOCK_C=block_c,
        ACC=acc_dtype(x.dtype, h_out.dtype, h_post.dtype, h_res.dtype), num_warps=warps,
    )
    return out


def post_res_backward(
    g: torch.Tensor,
    x: torch.Tensor,
    h_out: torch.Tensor,
    h_post: torch.Tensor,
    h_res: torch.Tensor,
    gx: Optional[torch.Tensor] = None,
    gh_out: Optional[torch.Tensor] = None,
    write_gx: bool = True,
) -> tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gx like x, gh_out like h_out, gh_post like h_post, gh_res like h_res).

    Coefficient gradients accumulate in fp32 over C (and over tokens for static, one-row
    coefficients) and come back in the coefficients' dtype. ``gx``/``gh_out``: optional
    preallocated outputs (tests poison them). ``write_gx=False``: gx is neither written nor
    returned (None): the caller adds ``H_res^T g`` into its own dX.
    """
    post_static, res_static = _check(x, h_out, h_post, h_res)
    x, h_out, h_post, h_res = (t.contiguous() for t in (x, h_out, h_post, h_res))
    T, n, C = x.shape
    g = g.reshape(T, n, C).contiguous()
    if gx is None and write_gx:
        gx = torch.empty_like(x, memory_format=torch.contiguous_format)
    if gh_out is None:
        gh_out = torch.empty_like(h_out, memory_format=torch.contiguous_format)
    acc = acc_dtype(x.dtype, h_out.dtype, h_post.dtype, h_res.dtype)
    acc_t = torch.float64 if acc == tl.float64 else torch.float32
    if T == 0 or C == 0:
        if gx is not None:
            gx.zero_()
        gh_out.zero_()
        return gx, gh_out, torch.zeros_like(h_post), torch.zeros_like(h_res)
    block_t, block_c, warps = mix_blocks(T, n, C, x.device, x.element_size(), backward=True)
    t_blocks, splits, chunk = mix_bwd_grid(T, C, block_t, block_c, x.device)
    ghp_part = torch.empty((splits, t_blocks if post_static else T, n), dtype=acc_t, device=x.device)
    ghr_part = torch.empty((splits, t_blocks if res_static else T, n, n), dtype=acc_t, device=x.device)
    _post_res_bwd_kernel[(t_blocks, splits)](
        g, x, h_out, h_post, h_res, x if gx is None else gx, gh_out, ghp_part, ghr_part,
        T, C, chunk, 0 if post_static else n, 0 if res_static else n * n,
        N=n, N_PAD=next_power_of_2(n), BLOCK_T=block_t, BLOCK_C=block_c,
        POST_STATIC=post_static, RES_STATIC=res_static, ACC=acc, WRITE_GX=gx is not None, num_warps=warps,
    )
    gh_post = sum_partials(ghp_part, post_static, h_post.shape).to(h_post.dtype)
    gh_res = sum_partials(ghr_part, res_static, h_res.shape).to(h_res.dtype)
    return gx, gh_out, gh_post, gh_res
