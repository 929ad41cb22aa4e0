"""Fused Triton kernels for ``mhc::pre``: ``h_in[t, c] = sum_i h_pre[t, i] * x[t, i, c]``.

Owns the forward and backward kernels of the pre-mix and their launch wrappers
(:func:`pre_forward`, :func:`pre_backward`), called by ``mhc_compile.ops``.

Layout: ``x`` is (T, n, C) contiguous; ``h_pre`` is (T, n) per token or (1, n) static (broadcast
over tokens with token stride 0). Any n >= 1 (padded to a power of two with masks), any C
(tail masked), any T >= 1; x in float32/float16/bfloat16 (float64 for gradcheck, accumulated
in float64). Products accumulate in fp32 and round once to the dtype of x.

Memory traffic (the op is memory-bound):
  forward   reads x (nC) + h_pre, writes h_in (C)               per token
  backward  reads g (C) + x (nC) + h_pre, writes gx (nC)         per token
            and the (T, n) / (1, n) coefficient gradient, reduced over C in fp32 (and over
            tokens when static) from small per-program partials, never from a T*n*C product.
Grid: (token blocks, C blocks) forward; (token blocks, C splits) backward, each program looping
over its C range in BLOCK_C steps so one token block's partial stays in registers.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, coeff_rows, mix_blocks, mix_bwd_grid, mix_fwd_block, next_power_of_2, stream_tile, sum_partials


# ============================================================================ kernels
@triton.jit
def _pre_fwd_kernel(
    x_ptr, h_ptr, out_ptr,
    T, C, stride_h,
    N: tl.constexpr, N_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    # Tiles are stream-major (N_PAD, BLOCK_T, BLOCK_C): the default layout spreads threads over
    # C then T, so every reduction over the stream axis stays inside a thread.
    t64, tm, c, cm, i, im = mix_fwd_block(T, C, N, N_PAD, BLOCK_T, BLOCK_C)

    # (N_PAD, BLOCK_T) coefficients; stride_h == 0 broadcasts a static row
    h = tl.load(h_ptr + t64[None, :] * stride_h + i[:, None], mask=im[:, None] & tm[None, :], other=0.0).to(ACC)
    x_offs, x_mask = stream_tile(t64, tm, i, im, c, cm, N, C)
    x = tl.load(x_ptr + x_offs, mask=x_mask, other=0.0).to(ACC)
    acc = tl.sum(h[:, :, None] * x, axis=0)  # (BLOCK_T, BLOCK_C)
    out_offs = t64[:, None] * C + c[None, :]
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=tm[:, None] & cm[None, :])


@triton.jit
def _pre_bwd_kernel(
    g_ptr, x_ptr, h_ptr, gx_ptr, gh_part_ptr,
    T, C, C_CHUNK, stride_h,
    N: tl.constexpr, N_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
    H_STATIC: tl.constexpr, ACC: tl.constexpr, WRITE_GX: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    i = tl.arange(0, N_PAD)
    tm = t < T
    im = i < N
    t64 = t.to(tl.int64)
    h = tl.load(h_ptr + t64[None, :] * stride_h + i[:, None], mask=im[:, None] & tm[None, :], other=0.0).to(ACC)

    # elementwise fp32 accumulator of x * g over this program's C range, reduced over C once
    gh3 = tl.zeros([N_PAD, BLOCK_T, BLOCK_C], dtype=ACC)
    c_lo = pid_s * C_CHUNK
    for c0 in range(c_lo, c_lo + C_CHUNK, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cm = c < C
        g = tl.load(g_ptr + t64[:, None] * C + c[None, :], mask=tm[:, None] & cm[None, :], other=0.0).to(ACC)
        x_offs, x_mask = stream_tile(t64, tm, i, im, c, cm, N, C)
        x = tl.load(x_ptr + x_offs, mask=x_mask, other=0.0).to(ACC)
        if WRITE_GX:  # False: only the coefficient gradient (ops hands g to the coeffs backward)
            gx = h[:, :, None] * g[None, :, :]
            tl.store(gx_ptr + x_offs, gx.to(gx_ptr.dtype.element_ty), mask=x_mask)
        gh3 += x * g[None, :, :]
    gh = tl.sum(gh3, axis=2)  # (N_PAD, BLOCK_T)

    if H_STATIC:
        # partial over this program's tokens and C range: gh_part[pid_s, pid_t, i]
        tot = tl.sum(gh, axis=1)
        base = (pid_s * tl.num_programs(0) + pid_t).to(tl.int64) * N
        tl.store(gh_part_ptr + base + i, tot, mask=im)
    else:
        # partial over this program's C range: gh_part[pid_s, t, i]
        base = pid_s.to(tl.int64) * T * N
        tl.store(gh_part_ptr + base + t64[None, :] * N + i[:, None], gh, mask=im[:, None] & tm[None, :])


# ============================================================================ launchers
def _check(x: torch.Tensor, h_pre: torch.Tensor) -> bool:
    if x.dim() != 3:
        raise ValueError(f"x must be (T, n, C), got shape {tuple(x.shape)}")
    if h_pre.shape[-1] != x.shape[1]:
        raise ValueError(f"h_pre has {h_pre.shape[-1]} streams, x has {x.shape[1]}")
    return coeff_rows(h_pre, x.shape[0], 1, "h_pre")


def pre_forward(x: torch.Tensor, h_pre: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """h_in (T, C) in x's dtype from x (T, n, C) and h_pre (T or 1, n) (fp32).

    ``out``: optional preallocated contiguous (T, C) output (tests poison it to prove every
    element is written).
    """
    static = _check(x, h_pre)
    x = x.contiguous()
    h_pre = h_pre.contiguous()
    T, n, C = x.shape
    if out is None:
        out = torch.empty((T, C), dtype=x.dtype, device=x.device)
    if T == 0 or C == 0:
        return out
    block_t, block_c, warps = mix_blocks(T, n, C, x.device, x.element_size())
    grid = (triton.cdiv(T, block_t), triton.cdiv(C, block_c))
    _pre_fwd_kernel[grid](
        x, h_pre, out, T, C, 0 if static else n,
        N=n, N_PAD=next_power_of_2(n), BLOCK_T=block_t, BLOCK_C=block_c,
        ACC=acc_dtype(x.dtype, h_pre.dtype), num_warps=warps,
    )
    return out


def pre_backward(
    g: torch.Tensor, x: torch.Tensor, h_pre: torch.Tensor, gx: Optional[torch.Tensor] = None, write_gx: bool = True
) -> tuple[Optional[torch.Tensor], torch.Tensor]:
    """(gx (T, n, C) in x's dtype, gh_pre shaped like h_pre in h_pre's dtype, fp32-accumulated).

    ``gx``: optional preallocated contiguous output (for poisoning tests). ``write_gx=False``:
    gx is neither written nor returned (None): the caller adds ``h_pre * g`` into its own dX.
    """
    static = _check(x, h_pre)
    x = x.contiguous()
    h_pre = h_pre.contiguous()
    T, n, C = x.shape
    g = g.reshape(T, C).contiguous()
    if gx is None and write_gx:
        gx = torch.empty_like(x, memory_format=torch.contiguous_format)
    acc_t = torch.float64 if acc_dtype(x.dtype, h_pre.dtype) == tl.float64 else torch.float32
    if T == 0 or C == 0:
        if gx is not None:
            gx.zero_()
        return gx, torch.zeros_like(h_pre)
    block_t, block_c, warps = mix_blocks(T, n, C, x.device, x.element_size(), backward=True)
    t_blocks, splits, chunk = mix_bwd_grid(T, C, block_t, block_c, x.device)
    rows = t_blocks if static else T
    part = torch.empty((splits, rows, n), dtype=acc_t, device=x.device)
    _pre_bwd_kernel[(t_blocks, splits)](
        g, x, h_pre, x if gx is None else gx, part, T, C, chunk, 0 if static else n,
        N=n, N_PAD=next_power_of_2(n), BLOCK_T=block_t, BLOCK_C=block_c,
        H_STATIC=static, ACC=acc_dtype(x.dtype, h_pre.dtype), WRITE_GX=gx is not None, num_warps=warps,
    )
    return gx, sum_partials(part, static, h_pre.shape).to(h_pre.dtype)
