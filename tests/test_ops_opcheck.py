"""Audit tests for the mhc:: custom ops (issues 2 and 5): ``torch.library.opcheck`` of every op,
forward *and* ``*_backward``, on both dispatch paths (``kernels="reference"``, ``"auto"`` (the fused CPU kernels on CPU) and ``"triton"``,
which runs the Triton kernels in the interpreter on CPU); an exact comparison of the real
outputs' shapes, strides and dtypes with the fake implementations'; and extreme (+-1e4) logits
through the ops, forward and backward, without NaN or inf."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from mhc_compile import ops
from mhc_compile import reference as R

LEAD = (2, 3)
C = 5


def _coeff_params(n, variant="mhc", seed=0):
    g = torch.Generator().manual_seed(seed)
    p = R.init_site_params(n, C, 1, variant=variant)
    return [p[k] + 0.3 * torch.randn(p[k].shape, generator=g) for k in ("phi", "alpha", "b_pre", "b_post", "b_res")]


def _cases(n, kernels, variant="mhc", static=False, dtype=torch.float32):
    """(op, args) for every mhc:: op, forward and backward, on small (2, 3, n, C) inputs."""
    g = torch.Generator().manual_seed(n)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    lead_c = (1, 1) if static else LEAD  # static coefficients broadcast over the tokens
    x = r(*LEAD, n, C).to(dtype)
    h_out = r(*LEAD, C).to(dtype)
    hp, ho, hr = torch.rand(*lead_c, n), 2 * torch.rand(*lead_c, n), torch.rand(*lead_c, n, n)
    cp = _coeff_params(n, variant)
    tail = (20, 1e-6, variant, kernels)
    m = torch.ops.mhc
    return [
        (m.coeffs.default, (x, *cp, *tail)),
        (m.coeffs_backward.default, (r(*LEAD, n), r(*LEAD, n), r(*LEAD, n, n), x, *cp, *tail)),
        (m.pre.default, (x, hp, kernels)),
        (m.pre_backward.default, (h_out, x, hp, kernels)),
        (m.post_res.default, (x, h_out, ho, hr, kernels)),
        (m.post_res_backward.default, (r(*LEAD, n, C).to(dtype), x, h_out, ho, hr, kernels)),
        (m.boundary.default, (x, h_out, ho, hr, *cp, *tail)),
        (m.boundary_backward.default,
         (r(*LEAD, n, C).to(dtype), r(*LEAD, n), r(*LEAD, n), r(*LEAD, n, n), r(*LEAD, C).to(dtype),
          x, h_out, ho, hr, *cp, *tail)),
    ]


def _with_grad(op, args):
    """Forward ops get requires_grad float inputs so opcheck also exercises the autograd registration."""
    if "backward" in op.name():
        return args
    return tuple(a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                 for a in args)


@pytest.mark.parametrize("kernels", ["reference", "triton", "auto"])
@pytest.mark.parametrize("n,variant,static", [(1, "mhc", False), (3, "hc", True)])
def test_opcheck_every_op_forward_and_backward(kernels, n, variant, static):
    cases = _cases(n, kernels, variant, static)
    assert len(cases) == 8
    for op, args in cases:
        # schema, fake tensor (CrossRefFakeMode: shapes, dtypes *and* strides of real vs fake outputs),
        # autograd registration, and AOT dispatch with dynamic shapes
        torch.library.opcheck(op, _with_grad(op, args))


@pytest.mark.parametrize("kernels", ["reference", "triton", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_real_outputs_match_fake_shapes_strides_dtypes_exactly(kernels, dtype):
    """Every output stride (size-1 dims included) of the real op equals the fake impl's."""
    n = 3
    checked = 0
    for op, args in _cases(n, kernels, static=True, dtype=dtype):
        real = op(*args)
        real = real if isinstance(real, tuple) else (real,)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake_args = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
            fake = op(*fake_args)
        fake = fake if isinstance(fake, tuple) else (fake,)
        assert len(real) == len(fake), op
        for i, (a, b) in enumerate(zip(real, fake)):
            assert tuple(a.shape) == tuple(b.shape), (op, i)
            assert a.stride() == b.stride(), (op, i, a.stride(), b.stride())
            assert a.dtype == b.dtype, (op, i, a.dtype, b.dtype)
            checked += 1
    assert checked == 3 + 6 + 1 + 2 + 1 + 4 + 5 + 9


@pytest.mark.parametrize("kernels", ["reference", "triton", "auto"])
@pytest.mark.parametrize("variant", ["mhc", "hc"])
def test_extreme_logits_through_ops_forward_and_backward(kernels, variant):
    """+-1e4 biases (logits) and a huge projection: coefficients and every gradient stay finite,
    and the mhc residual matrix rows still sum to one."""
    n = 4
    x = torch.randn(*LEAD, n, 8)
    p = R.init_site_params(n, 8, 0, variant=variant)
    sign = lambda t: torch.where(torch.arange(t.numel()).reshape(t.shape) % 3 == 0, 1.0, -1.0)  # noqa: E731
    leaves = {
        "phi": (1e4 * torch.randn_like(p["phi"])).requires_grad_(),
        "alpha": p["alpha"].clone().requires_grad_(),
        "b_pre": (1e4 * sign(p["b_pre"])).requires_grad_(),
        "b_post": (-1e4 * sign(p["b_post"])).requires_grad_(),
        "b_res": (1e4 * sign(p["b_res"])).requires_grad_(),
    }
    xs = x.clone().requires_grad_()
    hp, ho, hr = ops.coeffs(xs, *leaves.values(), variant=variant, kernels=kernels)
    for t in (hp, ho, hr):
        assert t.dtype == torch.float32 and torch.isfinite(t).all()
    if variant == "mhc":
        torch.testing.assert_close(hr.sum(-1), torch.ones(*LEAD, n), rtol=0, atol=1e-5)
    h_out = torch.tanh(ops.pre(xs, hp, kernels))
    y = ops.post_res(xs, h_out, ho, hr, kernels)
    assert torch.isfinite(y).all()
    y.square().sum().backward()
    assert torch.isfinite(xs.grad).all()
    for k, v in leaves.items():
        assert v.grad is not None and torch.isfinite(v.grad).all(), k
    # the fused boundary op too
    outs = ops.boundary(xs.detach(), h_out.detach(), ho.detach(), hr.detach(), *leaves.values(),
                        variant=variant, kernels=kernels)
    sum(o.float().square().sum() for o in outs).backward()
    assert all(torch.isfinite(o).all() for o in outs)
    for k, v in leaves.items():
        assert torch.isfinite(v.grad).all(), k


@pytest.mark.parametrize("kernels", ["reference", "triton", "auto"])
def test_bf16_input_gives_fp32_coefficients_through_ops(kernels):
    n = 3
    x = torch.randn(*LEAD, n, C).to(torch.bfloat16)
    cp = _coeff_params(n)
    outs = ops.coeffs(x, *cp, kernels=kernels)
    assert [o.dtype for o in outs] == [torch.float32] * 3
    want = R.coeffs(x.float(), *cp)
    for o, w in zip(outs, want):
        torch.testing.assert_close(o, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("variant,static", [("mhc", False), ("mhc", True), ("hc", False), ("hc", True)])
def test_boundary_op_gradcheck_float64_every_n(n, variant, static):
    """float64 gradcheck of mhc::boundary (reference path) across n, mhc/hc, dynamic/static
    previous-site coefficients (test_kernel_boundary only covers n=2)."""
    from torch.autograd import gradcheck

    g = torch.Generator().manual_seed(n)
    c, lead = 3, (2,)
    lead_c = (1,) if static else lead
    p = R.init_site_params(n, c, 1, variant=variant, dtype=torch.float64)
    cp = [p[k] + 0.3 * torch.randn(p[k].shape, generator=g, dtype=torch.float64)
          for k in ("phi", "alpha", "b_pre", "b_post", "b_res")]
    inputs = [torch.randn(*lead, n, c, generator=g, dtype=torch.float64), torch.randn(*lead, c, generator=g, dtype=torch.float64),
              torch.rand(*lead_c, n, generator=g, dtype=torch.float64), torch.rand(*lead_c, n, n, generator=g, dtype=torch.float64),
              *cp]
    inputs = [t.requires_grad_() for t in inputs]
    fn = lambda *a: torch.ops.mhc.boundary(*a, 20, 1e-6, variant, "reference")  # noqa: E731
    assert gradcheck(fn, inputs, fast_mode=n >= 4)
