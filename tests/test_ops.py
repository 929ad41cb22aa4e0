"""mhc:: custom ops: opcheck, float64 gradchecks, agreement with the reference, torch.compile on CPU."""
import itertools

import pytest
import torch
from torch.autograd import gradcheck as _gradcheck


def gradcheck(fn, inputs):
    """float64 gradcheck; the fast (random projection) mode once phi gets large (n >= 4)."""
    big = sum(t.numel() for t in inputs if isinstance(t, torch.Tensor)) > 300
    return _gradcheck(fn, inputs, fast_mode=big)

from mhc_compile import ops
from mhc_compile import reference as R

NS = [1, 2, 3, 4, 8]


def _inputs(n, c=5, lead=(2, 3), dtype=torch.float64, variant="mhc", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, n, c, generator=g, dtype=dtype)
    p = R.init_site_params(n, c, 1, variant=variant, dtype=torch.float64)
    p = {k: (v + 0.3 * torch.randn(v.shape, generator=g, dtype=torch.float64)).to(
        dtype if dtype == torch.float64 else torch.float32) for k, v in p.items()}
    return x, p


def _coeff_args(x, p, variant="mhc"):
    return (x, p["phi"], p["alpha"], p["b_pre"], p["b_post"], p["b_res"], 20, 1e-6, variant, "reference")


@pytest.mark.parametrize("n,variant", list(itertools.product([1, 3, 4], ["mhc", "hc"])))
def test_opcheck_coeffs(n, variant):
    x, p = _inputs(n, variant=variant)
    args = _coeff_args(x.requires_grad_(), {k: v.requires_grad_() for k, v in p.items()}, variant)
    torch.library.opcheck(torch.ops.mhc.coeffs.default, args)


@pytest.mark.parametrize("n", [1, 3, 4])
def test_opcheck_mix(n):
    x, _ = _inputs(n)
    c = x.shape[-1]
    hp = torch.rand(2, 3, n, dtype=torch.float64, requires_grad=True)
    hr = torch.rand(2, 3, n, n, dtype=torch.float64, requires_grad=True)
    h_out = torch.randn(2, 3, c, dtype=torch.float64, requires_grad=True)
    x.requires_grad_()
    torch.library.opcheck(torch.ops.mhc.pre.default, (x, hp, "reference"))
    torch.library.opcheck(torch.ops.mhc.post_res.default, (x, h_out, hp, hr, "reference"))
    # static coefficients broadcast over the tokens
    hp1 = torch.rand(1, 1, n, dtype=torch.float64, requires_grad=True)
    hr1 = torch.rand(1, 1, n, n, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.mhc.pre.default, (x, hp1, "reference"))
    torch.library.opcheck(torch.ops.mhc.post_res.default, (x, h_out, hp1, hr1, "reference"))


@pytest.mark.parametrize("n,variant,dynamic", list(itertools.product(NS, ["mhc", "hc"], [True, False])))
def test_ops_gradcheck(n, variant, dynamic):
    x, p = _inputs(n, variant=variant)
    x.requires_grad_()
    names = (["phi", "alpha"] if dynamic else []) + ["b_pre", "b_post", "b_res"]
    leaves = [p[k].requires_grad_() for k in names]
    lin = torch.nn.Linear(x.shape[-1], x.shape[-1], dtype=torch.float64)

    def site(x, *ts):
        kw = dict(zip(names, ts))
        hp, ho, hr = ops.coeffs(x, kw.get("phi"), kw.get("alpha"), kw["b_pre"], kw["b_post"], kw["b_res"],
                                variant=variant, dynamic=dynamic, kernels="reference")
        return ops.post_res(x, lin(ops.pre(x, hp, "reference")), ho, hr, "reference")

    assert gradcheck(site, (x, *leaves))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1, 3, 4])
def test_ops_match_reference_forward_and_backward(dtype, n):
    x, p = _inputs(n, c=16, dtype=dtype, seed=n)
    h_out = torch.randn(2, 3, 16).to(dtype)

    def run(fn_coeffs, fn_pre, fn_post):
        xx = x.clone().requires_grad_()
        hh = h_out.clone().requires_grad_()
        pp = {k: v.clone().requires_grad_() for k, v in p.items()}
        hp, ho, hr = fn_coeffs(xx, pp)
        out = fn_post(xx, hh * fn_pre(xx, hp), ho, hr)
        out.float().square().sum().backward()
        return [out, xx.grad, hh.grad] + [pp[k].grad for k in sorted(pp)]

    got = run(lambda x, p: ops.coeffs(x, p["phi"], p["alpha"], p["b_pre"], p["b_post"], p["b_res"], kernels="reference"),
              lambda x, h: ops.pre(x, h, "reference"), lambda *a: ops.post_res(*a, "reference"))
    want = run(lambda x, p: R.coeffs(x, p["phi"], p["alpha"], p["b_pre"], p["b_post"], p["b_res"]),
               R.pre_mix, R.post_res_mix)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_op_backward_saves_only_inputs():
    """Autograd of a whole site keeps the op inputs, never Sinkhorn iterates or normalised x."""
    n, c = 4, 16
    x, p = _inputs(n, c=c, dtype=torch.float32)
    x.requires_grad_()
    params = {k: v.requires_grad_() for k, v in p.items()}
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        hp, ho, hr = ops.coeffs(x, params["phi"], params["alpha"], params["b_pre"], params["b_post"], params["b_res"],
                                kernels="reference")
        ops.post_res(x, ops.pre(x, hp, "reference"), ho, hr, "reference")
    saved_bytes = sum(t.numel() * t.element_size() for t in saved)
    token = 2 * 3
    # coeffs saves x + params; pre saves x + h_pre; post_res saves x, h_out, h_post, h_res.
    param_bytes = sum(v.numel() * 4 for v in params.values())
    expected = 4 * (3 * token * n * c + token * c + 2 * token * n + token * n * n) + param_bytes
    assert saved_bytes == expected
    # The plain reference under autograd stores every Sinkhorn iterate: far more.
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        R.coeffs(x, params["phi"], params["alpha"], params["b_pre"], params["b_post"], params["b_res"])
    assert sum(t.numel() * t.element_size() for t in saved) > saved_bytes


def test_record_coeffs_and_boundary():
    n, c = 3, 8
    x, p = _inputs(n, c=c, dtype=torch.float32)
    args = (p["phi"], p["alpha"], p["b_pre"], p["b_post"], p["b_res"])
    with ops.record_coeffs() as rec:
        hp, ho, hr = ops.coeffs(x, *args, kernels="reference")
        h_out = torch.tanh(ops.pre(x, hp, "reference"))
        x2, hp2, ho2, hr2, h_in2 = ops.boundary(x, h_out, ho, hr, *args, kernels="reference")
    assert len(rec) == 2
    torch.testing.assert_close(rec[1][2], hr2)
    want_x2 = R.post_res_mix(x, h_out, ho, hr)
    torch.testing.assert_close(x2, want_x2)
    want = R.coeffs(want_x2, *args)
    for g, w in zip((hp2, ho2, hr2), want):
        torch.testing.assert_close(g, w)
    torch.testing.assert_close(h_in2, R.pre_mix(want_x2, want[0]))
    assert not ops._RECORDERS  # recorder removed on exit


def test_bad_kernels_value():
    x, p = _inputs(2, dtype=torch.float32)
    with pytest.raises(ValueError, match="kernels="):
        ops.pre(x, torch.rand(2, 3, 2), "cuda")


class _TinySite(torch.nn.Module):
    def __init__(self, n=4, c=16):
        super().__init__()
        p = R.init_site_params(n, c, 0)
        self.p = torch.nn.ParameterDict({k: torch.nn.Parameter(v + 0.1 * torch.randn_like(v)) for k, v in p.items()})
        self.f = torch.nn.Linear(c, c)
        self.n = n

    def forward(self, x):
        s = ops.expand(x, self.n)
        p = self.p
        hp, ho, hr = ops.coeffs(s, p["phi"], p["alpha"], p["b_pre"], p["b_post"], p["b_res"], kernels="reference")
        s = ops.post_res(s, self.f(ops.pre(s, hp, "reference")), ho, hr, "reference")
        return ops.collapse(s)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_ops_inside_torch_compile(backend):
    torch._dynamo.reset()
    m = _TinySite()
    x = torch.randn(2, 5, 16)
    want = m(x)
    want.sum().backward()
    want_grads = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    cm = torch.compile(m, backend=backend, fullgraph=True, dynamic=True)
    got = cm(x)
    got.sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip((p.grad for p in m.parameters()), want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    # another sequence length under dynamic shapes
    assert cm(torch.randn(3, 7, 16)).shape == (3, 7, 16)
