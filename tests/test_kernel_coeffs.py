"""Tests of the fused Triton coeffs kernels (mhc_compile/kernels/coeffs.py).

On CPU they run in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1) on tiny
shapes; the gpu-marked tests repeat them in bf16 and on larger shapes on CUDA. Every result is
compared with ``reference.coeffs`` evaluated in float64 from the same inputs. The bound is
``max(4 * error of the float32 reference, tol * scale)``: the kernel must be as accurate as
running the reference in the input's own precision (which matters where a gradient is a
cancellation of two large terms), and within ``tol`` relative otherwise.
"""
import pytest
import torch

from mhc_compile import ops, reference
from mhc_compile.kernels.coeffs import coeffs_backward, coeffs_forward

TOL = {torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}
GX_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # gx is rounded to x's dtype


def make_inputs(T, n, C, dtype, device="cpu", scale=1.0, bias=1.0):
    """Random nonzero inputs with O(1) logits so every term of the math matters."""
    g = torch.Generator().manual_seed(1000 * n + 10 * C + T)
    J = 2 * n + n * n
    x = (torch.randn(T, n, C, generator=g) * 1.5).to(dtype)
    phi = torch.randn(n * C, J, generator=g) * (2.0 * scale / (n * C) ** 0.5)
    alpha = torch.tensor([0.8, -1.2, 1.5])
    b_pre = torch.randn(n, generator=g) * bias
    b_post = torch.randn(n, generator=g) * bias
    b_res = torch.randn(n, n, generator=g) * bias
    return [t.to(device) for t in (x, phi, alpha, b_pre, b_post, b_res)]


def ref_grads(inputs, grads, iters, eps, variant, dtype):
    """(outputs, input grads) of the reference via autograd, computed in ``dtype`` for the float inputs."""
    x = inputs[0]
    leaves = [(t.to(torch.float64) if dtype == torch.float64 else t).detach().requires_grad_(True) for t in inputs]
    outs = reference.coeffs(*leaves, iters=iters, eps=eps, variant=variant, dynamic=True)
    g = torch.autograd.grad(outs, leaves, [gr.to(outs[0].dtype) for gr in grads])
    return [o.detach() for o in outs], list(g)


def assert_close(name, got, ref64, ref32, tol):
    got, ref64, ref32 = got.double(), ref64.double(), ref32.double()
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = (got - ref64).abs().max().item()
    yardstick = (ref32 - ref64).abs().max().item()
    scale = max(ref64.abs().max().item(), 1e-30)
    bound = max(4.0 * yardstick, tol * scale)
    assert err <= bound, f"{name}: max error {err:.3e} > bound {bound:.3e} (fp32-reference error {yardstick:.3e}, scale {scale:.3e})"


def check_case(T, n, C, dtype, variant, iters, device="cpu"):
    eps = 1e-6
    inputs = make_inputs(T, n, C, dtype, device)
    gen = torch.Generator().manual_seed(7)
    grads = [torch.randn(T, n, generator=gen), torch.randn(T, n, generator=gen), torch.randn(T, n, n, generator=gen)]
    grads = [g.to(device) for g in grads]
    out = coeffs_forward(*inputs, iters, eps, variant)
    outs64, g64 = ref_grads(inputs, grads, iters, eps, variant, torch.float64)
    outs32, g32 = ref_grads(inputs, grads, iters, eps, variant, torch.float32)
    for name, a, b, c in zip(("h_pre", "h_post", "h_res"), out, outs64, outs32):
        assert a.dtype == torch.float32 and a.shape == b.shape
        assert_close(name, a, b, c, TOL[dtype])
    kg = coeffs_backward(*grads, *inputs, iters, eps, variant)
    assert kg[0].dtype == dtype and kg[0].shape == inputs[0].shape
    for name, a, b, c, p in zip(("gx", "gphi", "galpha", "gb_pre", "gb_post", "gb_res"), kg, g64, g32, inputs):
        assert a.shape == p.shape
        assert_close(name, a, b, c, GX_TOL[dtype] if name == "gx" else TOL[dtype])
    return out


CASES = [
    # T, n, C, dtype, variant, iters
    (5, 4, 7, torch.float32, "mhc", 20),
    (1, 1, 1, torch.float32, "mhc", 20),  # T=1, n=1, C=1
    (8, 3, 40, torch.float32, "hc", 20),  # K=120: several K blocks with a masked tail
    (3, 8, 5, torch.float32, "mhc", 20),  # n=8
    (20, 2, 6, torch.float32, "mhc", 3),  # two token blocks, two gphi splits
    (2, 5, 9, torch.float32, "hc", 20),
    (4, 2, 33, torch.float16, "mhc", 20),
    (6, 8, 3, torch.float16, "hc", 20),
    (3, 3, 4, torch.float16, "mhc", 0),  # iters=0: plain exp(logits - max)
]


@pytest.mark.parametrize("T,n,C,dtype,variant,iters", CASES)
def test_kernels_match_float64_reference(T, n, C, dtype, variant, iters):
    out = check_case(T, n, C, dtype, variant, iters)
    if variant == "mhc" and iters > 0:
        # Sinkhorn ends on the row normalisation: rows sum to one
        torch.testing.assert_close(out[2].sum(-1), torch.ones(T, n), atol=2e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_op_autograd_triton_matches_reference(dtype):
    T, n, C, iters, eps = 4, 3, 10, 20, 1e-6
    inputs = make_inputs(T, n, C, dtype)
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    x = leaves[0].reshape(2, 2, n, C)  # leading token dims are flattened by the op
    hp, ho, hr = ops.coeffs(x, *leaves[1:], iters=iters, eps=eps, variant="mhc", kernels="triton")
    assert hp.shape == (2, 2, n) and hr.shape == (2, 2, n, n)
    w = [torch.linspace(-1, 1, t.numel()).reshape(t.shape) for t in (hp, ho, hr)]
    loss = sum((a * b).sum() for a, b in zip((hp, ho, hr), w))
    loss.backward()
    g_flat = [w[0].reshape(T, n), w[1].reshape(T, n), w[2].reshape(T, n, n)]
    outs64, g64 = ref_grads(inputs, g_flat, iters, eps, "mhc", torch.float64)
    outs32, g32 = ref_grads(inputs, g_flat, iters, eps, "mhc", torch.float32)
    assert_close("h_res", hr.detach().reshape(T, n, n), outs64[2], outs32[2], TOL[dtype])
    for name, leaf, b, c in zip(("x", "phi", "alpha", "b_pre", "b_post", "b_res"), leaves, g64, g32):
        assert_close(name, leaf.grad, b, c, GX_TOL[dtype] if name == "x" else TOL[dtype])


def test_op_triton_float64_falls_back_and_gradchecks():
    T, n, C = 2, 2, 3
    inputs = [t.double().requires_grad_(True) for t in make_inputs(T, n, C, torch.float64)]
    out = torch.ops.mhc.coeffs(*inputs, 4, 1e-6, "mhc", "triton")
    ref = reference.coeffs(*inputs, iters=4, eps=1e-6, variant="mhc")
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda *a: torch.ops.mhc.coeffs(*a, 4, 1e-6, "mhc", "triton"), inputs)


def test_every_output_element_is_written():
    T, n, C = 5, 3, 7
    inputs = make_inputs(T, n, C, torch.float32)
    out = (torch.full((T, n), float("nan")), torch.full((T, n), float("nan")), torch.full((T, n, n), float("nan")))
    got = coeffs_forward(*inputs, 20, 1e-6, "mhc", out=out)
    assert all(a is b for a, b in zip(got, out))
    assert all(torch.isfinite(o).all() for o in out)
    gx = torch.full((T, n, C), float("nan"))
    grads = [torch.ones(T, n), torch.ones(T, n), torch.ones(T, n, n)]
    res = coeffs_backward(*grads, *inputs, 20, 1e-6, "mhc", gx=gx)
    assert res[0] is gx and torch.isfinite(gx).all()


@pytest.mark.parametrize("variant", ["mhc", "hc"])
def test_extreme_logits_stay_finite(variant):
    T, n, C = 4, 4, 6
    x, phi, alpha, bp, bo, br = make_inputs(T, n, C, torch.float32, scale=300.0)
    sign = lambda t: torch.where(torch.arange(t.numel()).reshape(t.shape) % 3 == 0, 1.0, -1.0)
    bp, bo, br = 1e4 * sign(bp), -1e4 * sign(bo), 1e4 * sign(br)
    out = coeffs_forward(x, phi, alpha, bp, bo, br, 20, 1e-6, variant)
    ref = reference.coeffs(x.double(), phi.double(), alpha.double(), bp.double(), bo.double(), br.double(), iters=20, eps=1e-6, variant=variant)
    for a, b in zip(out, ref):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)
    grads = [torch.randn(T, n), torch.randn(T, n), torch.randn(T, n, n)]
    for g in coeffs_backward(*grads, x, phi, alpha, bp, bo, br, 20, 1e-6, variant):
        assert torch.isfinite(g).all()
    # huge x (RMS normalisation) and tiny x (eps dominates) are fine too
    for s in (1e15, 1e-20):
        out = coeffs_forward(x * s, phi, alpha, bp, bo, br, 20, 1e-6, variant)
        assert all(torch.isfinite(o).all() for o in out)


def test_bad_shapes_raise():
    x, phi, alpha, bp, bo, br = make_inputs(2, 3, 4, torch.float32)
    with pytest.raises(ValueError):
        coeffs_forward(x, phi[:-1], alpha, bp, bo, br, 20, 1e-6, "mhc")
    with pytest.raises(ValueError):
        coeffs_forward(x, phi, alpha, bp, bo, br, 20, 1e-6, "sinkhorn")


# sm_90 ahead-of-time compiles of these kernels (resources, spills): tests/test_kernel_aot.py


@pytest.mark.parametrize("T,n,C,dtype,tiles", [(70, 3, 20, torch.float32, (64, 64, 8, 16)),
                                               (40, 4, 19, torch.float16, (64, 64, 8, 16)),
                                               (40, 8, 9, torch.float32, (32, 16, 4, 16)),
                                               (37, 6, 7, torch.bfloat16, (32, 16, 4, 16))])
def test_cuda_blocks_match_float64_reference_in_interpreter(monkeypatch, T, n, C, dtype, tiles):
    """The CUDA tiles (n_pad = 4: 64-token forward and dh tiles, the dh kernel's 32-column K
    chunk, the gx kernel's 16-token tiles; n_pad = 8: 32-token forward tiles, the dh kernel's own
    16-token tiles (its own grid) with 4 channels of every stream, 16-token gx tiles; chosen for
    sm_90 registers) run in the interpreter with ieee dots: two or more token blocks, masked
    tails, the same float64 bounds."""
    from mhc_compile.kernels import coeffs

    orig = coeffs.launch_config

    def cuda_config(n_, variant, gpu):
        consts, x_consts, warps = orig(n_, variant, True)
        return dict(consts, DOT_P="ieee"), dict(x_consts, DOT_P="ieee"), warps

    monkeypatch.setattr(coeffs, "launch_config", cuda_config)
    consts, x_consts, _ = cuda_config(n, "mhc", True)
    dh = coeffs.dh_consts(consts)
    assert (consts["BT"], dh["BT"], dh["BC"], x_consts["BT"]) == tiles
    check_case(T, n, C, dtype, "mhc", 20)


# ---------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
@pytest.mark.parametrize("T,n,C,variant", [(300, 4, 1000, "mhc"), (77, 8, 257, "mhc"), (129, 1, 64, "hc"), (1, 3, 5, "mhc")])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_matches_float64_reference(T, n, C, variant, dtype):
    check_case(T, n, C, dtype, variant, 20, device="cuda")


@pytest.mark.gpu
def test_cuda_every_output_element_is_written():
    T, n, C = 333, 4, 300
    inputs = make_inputs(T, n, C, torch.bfloat16, device="cuda")
    out = tuple(torch.full(s, float("nan"), device="cuda") for s in ((T, n), (T, n), (T, n, n)))
    coeffs_forward(*inputs, 20, 1e-6, "mhc", out=out)
    assert all(torch.isfinite(o).all() for o in out)
    gx = torch.full((T, n, C), float("nan"), device="cuda", dtype=torch.bfloat16)
    grads = [torch.ones(T, n, device="cuda"), torch.ones(T, n, device="cuda"), torch.ones(T, n, n, device="cuda")]
    coeffs_backward(*grads, *inputs, 20, 1e-6, "mhc", gx=gx)
    assert torch.isfinite(gx).all()
