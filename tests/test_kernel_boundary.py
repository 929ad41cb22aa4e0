"""Tests of the fused boundary (post_res of site l + coeffs and pre of site l+1).

Covers the Triton kernel (mhc_compile/kernels/boundary.py, in the interpreter on CPU) against
the reference composition evaluated in float64, the ``mhc::boundary`` custom op (opcheck,
float64 gradcheck of its hand-chained reference backward, autograd through the Triton path),
``ops.boundary``'s return order, static paths and the coefficient recorder.
"""
import pytest
import torch

from mhc_compile import ops
from mhc_compile import reference as R
from mhc_compile.kernels.boundary import boundary_backward, boundary_forward

TOL = 1e-5
LOWP_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
NAMES_OUT = ("x_next", "h_pre", "h_post", "h_res", "h_in")
NAMES_IN = ("x", "h_out", "h_post", "h_res", "phi", "alpha", "b_pre", "b_post", "b_res")


def make_inputs(T, n, C, dtype, static=False, device="cpu"):
    g = torch.Generator().manual_seed(100 * n + C + 7 * T)
    J = 2 * n + n * n
    R = 1 if static else T
    x = torch.randn(T, n, C, generator=g).to(dtype)
    h_out = torch.randn(T, C, generator=g).to(dtype)
    h_post = 2 * torch.rand(R, n, generator=g)
    h_res = torch.rand(R, n, n, generator=g)
    h_res = h_res / h_res.sum(-1, keepdim=True)
    phi = torch.randn(n * C, J, generator=g) * (2.0 / (n * C) ** 0.5)
    alpha = torch.tensor([0.9, -1.1, 1.4])
    b_pre, b_post, b_res = torch.randn(n, generator=g), torch.randn(n, generator=g), torch.randn(n, n, generator=g)
    return [t.to(device) for t in (x, h_out, h_post, h_res, phi, alpha, b_pre, b_post, b_res)]


def out_grads(T, n, C, dtype, device="cpu"):
    g = torch.Generator().manual_seed(11)
    shapes = ((T, n, C), (T, n), (T, n), (T, n, n), (T, C))
    dts = (dtype, torch.float32, torch.float32, torch.float32, dtype)
    return [torch.randn(s, generator=g).to(d).to(device) for s, d in zip(shapes, dts)]


def reference(inputs, grads, iters, variant, dtype):
    """Reference composition (autograd) with the float inputs in ``dtype`` (None: as given)."""
    leaves = [(t if dtype is None else t.to(dtype)).detach().requires_grad_(True) for t in inputs]
    outs = R.boundary(*leaves, iters, 1e-6, variant)
    g = torch.autograd.grad(outs, leaves, [gr.to(o.dtype) for gr, o in zip(grads, outs)])
    return [o.detach() for o in outs], list(g)


def assert_close(name, got, ref64, refnat, tol):
    """Kernel error vs float64 <= max(4 x error of the reference run in the input precision, tol x scale)."""
    got, ref64, refnat = got.double(), ref64.double(), refnat.double()
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = (got - ref64).abs().max().item()
    yard = (refnat - ref64).abs().max().item()
    scale = max(ref64.abs().max().item(), 1e-30)
    bound = max(4.0 * yard, tol * scale)
    assert err <= bound, f"{name}: error {err:.3e} > bound {bound:.3e} (native-precision reference error {yard:.3e})"


CASES = [
    # T, n, C, dtype, variant, static previous coefficients
    (5, 4, 7, torch.float32, "mhc", False),
    (1, 1, 1, torch.float32, "mhc", True),
    (8, 3, 40, torch.float32, "hc", False),  # C not a multiple of BLOCK_C
    (3, 8, 5, torch.float32, "mhc", True),
    (20, 2, 3, torch.float32, "mhc", False),  # two token blocks
    (4, 2, 18, torch.float16, "mhc", False),
    (3, 8, 3, torch.float16, "hc", True),
    (17, 8, 11, torch.bfloat16, "mhc", False),  # n = 8, odd T and C: two token blocks, masked tails
    (9, 5, 7, torch.float32, "hc", False),  # n = 5 (n_pad = 8, padded streams)
]


@pytest.mark.parametrize("T,n,C,dtype,variant,static", CASES)
def test_kernel_matches_float64_reference(T, n, C, dtype, variant, static, device="cpu"):
    inputs = make_inputs(T, n, C, dtype, static, device)
    grads = out_grads(T, n, C, dtype, device)
    out = boundary_forward(*inputs, 20, 1e-6, variant)
    o64, g64 = reference(inputs, grads, 20, variant, torch.float64)
    onat, gnat = reference(inputs, grads, 20, variant, None)
    for name, a, b, c in zip(NAMES_OUT, out, o64, onat):
        assert a.shape == c.shape and a.dtype == c.dtype, name
        assert_close(name, a, b, c, LOWP_TOL[dtype] if name in ("x_next", "h_in") else TOL)
    kg = boundary_backward(*grads, *inputs, 20, 1e-6, variant)
    for name, a, b, c, p in zip(NAMES_IN, kg, g64, gnat, inputs):
        assert a.shape == p.shape and a.dtype == p.dtype, name
        # every gradient flows through dX', which is rounded to x's dtype (like the unfused ops)
        assert_close("grad " + name, a, b, c, LOWP_TOL[dtype])


def test_mix_cuda_tiles_match_float64_reference_in_interpreter(monkeypatch):
    """The boundary backward's mix kernel with its CUDA tiles at n_pad = 8 (16 tokens x 4
    channels per stream, chosen for sm_90 registers; X' recomputed) in the interpreter: two token
    blocks, C chunks with masked tails (odd T and C), perturbed coefficients, float64 bounds."""
    from mhc_compile.kernels import boundary_bwd

    orig = boundary_bwd.mix_config
    monkeypatch.setattr(boundary_bwd, "mix_config", lambda n, gpu: orig(n, True))
    assert orig(8, True) == (dict(BT=16, BC=4, XREC=True), 4)
    test_kernel_matches_float64_reference(21, 8, 9, torch.float32, "mhc", False)


@pytest.mark.parametrize("T,n,C,dtype,static", [(21, 8, 13, torch.bfloat16, False), (19, 4, 11, torch.float16, True),
                                                (7, 6, 5, torch.float32, False)])
def test_mix_recomputed_x_next_equals_the_saved_one(monkeypatch, T, n, C, dtype, static):
    """XREC (n >= 4): the mix kernel recomputes X' = H_res X + H_post h_out from the X and h_out
    tiles it reads anyway, in the forward's fp32 order and rounding, instead of reading the saved
    X': every gradient is bitwise the one computed from the saved X' (XREC off)."""
    from mhc_compile.kernels import boundary_bwd

    inputs = make_inputs(T, n, C, dtype, static)
    grads = out_grads(T, n, C, dtype)
    x_next = boundary_forward(*inputs, 20, 1e-6, "mhc")[0]
    orig = boundary_bwd.mix_config
    assert orig(n, False)[0]["XREC"] and orig(n, True)[0]["XREC"] and not orig(3, True)[0]["XREC"]
    got = boundary_backward(*grads, *inputs, 20, 1e-6, "mhc", x_next=x_next)
    monkeypatch.setattr(boundary_bwd, "mix_config", lambda n_, gpu: (dict(orig(n_, gpu)[0], XREC=False), 1))
    read = boundary_backward(*grads, *inputs, 20, 1e-6, "mhc", x_next=x_next)
    for name, a, b in zip(NAMES_IN, got, read):
        assert torch.equal(a, b), name


def test_op_triton_autograd_matches_reference():
    T, n, C = 6, 3, 5
    inputs = make_inputs(T, n, C, torch.float32)
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    x = leaves[0].reshape(2, 3, n, C)
    h_out = leaves[1].reshape(2, 3, C)
    outs = ops.boundary(x, h_out, leaves[2].reshape(2, 3, n), leaves[3].reshape(2, 3, n, n), *leaves[4:], kernels="triton")
    assert [tuple(o.shape) for o in outs] == [(2, 3, n, C), (2, 3, n), (2, 3, n), (2, 3, n, n), (2, 3, C)]
    grads = out_grads(T, n, C, torch.float32)
    torch.autograd.backward(outs, [g.reshape(o.shape) for g, o in zip(grads, outs)])
    o64, g64 = reference(inputs, grads, 20, "mhc", torch.float64)
    onat, gnat = reference(inputs, grads, 20, "mhc", None)
    for name, a, b, c in zip(NAMES_OUT, outs, o64, onat):
        assert_close(name, a.detach().reshape(b.shape), b, c, TOL)
    for name, leaf, b, c in zip(NAMES_IN, leaves, g64, gnat):
        assert_close("grad " + name, leaf.grad, b, c, TOL)


def test_ops_boundary_reference_equals_composition_and_records():
    T, n, C = 4, 3, 6
    x, h_out, h_post, h_res, phi, alpha, bp, bo, br = make_inputs(T, n, C, torch.float32)
    with ops.record_coeffs() as rec:
        fused = ops.boundary(x, h_out, h_post, h_res, phi, alpha, bp, bo, br, kernels="reference")
    xn = ops.post_res(x, h_out, h_post, h_res, kernels="reference")
    hp, ho, hr = ops.coeffs(xn, phi, alpha, bp, bo, br, kernels="reference")
    composed = (xn, hp, ho, hr, ops.pre(xn, hp, kernels="reference"))
    for a, b in zip(fused, composed):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert len(rec) == 1 and all(torch.equal(a, b) for a, b in zip(rec[0], (hp, ho, hr)))
    with ops.record_coeffs() as rec:
        ops.boundary(x, h_out, h_post, h_res, phi, alpha, bp, bo, br, kernels="triton")
    assert len(rec) == 1
    torch.testing.assert_close(rec[0][2], hr, rtol=1e-5, atol=1e-6)


def test_ops_boundary_static_next_site():
    T, n, C = 3, 2, 4
    x, h_out, h_post, h_res, _, _, bp, bo, br = make_inputs(T, n, C, torch.float32)
    outs = ops.boundary(x, h_out, h_post, h_res, None, None, bp, bo, br, dynamic=False, kernels="reference")
    assert outs[1].shape == (1, n) and outs[3].shape == (1, n, n)
    torch.testing.assert_close(outs[4], (torch.sigmoid(bp)[:, None] * outs[0]).sum(-2))


@pytest.mark.parametrize("static", [False, True])
def test_opcheck_boundary_reference(static):
    inputs = make_inputs(3, 2, 4, torch.float32, static)
    inputs = [t.requires_grad_(True) for t in inputs]
    torch.library.opcheck(torch.ops.mhc.boundary.default, (*inputs, 3, 1e-6, "mhc", "reference"))


@pytest.mark.parametrize("variant,static", [("mhc", False), ("mhc", True), ("hc", False)])
def test_gradcheck_boundary_reference_float64(variant, static):
    inputs = [t.double().requires_grad_(True) for t in make_inputs(2, 2, 3, torch.float64, static)]
    fn = lambda *a: torch.ops.mhc.boundary(*a, 5, 1e-6, variant, "reference")
    assert torch.autograd.gradcheck(fn, inputs)


def test_every_output_element_is_written():
    T, n, C = 5, 3, 7
    inputs = make_inputs(T, n, C, torch.float16)
    out = (
        torch.full((T, n, C), float("nan"), dtype=torch.float16),
        torch.full((T, n), float("nan")),
        torch.full((T, n), float("nan")),
        torch.full((T, n, n), float("nan")),
        torch.full((T, C), float("nan"), dtype=torch.float16),
    )
    got = boundary_forward(*inputs, 20, 1e-6, "mhc", out=out)
    assert all(a is b for a, b in zip(got, out))
    assert all(torch.isfinite(o).all() for o in out)


def test_extreme_logits_stay_finite():
    T, n, C = 4, 4, 5
    x, h_out, h_post, h_res, phi, alpha, bp, bo, br = make_inputs(T, n, C, torch.float32)
    phi = phi * 300
    sgn = lambda t: torch.where(torch.arange(t.numel()).reshape(t.shape) % 3 == 0, 1.0, -1.0)
    bp, bo, br = 1e4 * sgn(bp), -1e4 * sgn(bo), 1e4 * sgn(br)
    args = (x, h_out, h_post, h_res, phi, alpha, bp, bo, br)
    outs = boundary_forward(*args, 20, 1e-6, "mhc")
    assert all(torch.isfinite(o).all() for o in outs)
    ref = R.boundary(*args, 20, 1e-6, "mhc")
    torch.testing.assert_close(outs[3], ref[3], rtol=1e-5, atol=1e-5)
    grads = boundary_backward(*out_grads(T, n, C, torch.float32), *args, 20, 1e-6, "mhc")
    assert all(torch.isfinite(g).all() for g in grads)


# ---------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
@pytest.mark.parametrize("T,n,C,variant,static", [(300, 4, 1000, "mhc", False), (77, 8, 257, "mhc", True), (65, 1, 64, "hc", False)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_matches_float64_reference(T, n, C, variant, static, dtype):
    test_kernel_matches_float64_reference(T, n, C, dtype, variant, static, device="cuda")


@pytest.mark.gpu
def test_cuda_every_output_element_is_written():
    T, n, C = 333, 4, 300
    inputs = make_inputs(T, n, C, torch.bfloat16, device="cuda")
    shapes = ((T, n, C), (T, n), (T, n), (T, n, n), (T, C))
    dts = (torch.bfloat16, torch.float32, torch.float32, torch.float32, torch.bfloat16)
    out = tuple(torch.full(s, float("nan"), dtype=d, device="cuda") for s, d in zip(shapes, dts))
    boundary_forward(*inputs, 20, 1e-6, "mhc", out=out)
    assert all(torch.isfinite(o).all() for o in out)


def test_triton_path_under_torch_compile_fullgraph():
    """mhc::boundary (Triton path) traces into one graph (fake impl, autograd) and matches eager."""
    T, n, C = 4, 2, 6
    inputs = make_inputs(T, n, C, torch.float32)

    def run(fn):
        leaves = [t.clone().requires_grad_(True) for t in inputs]
        outs = fn(*leaves)
        loss = sum((o.float() * torch.linspace(-1, 1, o.numel()).reshape(o.shape)).sum() for o in outs)
        loss.backward()
        return [o.detach() for o in outs], [l.grad for l in leaves]

    eager = lambda *a: ops.boundary(*a, kernels="triton")
    compiled = torch.compile(eager, backend="aot_eager", fullgraph=True)
    (o1, g1), (o2, g2) = run(eager), run(compiled)
    for a, b in zip(o1 + g1, o2 + g2):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
