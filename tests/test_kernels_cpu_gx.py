"""The X gradient of the CPU coeffs backward with its epilogue in one kernel (``mhc_cpu::coeffs_gx``,
kernels_cpu/grad_mm.cpp).

Against aten's mm plus the epilogue it replaces (``addcmul_`` and the cast for coeffs, ``boundary_gx``
for the boundary) and a float64 recomputation: n in 1, 2, 4, 8 (K = 2n+n^2 and n C not multiples of
the vector width), odd token and channel counts, every float dtype, both modes; bitwise where the
inputs make every sum exact (so only the roundings and the indexing are compared); 1 or 2 threads,
touching ahead on or off;
the launchers' coeffs and boundary backward against the reference at perturbed parameters, with the
kernel on and off (``launch.FUSED``); a float64 gradcheck through the ops. And the phi gradient's GEMM
(``mhc_cpu::phi_grad_mm``) against aten's mm, bitwise where the sums are exact, on 1 and 2 threads.
"""
import pytest
import torch
from torch.autograd import gradcheck

from mhc_compile import kernels_cpu, ops
from mhc_compile import reference as R

pytestmark = pytest.mark.skipif(not kernels_cpu.available(), reason=f"CPU kernels not built: {kernels_cpu.build_error()}")

TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _inputs(n, c, t, dtype, seed, exact=False):
    """dh_r (t, K), phi (nC, K), coef (t, 1), h_pre (t, n) in the compute type; x, g_x_next (t, n, c) and
    g_h_in (t, c) in ``dtype``. ``exact``: small multiples of powers of two, so that every product and
    sum is exact in float32 and only the final roundings remain."""
    g = torch.Generator().manual_seed(seed)
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    k = 2 * n + n * n

    def draw(*shape, scale=1.0):
        if exact:
            return torch.randint(-8, 9, shape, generator=g).to(cd) * scale / 8
        return torch.randn(*shape, generator=g, dtype=cd) * scale

    dh, phi, coef = draw(t, k), draw(n * c, k, scale=1 / 4), draw(t, 1, scale=1 / 2)
    hp = draw(t, n).abs()
    x, gxn, ghin = draw(t, n, c).to(dtype), draw(t, n, c).to(dtype), draw(t, c).to(dtype)
    return dh, phi, coef, hp, x, gxn, ghin


def _old(mode, dh, phi, coef, hp, x, gxn, ghin):
    """aten's mm and the epilogue of the path before coeffs_gx (launch.FUSED off)."""
    t = x.shape[0]
    gm = torch.mm(dh, phi.t())
    if mode == "coeffs":
        return gm.addcmul_(x.reshape(t, -1).to(gm.dtype), coef, value=-1.0).reshape(x.shape).to(x.dtype)
    return torch.ops.mhc_cpu.boundary_gx(gm, x, coef, gxn, ghin, hp)


def _f64(mode, dh, phi, coef, hp, x, gxn, ghin):
    """The same in float64, rounded to x's dtype where the epilogue rounds."""
    r = lambda v: v.to(x.dtype).double()  # noqa: E731
    c_term = (dh.double() @ phi.double().t()).reshape(x.shape) - coef.double()[:, :, None] * x.double()
    if mode == "coeffs":
        return c_term
    return gxn.double() + r(hp.double()[:, :, None] * ghin.double()[:, None, :]) + r(c_term)


def _gx(mode, dh, phi, coef, hp, x, gxn, ghin):
    k = torch.ops.mhc_cpu
    return k.coeffs_gx(dh, phi, x, coef) if mode == "coeffs" else k.coeffs_gx(dh, phi, x, coef, gxn, ghin, hp)


def _err(got, want):
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1.0)).item()


@pytest.mark.parametrize("mode", ["coeffs", "boundary"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,c", [(1, 7), (2, 13), (4, 5), (4, 33), (8, 3)])
def test_matches_mm_and_the_old_epilogue(n, c, dtype, mode):
    for t in (1, 5, 37):  # below, at and past the 4-token register tile, with tails
        args = _inputs(n, c, t, dtype, seed=n * 100 + t)
        got = _gx(mode, *args)
        assert got.dtype == dtype and got.shape == (t, n, c)
        assert _err(got, _old(mode, *args)) <= TOL[dtype], (t, _err(got, _old(mode, *args)))
        assert _err(got, _f64(mode, *args)) <= TOL[dtype], t


@pytest.mark.parametrize("mode", ["coeffs", "boundary"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,c,t", [(1, 9, 6), (2, 11, 37), (4, 5, 9), (4, 64, 13), (8, 7, 5)])
def test_exact_sums_give_the_old_paths_bits(n, c, t, dtype, mode):
    """Every product and sum exact: the same bits as mm + the old epilogue, roundings and all."""
    args = _inputs(n, c, t, dtype, seed=n + t, exact=True)
    assert torch.equal(_gx(mode, *args), _old(mode, *args))


def test_two_threads_give_the_same_bits():
    args = _inputs(4, 40, 203, torch.float32, seed=1)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = [_gx(m, *args) for m in ("coeffs", "boundary")]
        torch.set_num_threads(2)
        two = [_gx(m, *args) for m in ("coeffs", "boundary")]
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


def test_touching_ahead_changes_no_bit():
    """The kernel brings its epilogue's inputs in during the GEMM unless set_prefetch(0): same outputs."""
    k = torch.ops.mhc_cpu
    old = k.set_prefetch(6)
    try:
        for n, c, t, dtype in ((4, 40, 37, torch.float32), (2, 13, 9, torch.bfloat16)):
            args = _inputs(n, c, t, dtype, seed=t)
            k.set_prefetch(6)
            on = [_gx(m, *args) for m in ("coeffs", "boundary")]
            k.set_prefetch(0)
            off = [_gx(m, *args) for m in ("coeffs", "boundary")]
            assert all(torch.equal(a, b) for a, b in zip(on, off))
    finally:
        k.set_prefetch(old)


def test_rejects_mismatched_inputs():
    dh, phi, coef, hp, x, gxn, ghin = _inputs(2, 5, 4, torch.float32, seed=0)
    k = torch.ops.mhc_cpu
    with pytest.raises(RuntimeError, match="come together"):
        k.coeffs_gx(dh, phi, x, coef, gxn, None, hp)
    with pytest.raises(RuntimeError, match="must match x"):
        k.coeffs_gx(dh[:3], phi, x, coef)
    with pytest.raises(RuntimeError, match="compute type"):
        k.coeffs_gx(dh.double(), phi, x, coef)


# ----------------------------------------------------------------------------- through the launchers
def _site_params(n, c, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    p = R.init_site_params(n, c, seed, dtype=torch.float64)
    return [(p[k] + 0.3 * torch.randn(p[k].shape, generator=g, dtype=torch.float64)).to(dtype)
            for k in ("phi", "alpha", "b_pre", "b_post", "b_res")]


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("n,dtype", [(2, torch.float32), (4, torch.bfloat16), (8, torch.float32), (3, torch.float64)])
def test_launch_backwards_match_the_reference(n, dtype, fused, monkeypatch):
    """launch.coeffs_backward and launch.boundary_backward at perturbed parameters, 3 x 7 tokens, odd C,
    against reference.coeffs_backward / boundary_backward; coeffs_gx runs exactly when FUSED is on."""
    from mhc_compile.kernels_cpu import launch

    monkeypatch.setattr(launch, "FUSED", fused)
    calls = []
    real = launch._ops

    class Spy:
        def __getattr__(self, name):
            if name == "coeffs_gx":
                calls.append(name)
            return getattr(real(), name)

    monkeypatch.setattr(launch, "_ops", Spy)
    c, cd = 5 if n % 2 == 0 else 7, torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.Generator().manual_seed(n)
    x, h_out = torch.randn(3, 7, n, c, generator=g).to(dtype), torch.randn(3, 7, c, generator=g).to(dtype)
    ho, hr = 2 * torch.rand(3, 7, n, generator=g, dtype=cd), torch.rand(3, 7, n, n, generator=g, dtype=cd)
    gp, go, gr = torch.randn(3, 7, n, generator=g, dtype=cd), torch.randn(3, 7, n, generator=g, dtype=cd), \
        torch.randn(3, 7, n, n, generator=g, dtype=cd)
    gxn, ghin = torch.randn(3, 7, n, c, generator=g).to(dtype), torch.randn(3, 7, c, generator=g).to(dtype)
    p = _site_params(n, c, n, cd)
    tol = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2}[dtype]
    got = launch.coeffs_backward(gp, go, gr, x, *p, 20, 1e-6, "mhc")
    want = R.coeffs_backward(gp, go, gr, x, *p)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape and _err(a, b) <= tol
    got = launch.boundary_backward(gxn, gp, go, gr, ghin, x, h_out, ho, hr, *p, 20, 1e-6, "mhc")
    want = R.boundary_backward(gxn, gp, go, gr, ghin, x, h_out, ho, hr, *p, 20, 1e-6, "mhc")
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape and _err(a, b) <= tol
    assert calls == (["coeffs_gx"] * 2 if fused else [])


def test_float64_gradcheck_through_the_ops():
    """coeffs, pre, post_res and a boundary on 5 tokens (a register tile and a tail), n = 2, odd C."""
    n, c = 2, 3
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, n, c, generator=g, dtype=torch.float64, requires_grad=True)
    h_out = torch.randn(5, c, generator=g, dtype=torch.float64, requires_grad=True)
    leaves = [t.requires_grad_() for t in _site_params(n, c, 2, torch.float64)]

    def f(x, h_out, phi, alpha, bp, bo, br):
        hp, ho, hr = ops.coeffs(x, phi, alpha, bp, bo, br, kernels="auto")
        x1 = ops.post_res(x, h_out * ops.pre(x, hp, "auto").tanh(), ho, hr, "auto")
        return (x1, *ops.boundary(x1, h_out, ho, hr, phi, alpha, bp, bo, br, kernels="auto"))

    assert gradcheck(f, (x, h_out, *leaves), fast_mode=True)


# ----------------------------------------------------------------------------- the phi gradient
@pytest.mark.parametrize("n,c,t", [(1, 7, 5), (2, 13, 131), (4, 16, 300), (4, 33, 17), (8, 5, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_phi_grad_mm_matches_mm(n, c, t, dtype):
    """g_phi = flat^T dh_r (``phi_grad_mm``): nC not a multiple of its 16-column block, K = 2n+n^2 not a
    multiple of its 6 columns, token counts across its 128-token chunks; against aten's mm in float64,
    and bitwise where every sum is exact."""
    k = torch.ops.mhc_cpu
    g = torch.Generator().manual_seed(n * 100 + c + t)
    kk = 2 * n + n * n
    flat, dh = torch.randn(t, n * c, generator=g, dtype=dtype), torch.randn(t, kk, generator=g, dtype=dtype)
    got = k.phi_grad_mm(flat, dh)
    want = flat.double().t() @ dh.double()
    assert got.shape == (n * c, kk) and got.dtype == dtype and got.is_contiguous()
    err = float((got.double() - want).abs().max() / want.abs().max())
    assert err <= (1e-6 if dtype == torch.float32 else 1e-13), err
    exact = [torch.randint(-8, 9, s, generator=g).to(dtype) / 8 for s in ((t, n * c), (t, kk))]
    assert torch.equal(k.phi_grad_mm(*exact), (exact[0].double().t() @ exact[1].double()).to(dtype))


def test_phi_grad_mm_same_bits_on_two_threads():
    """Threads split the columns; each output sums the tokens in order: the same bits on 1 and 2 threads."""
    k = torch.ops.mhc_cpu
    g = torch.Generator().manual_seed(3)
    flat, dh = torch.randn(517, 4 * 40, generator=g), torch.randn(517, 24, generator=g)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = k.phi_grad_mm(flat, dh)
        torch.set_num_threads(2)
        two = k.phi_grad_mm(flat, dh)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)
