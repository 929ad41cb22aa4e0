"""Small helpers shared by the Triton kernel modules (pre, post_res, coeffs, boundary).

Owns: power-of-two padding, whether a launch is compiled for a GPU or interpreted, the
accumulation dtype rule, launch-size heuristics and grids of the stream-mixing kernels (pre,
post_res), the ``@triton.jit`` indexing of their stream-major tiles, the reduction of their
gradient partials, and input checks. Nothing here launches a kernel. The building blocks of
the two coefficient kernels (coeffs, boundary) are in ``kernels.coeff_common``.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import triton
import triton.language as tl


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def interpreting() -> bool:
    """True when Triton runs in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def on_gpu(device: torch.device) -> bool:
    """True when a launch on ``device`` is compiled for CUDA (not interpreted): the GPU block
    sizes, warps and ``tl.dot`` precision apply."""
    return device.type == "cuda" and not interpreting()


def acc_dtype(*dtypes: torch.dtype):
    """Triton accumulation dtype: float64 if any input is float64 (gradcheck), else float32."""
    return tl.float64 if any(d == torch.float64 for d in dtypes) else tl.float32


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (a fixed small number elsewhere)."""
    if device.type == "cuda":
        return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 4


def coeff_rows(h: torch.Tensor, tokens: int, tail: int, name: str) -> bool:
    """Check a (T or 1, *tail) coefficient tensor; return True when it is static (one row)."""
    if h.dim() != 1 + tail:
        raise ValueError(f"{name} must have {1 + tail} dims (tokens, ...), got shape {tuple(h.shape)}")
    if h.shape[0] not in (1, tokens):
        raise ValueError(f"{name} has {h.shape[0]} rows; expected 1 (static) or {tokens} (per token)")
    return h.shape[0] == 1 and tokens != 1


def check_post_res_shapes(x: torch.Tensor, h_out: torch.Tensor, h_post: torch.Tensor, h_res: torch.Tensor) -> None:
    """Shape checks of a post_res mix's inputs (the post_res and boundary kernels): x (T, n, C),
    h_out (T, C), h_post (..., n), h_res (..., n, n)."""
    if x.dim() != 3:
        raise ValueError(f"x must be (T, n, C), got shape {tuple(x.shape)}")
    T, n, C = x.shape
    if tuple(h_out.shape) != (T, C):
        raise ValueError(f"h_out must be {(T, C)}, got {tuple(h_out.shape)}")
    if h_post.shape[-1] != n or tuple(h_res.shape[-2:]) != (n, n):
        raise ValueError(f"coefficient shapes {tuple(h_post.shape)}, {tuple(h_res.shape)} do not match n={n}")


def mix_blocks(
    tokens: int, n: int, channels: int, device: torch.device, elem_bytes: int, backward: bool = False
) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_C, num_warps) for the stream-mixing kernels (pre, post_res).

    Their tiles are stream-major (n_pad, BLOCK_T, BLOCK_C). Triton's default layout hands out
    threads along C, then T, then the stream axis, so keeping BLOCK_T * BLOCK_C >= 32 * warps
    * (16 bytes / element) puts every thread on distinct (t, c) with 16-byte vector loads and
    all n_pad streams of a column in one thread: the n-way mixes reduce in registers with no
    shuffles or shared memory (if fewer (t, c) pairs than threads * vector, Triton puts the
    spare warps on the stream axis and those reductions go through shared memory). Beyond that
    floor, the fp32 tile n_pad * BLOCK_T * BLOCK_C grows to 8192 elements forward and 4096
    backward (which holds two tiles, g and x). Checked without a GPU by compiling for sm_90:
    tests/test_kernels_mix.py::test_kernels_compile_for_sm90_without_spills.
    """
    n_pad = next_power_of_2(n)
    if not on_gpu(device):
        # The interpreter's cost is per program and per op: few, moderately sized programs.
        return min(next_power_of_2(tokens), 4), min(next_power_of_2(channels), 32), 1
    warps = 4
    budget = 4096 if backward else 8192
    vec = max(1, 16 // max(1, elem_bytes))
    tc = max(32 * warps * vec, budget // n_pad)
    block_c = min(next_power_of_2(channels), 1024, tc)
    block_t = max(1, min(next_power_of_2(tokens), tc // block_c))
    return block_t, block_c, warps


def c_splits(tokens: int, block_t: int, channels: int, block_c: int, device: torch.device) -> int:
    """How many programs share one token block's C range in the backward kernels.

    Each program loops over its C range and writes one partial of the coefficient gradients;
    the partials are summed in fp32 afterwards. More splits -> more parallelism, more partials.
    """
    c_blocks = triton.cdiv(channels, block_c)
    t_blocks = triton.cdiv(tokens, block_t)
    want = 4 * num_sms(device)  # programs to fill the GPU a few waves deep
    return max(1, min(c_blocks, triton.cdiv(want, t_blocks)))


def mix_bwd_grid(tokens: int, channels: int, block_t: int, block_c: int, device: torch.device) -> tuple[int, int, int]:
    """(token blocks, C splits, C chunk) of a mix backward's grid (token blocks, C splits): each
    program walks one chunk of C (a multiple of ``block_c``) and writes one gradient partial."""
    t_blocks = triton.cdiv(tokens, block_t)
    splits = c_splits(tokens, block_t, channels, block_c, device)
    chunk = triton.cdiv(triton.cdiv(channels, block_c), splits) * block_c
    return t_blocks, triton.cdiv(channels, chunk), chunk


def reduction_splits(tblocks: int, chunks: int, sms: int, splits: Optional[int] = None,
                     max_splits: int = 64, min_chunks: int = 4) -> tuple[int, int]:
    """(S, chunks per split) of a split-K launch: a grid of ``tblocks`` token blocks, each of
    whose reductions covers ``chunks`` chunks, on ``sms`` SMs. When there are fewer token blocks
    than SMs (decode and short prefill shapes), each token block's reduction is shared by S
    programs (at most ``max_splits``, at least ``min_chunks`` chunks each) so that the grid
    fills the GPU; S = 1 otherwise (and with ``sms`` = 0, the interpreter). ``splits`` forces S
    (tests). Pure arithmetic: tests/test_kernel_aot.py asserts the grids it gives."""
    if splits is None:
        if tblocks >= sms or chunks < 2 * min_chunks:
            return 1, chunks
        splits = min(max_splits, triton.cdiv(sms, tblocks), chunks // min_chunks)
    per = triton.cdiv(chunks, max(1, min(int(splits), chunks)))
    return triton.cdiv(chunks, per), per


def sum_partials(part: torch.Tensor, static: bool, shape: torch.Size) -> torch.Tensor:
    """A mix backward's coefficient gradient from its partials (C splits, rows, ...): summed over
    the splits, and over the token blocks too (to ``shape``) for a static, one-row coefficient."""
    if static:
        return part.sum(dim=(0, 1)).reshape(shape)
    return part[0] if part.shape[0] == 1 else part.sum(dim=0)


@triton.jit
def mix_fwd_block(T, C, N: tl.constexpr, N_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """A mix forward program's tokens and channels (grid axes 0 and 1) and the padded stream
    index: (t64, t mask, c, c mask, k, k mask)."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    k = tl.arange(0, N_PAD)
    return t.to(tl.int64), t < T, c, c < C, k, k < N


@triton.jit
def stream_tile(t64, tm, k, km, c, cm, N: tl.constexpr, C):
    """Offsets and mask of the stream-major (N_PAD, BLOCK_T, BLOCK_C) tile [k, t, c] of a
    contiguous (T, N, C) tensor; threads spread over C then T, so reductions over k stay in a thread."""
    offs = (t64[None, :, None] * N + k[:, None, None]) * C + c[None, None, :]
    mask = km[:, None, None] & tm[None, :, None] & cm[None, None, :]
    return offs, mask
