"""The two-pass backward of a site (issue #24): the coeffs dh kernel computes the pre-mix's dH_pre
from its own pass over X (``coeffs_backward(pre_grad=...)``, and H_pre recomputed for the gx
kernel's pre term), and the boundary backward reuses the forward's saved X' instead of
recomputing it (``boundary_backward(x_next=...)``).

Each is compared with autograd through the plain-torch reference evaluated in float64 from the
same inputs, for n in {1, 2, 3, 4, 8}, fp32 / bf16 / fp16, odd T and C (Triton interpreter on
CPU). Bound: ``max(4 * error of the reference run in the input's precision, tol * scale)``.
"""
import pytest
import torch

from mhc_compile import reference as R
from mhc_compile.kernels.coeffs import coeffs_backward

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TOL = 1e-5
LOWP_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
SHAPES = {1: (5, 7), 2: (3, 13), 3: (7, 5), 4: (5, 9), 8: (3, 5)}  # n -> (T, C), odd


def _site_inputs(T, n, C, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    J = 2 * n + n * n
    x = (torch.randn(T, n, C, generator=g) * 1.5).to(dtype)
    phi = torch.randn(n * C, J, generator=g) * (2.0 / (n * C) ** 0.5)
    alpha = torch.tensor([0.8, -1.2, 1.5]) + 0.3 * torch.randn(3, generator=g)
    b = [torch.randn(s, generator=g) for s in ((n,), (n,), (n, n))]
    return [x, phi, alpha, *b]


def _check(name, got, ref64, refnat, tol):
    got, ref64, refnat = got.double(), ref64.double(), refnat.double()
    assert torch.isfinite(got).all(), name
    err = (got - ref64).abs().max().item()
    bound = max(4.0 * (refnat - ref64).abs().max().item(), tol * max(ref64.abs().max().item(), 1e-30))
    assert err <= bound, f"{name}: error {err:.3e} > bound {bound:.3e}"


def _ref_site_grads(inputs, g_pre, g_post, g_res, g_hin, dtype):
    """Gradients of <g_pre, H_pre> + <g_post, H_post> + <g_res, H_res> + <g_hin, pre_mix(x, H_pre)>."""
    leaves = [(t if dtype is None else t.to(dtype)).detach().requires_grad_(True) for t in inputs]
    hp, ho, hr = R.coeffs(*leaves, iters=20, eps=1e-6)
    h_in = R.pre_mix(leaves[0], hp)
    loss = (hp * g_pre.to(hp.dtype)).sum() + (ho * g_post.to(ho.dtype)).sum() + (hr * g_res.to(hr.dtype)).sum() \
        + (h_in * g_hin.to(h_in.dtype)).sum()
    return torch.autograd.grad(loss, leaves)


# every n and dtype without another gradient of H_pre (g_pre None), and with one in fp32
PRE_CASES = [(n, d, False) for n in sorted(SHAPES) for d in DTYPES] + [(n, torch.float32, True) for n in sorted(SHAPES)]


@pytest.mark.parametrize("n,dtype,with_g_pre", PRE_CASES, ids=str)
def test_coeffs_backward_adds_pre_dh_from_its_own_pass(n, dtype, with_g_pre):
    T, C = SHAPES[n]
    inputs = _site_inputs(T, n, C, dtype, 10 * n + 1)
    gen = torch.Generator().manual_seed(n)
    g_pre = torch.randn(T, n, generator=gen) if with_g_pre else torch.zeros(T, n)
    g_post, g_res = torch.randn(T, n, generator=gen), torch.randn(T, n, n, generator=gen)
    g_hin = torch.randn(T, C, generator=gen).to(dtype)
    got = coeffs_backward(g_pre if with_g_pre else None, g_post, g_res, *inputs, 20, 1e-6, "mhc",
                          extra=(None, g_hin, None), pre_grad=g_hin)
    want64 = _ref_site_grads(inputs, g_pre, g_post, g_res, g_hin, torch.float64)
    wantnat = _ref_site_grads(inputs, g_pre, g_post, g_res, g_hin, None)
    for name, a, b, c, p in zip(("x", "phi", "alpha", "b_pre", "b_post", "b_res"), got, want64, wantnat, inputs):
        assert a.shape == p.shape and a.dtype == p.dtype, name
        _check(name, a, b, c, LOWP_TOL[dtype] if name == "x" else max(TOL, LOWP_TOL[dtype] / 10))


def _boundary_inputs(T, n, C, dtype, static, seed):
    g = torch.Generator().manual_seed(seed)
    rows = 1 if static else T
    x = torch.randn(T, n, C, generator=g).to(dtype)
    h_out = torch.randn(T, C, generator=g).to(dtype)
    h_post = 2 * torch.rand(rows, n, generator=g)
    h_res = torch.rand(rows, n, n, generator=g)
    h_res = h_res / h_res.sum(-1, keepdim=True)
    return [x, h_out, h_post, h_res, *_site_inputs(T, n, C, dtype, seed + 1)[1:]]


def _ref_boundary(inputs, grads, dtype):
    leaves = [(t if dtype is None else t.to(dtype)).detach().requires_grad_(True) for t in inputs]
    outs = R.boundary(*leaves, 20, 1e-6, "mhc")
    return [o.detach() for o in outs], torch.autograd.grad(outs, leaves, [g.to(o.dtype) for g, o in zip(grads, outs)])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", sorted(SHAPES))
def test_boundary_backward_from_saved_x_next(n, dtype):
    """Two passes from the forward's X' (no recompute): every gradient equals the float64 reference,
    and the recompute path (x_next None) gives the same up to rounding of the projection order."""
    from mhc_compile.kernels.boundary import boundary_backward, boundary_forward

    T, C = SHAPES[n]
    static = n in (2, 8)  # one row of site l's H_post / H_res (broadcast over tokens)
    inputs = _boundary_inputs(T, n, C, dtype, static, 20 * n + 3)
    gen = torch.Generator().manual_seed(n + 50)
    shapes = ((T, n, C), (T, n), (T, n), (T, n, n), (T, C))
    grads = [torch.randn(s, generator=gen).to(d) for s, d in zip(shapes, (dtype, torch.float32, torch.float32,
                                                                          torch.float32, dtype))]
    x_next = boundary_forward(*inputs, 20, 1e-6, "mhc")[0]
    got = boundary_backward(*grads, *inputs, 20, 1e-6, "mhc", x_next=x_next)
    # the recompute path (also in tests/test_kernel_boundary.py), here in fp32 only (time)
    again = boundary_backward(*grads, *inputs, 20, 1e-6, "mhc") if dtype == torch.float32 else got
    _, want64 = _ref_boundary(inputs, grads, torch.float64)
    _, wantnat = _ref_boundary(inputs, grads, None)
    names = ("x", "h_out", "h_post", "h_res", "phi", "alpha", "b_pre", "b_post", "b_res")
    for name, a, b, c, d, p in zip(names, got, want64, wantnat, again, inputs):
        assert a.shape == p.shape and a.dtype == p.dtype, name
        _check(name, a, b, c, LOWP_TOL[dtype])
        _check(name + " (recompute)", d, b, c, LOWP_TOL[dtype])


def test_boundary_op_saves_x_next_and_does_not_recompute(monkeypatch):
    """mhc::boundary's autograd hands the saved X' to the backward: the boundary forward kernel
    runs once (forward only), and the gradients equal the reference (perturbed parameters)."""
    import mhc_compile.ops  # noqa: F401  (registers the mhc:: ops)
    from mhc_compile.kernels import boundary as KB

    T, n, C = 6, 4, 9
    inputs = _boundary_inputs(T, n, C, torch.float32, False, 77)
    leaves = [t.clone().requires_grad_() for t in inputs]
    calls = []
    orig = KB.boundary_forward
    monkeypatch.setattr(KB, "boundary_forward", lambda *a, **k: (calls.append(1), orig(*a, **k))[1])
    outs = torch.ops.mhc.boundary(*leaves, 20, 1e-6, "mhc", "triton")
    gen = torch.Generator().manual_seed(5)
    grads = [torch.randn(o.shape, generator=gen) for o in outs]
    got = torch.autograd.grad(outs, leaves, grads)
    assert len(calls) == 1
    _, want = _ref_boundary(inputs, grads, torch.float64)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("n,dtype", [(1, torch.float32), (3, torch.bfloat16), (4, torch.float16), (8, torch.float32)],
                         ids=str)
def test_boundary_backward_with_next_mix(n, dtype):
    """``mix = (g, H)``: dX' gets H^T g (the next site's post_res mix, never written as a dX')
    instead of a given g_x_next; equal to the reference fed g_x_next = H^T g."""
    from mhc_compile.kernels.boundary import boundary_backward, boundary_forward

    T, C = SHAPES[n]
    inputs = _boundary_inputs(T, n, C, dtype, False, 30 * n + 1)
    gen = torch.Generator().manual_seed(n + 70)
    g_mix = torch.randn(T, n, C, generator=gen).to(dtype)
    h_mix = torch.rand(T, n, n, generator=gen)
    small = [torch.randn(s, generator=gen) for s in ((T, n), (T, n), (T, n, n))]
    g_hin = torch.randn(T, C, generator=gen).to(dtype)
    x_next = boundary_forward(*inputs, 20, 1e-6, "mhc")[0]
    got = boundary_backward(None, *small, g_hin, *inputs, 20, 1e-6, "mhc", x_next=x_next, mix=(g_mix, h_mix))
    g_xn = torch.einsum("tri,trc->tic", h_mix.double(), g_mix.double())
    _, want64 = _ref_boundary(inputs, [g_xn, *small, g_hin], torch.float64)
    _, wantnat = _ref_boundary(inputs, [g_xn.to(dtype), *small, g_hin], None)
    names = ("x", "h_out", "h_post", "h_res", "phi", "alpha", "b_pre", "b_post", "b_res")
    for name, a, b, c in zip(names, got, want64, wantnat):
        _check(name, a, b, c, LOWP_TOL[dtype])
