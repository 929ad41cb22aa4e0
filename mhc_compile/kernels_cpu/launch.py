"""The ``mhc::`` ops on CPU from the fused kernels of ``coeffs.cpp`` / ``mix.cpp`` plus a few aten calls.

Every function takes and returns the shapes of the ``mhc::`` op it implements (streams
``(..., n, C)``, coefficients ``(..., n)`` / ``(..., n, n)``, possibly broadcast) and follows the
math of :mod:`mhc_compile.reference` (its hand-written backward formulas, the same recomputation
from the op inputs). :func:`supported` says which calls they take; ``mhc_compile.ops`` runs the reference
for the rest. Per site (coeffs + pre + post_res) the forward makes 4 calls that do work and the
backward 7, whatever n and the Sinkhorn iteration count (``tests/test_kernels_cpu.py`` counts them).
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from .. import reference

_COMPUTE = {dt: reference.compute_dtype(dt) for dt in (torch.float32, torch.float64, torch.float16, torch.bfloat16)}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """:func:`mhc_compile.reference.compute_dtype`, looked up (no aten call per op)."""
    return _COMPUTE[dtype]


FUSED = os.environ.get("MHC_CPU_FUSED", "1") != "0"
"""Whether the projection runs ``proj_mm`` and the boundary forward ``boundary_fwd`` (both ``fused.cpp``),
a post-LN site's end ``post_res_norm_fwd`` (``post_norm.cpp``, via ``ops.post_res_norm``), and the
backward's X gradient ``coeffs_gx`` (``grad_mm.cpp``: the dh_r . phi^T GEMM with its epilogue, any n).
False (``MHC_CPU_FUSED=0``): aten's mm, the boundary forward as post_res, coeffs and pre in turn, and
the X gradient as aten's mm plus a separate epilogue pass: the path before them, which
``benchmarks/bench_cpu.py``'s ``mhc_unfused`` variant measures against."""

FUSED_MAX_STREAMS = 4
"""``proj_mm`` keeps one register tile of outputs per token block up to 2n+n^2 = 24 columns (n <= 4); at
n = 8 (80 columns) it re-reads the tokens per column tile and is 1.2-2.4x slower than aten's mm
(C = 512-4096, 1 thread), so wider n take aten's mm and the unfused boundary."""


def _fused(n: int) -> bool:
    return FUSED and n <= FUSED_MAX_STREAMS


DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
"""The x dtypes the kernels take (:func:`supported`)."""


def _ops():
    """torch.ops.mhc_cpu (exists once :func:`mhc_compile.kernels_cpu.available` built it)."""
    return torch.ops.mhc_cpu


def supported(x: Tensor, *others: Tensor) -> bool:
    """x on CPU in a float dtype, every other tensor on CPU (the kernels' contract)."""
    return x.device.type == "cpu" and x.dtype in DTYPES and all(t.device.type == "cpu" for t in others)


# ----------------------------------------------------------------------------- layout helpers
# Each helper skips the aten call (about 1 us of Python and dispatch each) when it would return its
# input's data unchanged: a 3-d x needs no reshape, a tensor already in the dtype no .to, a per-token
# coefficient no expand. Same data, same numbers.
def _to(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _site_params(cd: torch.dtype, phi, alpha, b_pre, b_post, b_res) -> tuple:
    """phi and the small parameters (alpha, b_pre, b_post, b_res) in the compute dtype, in that order."""
    return _to(phi, cd), _to(alpha, cd), _to(b_pre, cd), _to(b_post, cd), _to(b_res, cd)


def _flat3(x: Tensor) -> Tensor:
    return x if x.dim() == 3 else x.reshape(-1, x.shape[-2], x.shape[-1])


def _rows(t: Tensor, lead: torch.Size, *tail: int) -> Tensor:
    """A per-token output (T, *tail) as (*lead, *tail)."""
    return t if len(lead) == 1 else t.reshape(*lead, *tail)


def _coef(h: Tensor, lead: torch.Size, tail: int, cd: torch.dtype) -> Tensor:
    """A coefficient as (1 or T, *tail dims) in the compute dtype (a broadcast one keeps one row)."""
    d = h.dim()
    per = h.shape[d - tail :]
    if h.numel() != per.numel() and h.shape[: d - tail] != lead:
        h = h.expand(*lead, *per)
    if h.dim() != tail + 1:
        h = h.reshape(-1, *per)
    return _to(h, cd)


# ----------------------------------------------------------------------------- coeffs
def _check_variant(variant: str) -> bool:
    if variant not in ("mhc", "hc"):
        raise ValueError(f"unknown variant {variant!r}; expected 'mhc' or 'hc'")
    return variant == "hc"


def _project(x: Tensor, phi: Tensor, alpha, b_pre, b_post, b_res, proj: Tensor | None = None):
    """vec(X) (T, nC) and its projection vec(X) . phi (T, 2n+n^2) in the compute dtype (``proj_mm``, the
    skinny GEMM of ``fused.cpp``, unless ``proj`` is that projection already), plus phi and the small
    parameters in the compute dtype."""
    n, c = x.shape[-2], x.shape[-1]
    cd = compute_dtype(x.dtype)
    flat = _to(x.reshape(-1, n * c), cd)
    phi_c, *small = _site_params(cd, phi, alpha, b_pre, b_post, b_res)
    if proj is None:
        proj = _ops().proj_mm(flat, phi_c) if _fused(n) else torch.mm(flat, phi_c)
    return flat, proj, phi_c, small


def coeffs_forward(x, phi, alpha, b_pre, b_post, b_res, iters: int, eps: float, variant: str, keep: list | None = None):
    """``mhc::coeffs`` (dynamic): H_pre (..., n), H_post (..., n), H_res (..., n, n) in the compute dtype.
    ``keep`` (a list) receives the projection (T, 2n+n^2), which :func:`coeffs_backward` may take back
    instead of recomputing it (the eager fast path of ``ops/cpu_paths.py``)."""
    hc = _check_variant(variant)
    lead, n = x.shape[:-2], x.shape[-2]
    flat, proj, _, small = _project(x, phi, alpha, b_pre, b_post, b_res)
    if keep is not None:
        keep.append(proj)
    hp, ho, hr = _ops().coeffs_fwd(flat, proj, *small, eps, n, iters, hc)
    return _rows(hp, lead, n), _rows(ho, lead, n), _rows(hr, lead, n, n)


def site_start_forward(x, phi, alpha, b_pre, b_post, b_res, iters: int, eps: float, variant: str,
                       keep: list | None = None):
    """``mhc::coeffs`` and ``mhc::pre`` of one site on x in one pass per token block (``site_start_fwd`` of
    ``fused.cpp``): (H_pre, H_post, H_res, h_in), the bits of :func:`coeffs_forward` then
    :func:`pre_forward`; None where the one-pass kernel does not run (n > ``FUSED_MAX_STREAMS``,
    ``MHC_CPU_FUSED=0``). ``keep`` as in :func:`coeffs_forward`, then each token's RMS (T,) after the projection:
    :func:`coeffs_backward` takes both back (``proj``, ``rms``) and reads no row of x for the RMS."""
    lead, n, c = x.shape[:-2], x.shape[-2], x.shape[-1]
    if not _fused(n):
        return None
    hc = _check_variant(variant)
    cd = compute_dtype(x.dtype)
    hp, ho, hr, h_in, proj, rms = _ops().site_start_fwd(_flat3(x), *_site_params(cd, phi, alpha, b_pre, b_post, b_res),
                                                       eps, iters, hc)
    if keep is not None:
        keep.extend((proj, rms))
    return _rows(hp, lead, n), _rows(ho, lead, n), _rows(hr, lead, n, n), _rows(h_in, lead, c)


def _gate_grads(g_pre, g_post, g_res, lead, n: int, cd):
    """The H_pre, H_post, H_res gradients per token, (T, n), (T, n), (T, n, n) in the compute dtype."""
    return tuple(_per_token(g, lead, tail, cd) for g, tail in ((g_pre, (n,)), (g_post, (n,)), (g_res, (n, n))))


def _per_token(g: Tensor, lead: torch.Size, tail: tuple, cd: torch.dtype) -> Tensor:
    """``g`` in the compute dtype, broadcast to (*lead, *tail), as (T, *tail)."""
    g = _to(g, cd)
    if g.shape != (*lead, *tail):
        g = g.expand(*lead, *tail)
    return g if g.dim() == len(tail) + 1 else g.reshape(-1, *tail)


def _param_grads(dh_r, flat, g_alpha, g_bp, g_bo, g_br, phi, alpha, b_pre, b_post, b_res):
    """(phi, alpha, b_pre, b_post, b_res) gradients in the parameters' shapes and dtypes."""
    if FUSED:
        g_phi = _ops().phi_grad_mm(flat, dh_r)  # (nC, K), our kernel (grad_mm.cpp)
    else:  # (K, T) @ (T, nC): MKL runs it 2x faster than flat^T @ dh_r
        g_phi = torch.mm(dh_r.t(), flat).t().contiguous()
    return (
        _to(g_phi, phi.dtype),
        _to(g_alpha, alpha.dtype),
        _to(_shaped(g_bp, b_pre.shape), b_pre.dtype),
        _to(_shaped(g_bo, b_post.shape), b_post.dtype),
        _to(_shaped(g_br, b_res.shape), b_res.dtype),
    )


def _shaped(t: Tensor, shape: torch.Size) -> Tensor:
    return t if t.shape == shape else t.reshape(shape)


def coeffs_backward(g_pre, g_post, g_res, x, phi, alpha, b_pre, b_post, b_res, iters: int, eps: float, variant: str,
                    proj: Tensor | None = None, rms: Tensor | None = None):
    """``mhc::coeffs_backward``: gradients (x, phi, alpha, b_pre, b_post, b_res); ``proj`` (and ``rms``, each
    token's RMS, with it) as kept by :func:`coeffs_forward` / :func:`site_start_forward`, else recomputed."""
    hc = _check_variant(variant)
    n = x.shape[-2]
    flat, proj, phi_c, small = _project(x, phi, alpha, b_pre, b_post, b_res, proj)
    gates = _gate_grads(g_pre, g_post, g_res, x.shape[:-2], n, flat.dtype)
    dh_r, coef, *small_grads = _ops().coeffs_bwd(*gates, flat, proj, *small, eps, n, iters, hc, rms)
    if FUSED:
        g_x = _shaped(_ops().coeffs_gx(dh_r, phi_c, _flat3(x), coef), x.shape)
    else:
        g_x = _to(torch.mm(dh_r, phi_c.t()).addcmul_(flat, coef, value=-1.0).reshape(x.shape), x.dtype)
    return (g_x, *_param_grads(dh_r, flat, *small_grads, phi, alpha, b_pre, b_post, b_res))


# ----------------------------------------------------------------------------- pre / post_res
def pre_forward(x: Tensor, h_pre: Tensor) -> Tensor:
    """``mhc::pre``: h_in = sum_i H_pre[i] X[i], (..., C) in x's dtype."""
    lead = x.shape[:-2]
    out = _ops().pre_fwd(_flat3(x), _coef(h_pre, lead, 1, compute_dtype(x.dtype)))
    return _rows(out, lead, x.shape[-1])


def pre_backward(grad: Tensor, x: Tensor, h_pre: Tensor):
    """``mhc::pre_backward``: gradients (x, h_pre)."""
    lead, c = x.shape[:-2], x.shape[-1]
    gx, gh = _ops().pre_bwd(_to(_flat2(grad, c), x.dtype), _flat3(x), _coef(h_pre, lead, 1, compute_dtype(x.dtype)))
    return _shaped(gx, x.shape), _reduce(gh, h_pre, lead)


def _flat2(t: Tensor, c: int) -> Tensor:
    return t if t.dim() == 2 else t.reshape(-1, c)


def post_res_forward(x: Tensor, h_out: Tensor, h_post: Tensor, h_res: Tensor) -> Tensor:
    """``mhc::post_res``: X' = H_res X + H_post h_out, (..., n, C) in x's dtype (h_out in x's dtype)."""
    lead, cd = x.shape[:-2], compute_dtype(x.dtype)
    out = _ops().post_res_fwd(
        _flat3(x), _flat2(h_out, x.shape[-1]), _coef(h_post, lead, 1, cd), _coef(h_res, lead, 2, cd)
    )
    return _shaped(out, x.shape)


def post_res_backward(grad: Tensor, x: Tensor, h_out: Tensor, h_post: Tensor, h_res: Tensor):
    """``mhc::post_res_backward``: gradients (x, h_out, h_post, h_res)."""
    lead, c, cd = x.shape[:-2], x.shape[-1], compute_dtype(x.dtype)
    gx, go, gp, gr = _ops().post_res_bwd(
        _to(_flat3(grad), x.dtype), _flat3(x), _flat2(h_out, c), _coef(h_post, lead, 1, cd), _coef(h_res, lead, 2, cd)
    )
    return _shaped(gx, x.shape), _shaped(go, h_out.shape), _reduce(gp, h_post, lead), _reduce(gr, h_res, lead)


def post_res_norm_forward(x: Tensor, h_out: Tensor, h_post: Tensor, h_res: Tensor, weight, bias, eps: float) -> Tensor:
    """A LayerNorm over C (``weight`` / ``bias`` of C elements in x's dtype, or None) on each stream of
    :func:`post_res_forward`'s X', in one pass per token (``post_res_norm_fwd`` of ``post_norm.cpp``);
    forward only (no autograd): the eager no-grad path of ``ops.post_res_norm``."""
    lead, cd = x.shape[:-2], compute_dtype(x.dtype)
    out = _ops().post_res_norm_fwd(
        _flat3(x), _flat2(h_out, x.shape[-1]), _coef(h_post, lead, 1, cd), _coef(h_res, lead, 2, cd), weight, bias, eps
    )
    return _shaped(out, x.shape)


def _reduce(g: Tensor, h: Tensor, lead: torch.Size) -> Tensor:
    """Per-token gradient (T, *per) -> h's shape (summing over broadcast token dims) and dtype."""
    g = _rows(g, lead, *g.shape[1:])
    if g.shape != h.shape:
        g = g.sum_to_size(h.shape)
    return _to(g, h.dtype)


# ----------------------------------------------------------------------------- boundary
def boundary_forward(x, h_out, h_post, h_res, phi, alpha, b_pre, b_post, b_res, iters: int, eps: float, variant: str,
                     keep: list | None = None):
    """``mhc::boundary``: (x_next, h_pre, h_post, h_res, h_in) of site l+1 (``keep``: :func:`site_start_forward`), in
    one pass over the streams per token block (``boundary_fwd`` of ``fused.cpp``: post_res, the
    projection, gates and pre while the block is in cache); the same bits as :func:`post_res_forward`,
    :func:`coeffs_forward` and :func:`pre_forward` in turn."""
    if not _fused(x.shape[-2]):
        xn = post_res_forward(x, h_out, h_post, h_res)
        hp, ho, hr = coeffs_forward(xn, phi, alpha, b_pre, b_post, b_res, iters, eps, variant, keep)
        return xn, hp, ho, hr, pre_forward(xn, hp)
    hc = _check_variant(variant)
    lead, n, c = x.shape[:-2], x.shape[-2], x.shape[-1]
    cd = compute_dtype(x.dtype)
    xn, hp, ho, hr, h_in, proj, rms = _ops().boundary_fwd(
        _flat3(x), _flat2(h_out, c), _coef(h_post, lead, 1, cd), _coef(h_res, lead, 2, cd),
        *_site_params(cd, phi, alpha, b_pre, b_post, b_res), eps, iters, hc)
    if keep is not None:
        keep.extend((proj, rms))
    return (_shaped(xn, x.shape), _rows(hp, lead, n), _rows(ho, lead, n), _rows(hr, lead, n, n), _rows(h_in, lead, c))


def boundary_backward(
    g_xn, g_hp, g_ho, g_hr, g_hin, x, h_out, h_post, h_res, phi, alpha, b_pre, b_post, b_res, iters: int, eps: float, variant: str,
    proj: Tensor | None = None, x_next: Tensor | None = None, h_pre_next: Tensor | None = None,
    rms: Tensor | None = None,
):
    """``mhc::boundary_backward``: gradients (x, h_out, h_post, h_res, phi, alpha, b_pre, b_post, b_res),
    the chain of :func:`mhc_compile.reference.boundary_backward` (x_next and H_pre recomputed unless the
    forward's are given: ``x_next``, ``h_pre_next``, the same bits) with one projection GEMM shared by
    H_pre and the coeffs backward, and the three x_next gradients (the next streams', pre's, coeffs')
    summed in the epilogue of the X-gradient GEMM (``coeffs_gx``; ``boundary_gx`` after aten's mm unfused)."""
    hc = _check_variant(variant)
    lead, n, c = x.shape[:-2], x.shape[-2], x.shape[-1]
    xn = post_res_forward(x, h_out, h_post, h_res) if x_next is None else x_next
    flat, proj, phi_c, small = _project(xn, phi, alpha, b_pre, b_post, b_res, proj)
    if h_pre_next is None:
        hp = _ops().coeffs_fwd(flat, proj, *small, eps, n, iters, hc)[0]
    else:
        hp = _flat2(h_pre_next, n)
    g_hin = _to(_flat2(g_hin, c), x.dtype)
    gp, go, gr = _gate_grads(g_hp, g_ho, g_hr, lead, n, flat.dtype)
    gp = gp + _ops().pre_grad_h(g_hin, _flat3(xn))
    dh_r, coef, *small_grads = _ops().coeffs_bwd(gp, go, gr, flat, proj, *small, eps, n, iters, hc, rms)
    g_xn = _to(_flat3(g_xn), x.dtype)
    if FUSED:
        gxn = _ops().coeffs_gx(dh_r, phi_c, _flat3(xn), coef, g_xn, g_hin, hp)
    else:
        gxn = _ops().boundary_gx(torch.mm(dh_r, phi_c.t()), _flat3(xn), coef, g_xn, g_hin, hp)
    return (*post_res_backward(_shaped(gxn, x.shape), x, h_out, h_post, h_res),
            *_param_grads(dh_r, flat, *small_grads, phi, alpha, b_pre, b_post, b_res))


# ----------------------------------------------------------------------------- the chain's ends
def expand_forward(x: Tensor, n: int) -> Tensor:
    """``reference.expand``: n copies of x (..., C) as (..., n, C), the same bits (``expand_fwd`` of
    ``ends.cpp``: the output from the kernels' output cache); forward only."""
    c = x.shape[-1]
    out = _ops().expand_fwd(_flat2(x, c), n)
    return out if x.dim() == 2 else out.view(*x.shape[:-1], n, c)


def collapse_forward(x: Tensor, mean: bool) -> Tensor:
    """``reference.collapse`` "mean" (``mean``) or "sum": (..., n, C) -> (..., C) in x's dtype (``collapse_fwd``
    of ``ends.cpp``); forward only."""
    out = _ops().collapse_fwd(_flat3(x), mean)
    return out if x.dim() == 3 else out.view(*x.shape[:-2], x.shape[-1])
