"""The mHC math of DESIGN.md section 1 in plain torch: the spec every kernel is tested against.

Layout. A stream tensor ``X`` has shape ``(..., n, C)``: any leading token dims, then the
``n`` streams, then the ``C`` features, so one token's ``vec(X)`` is the contiguous,
stream-major ``n*C`` vector. Coefficients have shapes ``(..., n)`` and ``(..., n, n)``
(per token); static coefficients (``dynamic=False``) have all leading dims of size 1 so they
broadcast over tokens.

Precision. ``X`` stays in the model dtype. RMS, the projection, every coefficient and the
whole Sinkhorn loop run in float32 (float64 when the input is float64, for gradcheck).
Mixing accumulates in that compute dtype and rounds once to the dtype of ``X``.

Everything here is differentiable by plain autograd; ``mhc_compile.ops`` wraps it as
custom ops whose backward recomputes instead of storing.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

SIGMOID_NEG3 = 1.0 / (1.0 + math.exp(3.0))  # sigma(-3), the off-home pre-gate at init
_LOGIT_CLAMP = 20.0  # sigma(20) rounds to 1.0 in float32
# Sinkhorn logits more than this far below the matrix max are clamped to max - SPREAD, so
# exp() never underflows a whole row or column to zero (which would divide 0 by 0). exp(-50)
# ~ 2e-22 is far above float32's smallest normal; spreads under 50 are unaffected.
SINKHORN_LOGIT_SPREAD = 50.0


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs, float64 for float64 (gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


def num_logits(n: int) -> int:
    """Width of the projection phi: n pre + n post + n*n res logits."""
    return 2 * n + n * n


# ----------------------------------------------------------------------------- pieces
def _flat_rms(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``vec(X)`` (..., nC) in the compute dtype and its RMS ``sqrt(mean(vec(X)^2) + eps)`` (..., 1)."""
    flat = x.to(compute_dtype(x.dtype)).reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])
    return flat, torch.sqrt(flat.pow(2).mean(-1, keepdim=True) + eps)


def _dynamic_logits(x, phi, alpha, b_pre, b_post, b_res, eps, variant):
    """Everything dynamic :func:`coeffs` computes before the activations, shared with its backward.

    Returns ``(flat, r, h_raw, h, (z_pre, z_post, z_res))``: vec(X), its RMS, the projection
    ``h_raw = (vec(X) . phi) / r`` (shape (..., 2n+n^2)), ``h`` (``tanh(h_raw)`` for hc), and the gate logits ``alpha * h + b``.
    """
    n = x.shape[-2]
    flat, r = _flat_rms(x, eps)
    cd = flat.dtype
    h_raw = (flat @ phi.to(cd)) / r
    h = torch.tanh(h_raw) if variant == "hc" else h_raw
    a = alpha.to(cd)
    z = (
        a[0] * h[..., :n] + b_pre.to(cd),
        a[1] * h[..., n : 2 * n] + b_post.to(cd),
        a[2] * h[..., 2 * n :].unflatten(-1, (n, n)) + b_res.to(cd),
    )
    return flat, r, h_raw, h, z


def _sinkhorn_start(logits: Tensor) -> tuple[Tensor, Tensor]:
    """``(logits - max, exp(clamp(logits - max, -SPREAD)))``: Sinkhorn's starting matrix."""
    shifted = logits - logits.amax(dim=(-2, -1), keepdim=True)
    return shifted, torch.exp(torch.clamp(shifted, min=-SINKHORN_LOGIT_SPREAD))


def sinkhorn(logits: Tensor, iters: int) -> Tensor:
    """Sinkhorn-Knopp on ``exp(logits - max)``; each iteration normalises columns then rows.

    Ending on the row normalisation makes every row sum to 1 to rounding, so ``H @ (x,...,x)``
    returns the copies unchanged. Subtracting the per-matrix max keeps any logit finite, and
    clamping the spread at ``SINKHORN_LOGIT_SPREAD`` keeps every row and column sum nonzero.
    """
    _, m = _sinkhorn_start(logits)
    for _ in range(iters):
        m = m / m.sum(dim=-2, keepdim=True)
        m = m / m.sum(dim=-1, keepdim=True)
    return m


def activate(
    pre_logit: Tensor, post_logit: Tensor, res_logit: Tensor, *, iters: int, variant: str
) -> tuple[Tensor, Tensor, Tensor]:
    """Map gate logits (already scaled by alpha and shifted by the biases) to H_pre, H_post, H_res."""
    if variant == "mhc":
        return torch.sigmoid(pre_logit), 2.0 * torch.sigmoid(post_logit), sinkhorn(res_logit, iters)
    if variant == "hc":
        return pre_logit, post_logit, res_logit
    raise ValueError(f"unknown variant {variant!r}; expected 'mhc' or 'hc'")


def coeffs(
    x: Tensor,
    phi: Optional[Tensor],
    alpha: Optional[Tensor],
    b_pre: Tensor,
    b_post: Tensor,
    b_res: Tensor,
    *,
    iters: int = 20,
    eps: float = 1e-6,
    variant: str = "mhc",
    dynamic: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """H_pre (..., n), H_post (..., n), H_res (..., n, n) for streams ``x`` of shape (..., n, C).

    dynamic=True:  H~ = alpha * h + b, h = vec(X).phi / RMS(vec(X)) (tanh of it for ``hc``).
    dynamic=False: H~ = b, one set for the site, shaped (1,...,1, n) / (1,...,1, n, n).
    """
    n = x.shape[-2]
    cd = compute_dtype(x.dtype)
    b_pre, b_post, b_res = b_pre.to(cd), b_post.to(cd), b_res.to(cd)
    if dynamic:
        if phi is None or alpha is None:
            raise ValueError("dynamic coefficients need phi and alpha")
        *_, (pre, post, res) = _dynamic_logits(x, phi, alpha, b_pre, b_post, b_res, eps, variant)
    else:
        lead = (1,) * (x.dim() - 2)
        pre, post, res = b_pre.reshape(*lead, n), b_post.reshape(*lead, n), b_res.reshape(*lead, n, n)
    return activate(pre, post, res, iters=iters, variant=variant)


def pre_mix(x: Tensor, h_pre: Tensor) -> Tensor:
    """``h_in = sum_i H_pre[i] X[i]``: (..., n, C) x (..., n) -> (..., C) in the dtype of x."""
    cd = compute_dtype(x.dtype)
    return (h_pre.to(cd).unsqueeze(-1) * x.to(cd)).sum(dim=-2).to(x.dtype)


def post_res_mix(x: Tensor, h_out: Tensor, h_post: Tensor, h_res: Tensor) -> Tensor:
    """``X'[i] = sum_j H_res[i,j] X[j] + H_post[i] h_out``: returns (..., n, C) in the dtype of x."""
    cd = compute_dtype(x.dtype)
    mixed = torch.matmul(h_res.to(cd), x.to(cd))
    return (mixed + h_post.to(cd).unsqueeze(-1) * h_out.to(cd).unsqueeze(-2)).to(x.dtype)


def expand(x: Tensor, n: int) -> Tensor:
    """Start of a stream: n copies of x, shape (..., n, C)."""
    return x.unsqueeze(-2).expand(*x.shape[:-1], n, x.shape[-1]).contiguous()


def collapse(x: Tensor, mode: str = "mean", weight: Optional[Tensor] = None) -> Tensor:
    """End of a stream: (..., n, C) -> (..., C) by mean, sum, or ``sum_i sigmoid(w_i) X[i]``."""
    if mode == "mean":
        return x.mean(dim=-2)
    if mode == "sum":
        return x.sum(dim=-2)
    if mode == "learned":
        if weight is None:
            raise ValueError("collapse='learned' needs a weight")
        return pre_mix(x, torch.sigmoid(weight.to(compute_dtype(x.dtype))))
    raise ValueError(f"unknown collapse {mode!r}; expected 'mean', 'sum' or 'learned'")


def site(
    x: Tensor,
    f,
    params: dict,
    *,
    iters: int = 20,
    eps: float = 1e-6,
    variant: str = "mhc",
    dynamic: bool = True,
) -> Tensor:
    """One whole residual site on streams ``x``: coefficients, pre-mix, branch ``f``, post/res-mix."""
    h_pre, h_post, h_res = coeffs(
        x,
        params.get("phi"),
        params.get("alpha"),
        params["b_pre"],
        params["b_post"],
        params["b_res"],
        iters=iters,
        eps=eps,
        variant=variant,
        dynamic=dynamic,
    )
    return post_res_mix(x, f(pre_mix(x, h_pre)), h_post, h_res)


# ----------------------------------------------------------------------------- backward
# Hand-written backward passes: the spec for the kernels' backward, and what the ops run on
# the reference path (custom-op implementations run below autograd, so they cannot call it).
# Each recomputes what the forward computed (normalised x, logits, every Sinkhorn iterate)
# from the op inputs. Tests check them against autograd of the forward functions.
def _sum_to(t: Tensor, shape) -> Tensor:
    """Reduce a broadcast gradient to the coefficient's own (possibly size-1) shape."""
    return t.sum_to_size(shape) if t.shape != shape else t


def sinkhorn_backward(grad: Tensor, logits: Tensor, iters: int) -> Tensor:
    """d loss / d logits of ``sinkhorn(logits, iters)``, replaying the iterations."""
    shifted, m0 = _sinkhorn_start(logits)
    m, steps = m0, []
    for _ in range(iters):
        c = m.sum(dim=-2, keepdim=True)
        a = m / c
        r = a.sum(dim=-1, keepdim=True)
        m = a / r
        steps.append((c, a, r, m))
    g = grad
    for c, a, r, m in reversed(steps):
        g = (g - (g * m).sum(dim=-1, keepdim=True)) / r  # M = A / rowsum(A)
        g = (g - (g * a).sum(dim=-2, keepdim=True)) / c  # A = M_prev / colsum(M_prev)
    dz = torch.where(shifted >= -SINKHORN_LOGIT_SPREAD, g * m0, torch.zeros_like(g))
    # max subtraction: autograd routes -sum(dz) to the argmax (shared among ties)
    is_max = (logits == logits.amax(dim=(-2, -1), keepdim=True)).to(dz.dtype)
    is_max = is_max / is_max.sum(dim=(-2, -1), keepdim=True)
    return dz - is_max * dz.sum(dim=(-2, -1), keepdim=True)


def coeffs_backward(
    g_pre: Tensor,
    g_post: Tensor,
    g_res: Tensor,
    x: Tensor,
    phi: Tensor,
    alpha: Tensor,
    b_pre: Tensor,
    b_post: Tensor,
    b_res: Tensor,
    *,
    iters: int = 20,
    eps: float = 1e-6,
    variant: str = "mhc",
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (x, phi, alpha, b_pre, b_post, b_res) of dynamic :func:`coeffs`."""
    n, c = x.shape[-2], x.shape[-1]
    flat, r, h_raw, h, (z_pre, z_post, z_res) = _dynamic_logits(x, phi, alpha, b_pre, b_post, b_res, eps, variant)
    cd, a = flat.dtype, alpha.to(flat.dtype)
    hp, ho, hr = h[..., :n], h[..., n : 2 * n], h[..., 2 * n :].unflatten(-1, (n, n))
    g_pre, g_post, g_res = g_pre.to(cd), g_post.to(cd), g_res.to(cd)
    if variant == "mhc":
        s_pre, s_post = torch.sigmoid(z_pre), torch.sigmoid(z_post)
        d_pre = g_pre * s_pre * (1 - s_pre)
        d_post = 2.0 * g_post * s_post * (1 - s_post)
        d_res = sinkhorn_backward(g_res, z_res, iters)
    elif variant == "hc":
        d_pre, d_post, d_res = g_pre, g_post, g_res
    else:
        raise ValueError(f"unknown variant {variant!r}")
    lead = tuple(range(d_pre.dim() - 1))
    g_b_pre, g_b_post = d_pre.sum(lead), d_post.sum(lead)
    g_b_res = d_res.sum(lead)
    g_alpha = torch.stack([(d_pre * hp).sum(), (d_post * ho).sum(), (d_res * hr).sum()])
    dh = torch.cat([a[0] * d_pre, a[1] * d_post, a[2] * d_res.flatten(-2)], dim=-1)
    if variant == "hc":
        dh = dh * (1 - h * h)
    g_phi = (flat / r).reshape(-1, n * c).T @ dh.reshape(-1, dh.shape[-1])
    g_flat = (dh @ phi.to(cd).T) / r - (dh * h_raw).sum(-1, keepdim=True) * flat / (n * c * r * r)
    return (
        g_flat.reshape(x.shape).to(x.dtype),
        g_phi.to(phi.dtype),
        g_alpha.to(alpha.dtype),
        g_b_pre.to(b_pre.dtype),
        g_b_post.to(b_post.dtype),
        g_b_res.to(b_res.dtype),
    )


def pre_mix_backward(grad: Tensor, x: Tensor, h_pre: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients (x, h_pre) of :func:`pre_mix`; a broadcast h_pre gets its gradient summed."""
    cd = compute_dtype(x.dtype)
    g = grad.to(cd).unsqueeze(-2)
    g_x = (h_pre.to(cd).unsqueeze(-1) * g).to(x.dtype)
    g_h = _sum_to((g * x.to(cd)).sum(-1), h_pre.shape).to(h_pre.dtype)
    return g_x, g_h


def post_res_mix_backward(
    grad: Tensor, x: Tensor, h_out: Tensor, h_post: Tensor, h_res: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients (x, h_out, h_post, h_res) of :func:`post_res_mix`."""
    cd = compute_dtype(x.dtype)
    g = grad.to(cd)
    hp, hr = h_post.to(cd), h_res.to(cd)
    g_x = torch.matmul(hr.transpose(-1, -2), g).to(x.dtype)
    g_out = (hp.unsqueeze(-1) * g).sum(-2)
    g_out = _sum_to(g_out, h_out.shape).to(h_out.dtype)
    g_post = _sum_to((g * h_out.to(cd).unsqueeze(-2)).sum(-1), h_post.shape).to(h_post.dtype)
    g_res = _sum_to(torch.matmul(g, x.to(cd).transpose(-1, -2)), h_res.shape).to(h_res.dtype)
    return g_x, g_out, g_post, g_res


def boundary(x, h_out, h_post, h_res, phi, alpha, b_pre, b_post, b_res, iters, eps, variant):
    """post_res_mix -> coeffs -> pre_mix in plain torch: (x_next, h_pre, h_post, h_res, h_in)."""
    xn = post_res_mix(x, h_out, h_post, h_res)
    hp, ho, hr = coeffs(xn, phi, alpha, b_pre, b_post, b_res, iters=iters, eps=eps, variant=variant, dynamic=True)
    return xn, hp, ho, hr, pre_mix(xn, hp)


def boundary_backward(
    g_xn, g_hp, g_ho, g_hr, g_hin, x, h_out, h_post, h_res, phi, alpha, b_pre, b_post, b_res, iters, eps, variant
):
    """Hand-chained reference backwards of :func:`boundary` (recomputes x_next, h_pre).

    Returns gradients for (x, h_out, h_post, h_res, phi, alpha, b_pre, b_post, b_res). The three
    contributions to d x_next are summed in the compute dtype and rounded once.
    """
    cd = compute_dtype(x.dtype)
    xn = post_res_mix(x, h_out, h_post, h_res)
    hp, _, _ = coeffs(xn, phi, alpha, b_pre, b_post, b_res, iters=iters, eps=eps, variant=variant, dynamic=True)
    gxn_pre, ghp_pre = pre_mix_backward(g_hin, xn, hp)
    gxn_c, *gparams = coeffs_backward(
        g_hp.to(cd) + ghp_pre.to(cd), g_ho, g_hr, xn, phi, alpha, b_pre, b_post, b_res,
        iters=iters, eps=eps, variant=variant,
    )
    gxn = (g_xn.to(cd) + gxn_pre.to(cd) + gxn_c.to(cd)).to(x.dtype)
    return (*post_res_mix_backward(gxn, x, h_out, h_post, h_res), *gparams)


# ----------------------------------------------------------------------------- init
def home_stream(site_index: int, n: int) -> int:
    """The stream that site ``site_index`` mostly reads at init (symmetry breaking)."""
    return site_index % n


def _logit(p: float) -> float:
    if p >= 1.0:
        return _LOGIT_CLAMP
    if p <= 0.0:
        return -_LOGIT_CLAMP
    return max(-_LOGIT_CLAMP, min(_LOGIT_CLAMP, math.log(p / (1.0 - p))))


def init_biases(
    n: int, site_index: int, *, variant: str = "mhc", init: str = "preserve", dtype=torch.float32
) -> dict[str, Tensor]:
    """b_pre (n,), b_post (n,), b_res (n, n) for site ``site_index``.

    mhc/preserve: H_pre puts 1-(n-1)sigma(-3) on the home stream and sigma(-3) elsewhere (sums to 1,
    asymmetric), H_post = 1, H_res ~ identity (b_res = 6I - 3). With copied streams the site
    then computes exactly x + f(x).
    mhc/paper: zero biases.
    hc (either init): b_pre one-hot on the home stream, b_post = 1, b_res = I.
    """
    k = home_stream(site_index, n)
    eye = torch.eye(n, dtype=dtype)
    if variant == "hc":
        b_pre = torch.zeros(n, dtype=dtype)
        b_pre[k] = 1.0
        return {"b_pre": b_pre, "b_post": torch.ones(n, dtype=dtype), "b_res": eye}
    if variant != "mhc":
        raise ValueError(f"unknown variant {variant!r}")
    if init == "paper":
        return {"b_pre": torch.zeros(n, dtype=dtype), "b_post": torch.zeros(n, dtype=dtype), "b_res": torch.zeros(n, n, dtype=dtype)}
    if init != "preserve":
        raise ValueError(f"unknown init {init!r}")
    b_pre = torch.full((n,), -3.0, dtype=dtype)
    b_pre[k] = _logit(1.0 - (n - 1) * SIGMOID_NEG3)
    return {"b_pre": b_pre, "b_post": torch.zeros(n, dtype=dtype), "b_res": 6.0 * eye - 3.0}


def init_site_params(
    n: int,
    channels: int,
    site_index: int,
    *,
    variant: str = "mhc",
    init: str = "preserve",
    dynamic: bool = True,
    alpha_init: float = 0.01,
    generator: Optional[torch.Generator] = None,
    dtype=torch.float32,
) -> dict[str, Tensor]:
    """All parameters of one site: biases, plus phi (nC, 2n+n^2) and alpha (3,) when dynamic.

    ``init="preserve"`` sets phi = 0 (gradients still reach it through alpha); ``"paper"`` draws
    phi xavier-uniform.
    """
    params = init_biases(n, site_index, variant=variant, init=init, dtype=dtype)
    if dynamic:
        phi = torch.zeros(n * channels, num_logits(n), dtype=dtype)
        if init == "paper":
            bound = math.sqrt(6.0 / (n * channels + num_logits(n)))
            phi.uniform_(-bound, bound, generator=generator)
        params["phi"] = phi
        params["alpha"] = torch.full((3,), float(alpha_init), dtype=dtype)
    return params


def init_collapse_weight(n: int, dtype=torch.float32) -> Tensor:
    """Learned collapse weights with sigmoid(w) = 1/n, so the learned collapse starts as the mean."""
    return torch.full((n,), _logit(1.0 / n), dtype=dtype)
