"""The one-pass boundary forward (``mhc_cpu::boundary_fwd``) and the projection GEMM (``proj_mm``) of
kernels_cpu/fused.cpp.

Against the unfused kernels (post_res_fwd, coeffs_fwd, pre_fwd: the same bits given the same
projection; the projection close to aten's mm) for n in 1..9, every float dtype, token counts that
are not multiples of the block or the register tile, broadcast coefficients, and 1 or 2 threads; and
the boundary op's forward and every gradient against the reference at perturbed parameters, with the
fused path on and off (``launch.FUSED``).
"""
import pytest
import torch

from mhc_compile import kernels_cpu, ops
from mhc_compile import reference as R

pytestmark = pytest.mark.skipif(not kernels_cpu.available(), reason=f"CPU kernels not built: {kernels_cpu.build_error()}")

TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def _inputs(n, c, t, dtype, seed, static=False):
    g = torch.Generator().manual_seed(seed)
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    x, h_out = torch.randn(t, n, c, generator=g).to(dtype), torch.randn(t, c, generator=g).to(dtype)
    rows = 1 if static else t
    ho, hr = 2 * torch.rand(rows, n, generator=g, dtype=cd), torch.rand(rows, n, n, generator=g, dtype=cd)
    phi = torch.randn(n * c, 2 * n + n * n, generator=g, dtype=cd) / (n * c) ** 0.5
    small = (1 + 0.3 * torch.randn(3, generator=g, dtype=cd), 0.3 * torch.randn(n, generator=g, dtype=cd),
             0.3 * torch.randn(n, generator=g, dtype=cd), 0.3 * torch.randn(n, n, generator=g, dtype=cd))
    return x, h_out, ho, hr, phi, small


@pytest.mark.parametrize("n,c,t,dtype,hc,static", [
    *[(n, c, 37, torch.float32, False, False) for n, c in ((1, 7), (2, 13), (3, 5), (4, 384), (8, 9), (9, 5))],
    (4, 13, 53, torch.bfloat16, False, False), (2, 7, 21, torch.float64, False, False),
    (4, 13, 19, torch.float16, False, True), (4, 24, 33, torch.float32, True, False), (1, 8, 3, torch.float32, False, True),
])
def test_boundary_fwd_equals_the_unfused_kernels(n, c, t, dtype, hc, static):
    k = torch.ops.mhc_cpu
    x, h_out, ho, hr, phi, small = _inputs(n, c, t, dtype, n + t, static)
    xn, hp, ho1, hr1, h_in, proj, rms = k.boundary_fwd(x, h_out, ho, hr, phi, *small, 1e-6, 20, hc)
    xn_ref = k.post_res_fwd(x, h_out, ho, hr)
    flat = xn_ref.reshape(t, -1).to(phi.dtype)
    assert torch.equal(xn, xn_ref)
    assert torch.equal(k.proj_mm(flat, phi), proj)
    assert (proj - flat @ phi).abs().max() <= TOL[torch.float64 if dtype == torch.float64 else torch.float32] * 10
    for got, want in zip((hp, ho1, hr1), k.coeffs_fwd(flat, proj, *small, 1e-6, n, 20, hc)):
        assert torch.equal(got, want)
    assert torch.equal(h_in, k.pre_fwd(xn_ref, hp))
    _check_rms(rms, flat, proj, small, n, hc)


def _check_rms(rms, flat, proj, small, n, hc):
    """The forward's RMS per token is the r of coeffs_bwd: the backward from it has the bits of the
    backward that reads the rows again (and r is sqrt(mean(row^2) + eps))."""
    t, k = flat.shape[0], torch.ops.mhc_cpu
    g = torch.Generator().manual_seed(t + n)
    gates = [torch.randn(t, *tail, generator=g, dtype=flat.dtype) for tail in ((n,), (n,), (n, n))]
    want = flat.double().pow(2).mean(1).add(1e-6).sqrt()
    assert rms.shape == (t,) and rms.dtype == flat.dtype
    assert (rms.double() - want).abs().max() <= 1e-5 * want.max()
    with_rms = k.coeffs_bwd(*gates, flat, proj, *small, 1e-6, n, 20, hc, rms)
    reading = k.coeffs_bwd(*gates, flat, proj, *small, 1e-6, n, 20, hc)
    assert all(torch.equal(a, b) for a, b in zip(with_rms, reading))
    # and it is used: another r gives other gradients
    assert not torch.equal(k.coeffs_bwd(*gates, flat, proj, *small, 1e-6, n, 20, hc, 2 * rms)[0], reading[0])


@pytest.mark.parametrize("n,c,t,dtype,hc", [
    (1, 7, 37, torch.float32, False), (3, 5, 37, torch.float32, False), (4, 384, 37, torch.float32, False),
    (4, 13, 53, torch.bfloat16, False), (2, 7, 21, torch.float64, False), (4, 24, 33, torch.float32, True),
    (9, 5, 19, torch.float32, False),
])
def test_site_start_fwd_equals_the_unfused_kernels(n, c, t, dtype, hc):
    """coeffs and pre on x in one pass: the bits of proj_mm, coeffs_fwd and pre_fwd in turn."""
    k = torch.ops.mhc_cpu
    x, _, _, _, phi, small = _inputs(n, c, t, dtype, 3 * n + t)
    hp, ho, hr, h_in, proj, rms = k.site_start_fwd(x, phi, *small, 1e-6, 20, hc)
    flat = x.reshape(t, -1).to(phi.dtype)
    assert torch.equal(k.proj_mm(flat, phi), proj)
    for got, want in zip((hp, ho, hr), k.coeffs_fwd(flat, proj, *small, 1e-6, n, 20, hc)):
        assert torch.equal(got, want)
    assert torch.equal(h_in, k.pre_fwd(x, hp))
    _check_rms(rms, flat, proj, small, n, hc)
    ref_hp = R.coeffs(x.double(), phi.double(), *(v.double() for v in small), variant="hc" if hc else "mhc")[0]
    assert (hp.double() - ref_hp).abs().max() <= TOL[dtype] * 10


def test_boundary_fwd_two_threads_same_bits():
    k = torch.ops.mhc_cpu
    x, h_out, ho, hr, phi, small = _inputs(4, 40, 203, torch.float32, 1)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = k.boundary_fwd(x, h_out, ho, hr, phi, *small, 1e-6, 20, False)
        torch.set_num_threads(2)
        two = k.boundary_fwd(x, h_out, ho, hr, phi, *small, 1e-6, 20, False)
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


def _boundary_run(kernels, x, h_out, ho, hr, p):
    """ops.boundary forward and backward (a random linear loss on every output): outputs and gradients."""
    leaves = [t.clone().requires_grad_() for t in (x, h_out, ho, hr, *p)]
    outs = ops.boundary(*leaves, kernels=kernels)
    g = torch.Generator().manual_seed(7)
    sum((o.double() * torch.randn(o.shape, generator=g, dtype=torch.float64)).sum() for o in outs).backward()
    return [*outs, *(t.grad for t in leaves)]


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("n,dtype", [(n, dt) for n in (1, 2, 4, 8) for dt in (torch.float32, torch.bfloat16)])
def test_boundary_op_matches_reference_forward_and_backward(n, dtype, fused, monkeypatch):
    """At perturbed parameters, 3 x 13 tokens (odd: a partial block and register tile), odd C."""
    from mhc_compile.kernels_cpu import launch

    monkeypatch.setattr(launch, "FUSED", fused)
    c = 7 if n % 2 else 11
    g = torch.Generator().manual_seed(n)
    x, h_out = torch.randn(3, 13, n, c, generator=g).to(dtype), torch.randn(3, 13, c, generator=g).to(dtype)
    ho, hr = 2 * torch.rand(3, 13, n, generator=g), torch.rand(3, 13, n, n, generator=g)
    site = R.init_site_params(n, c, n, dtype=torch.float32)
    p = [(site[k] + 0.3 * torch.randn(site[k].shape, generator=g)) for k in ("phi", "alpha", "b_pre", "b_post", "b_res")]
    got, want = _boundary_run("auto", x, h_out, ho, hr, p), _boundary_run("reference", x, h_out, ho, hr, p)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape
        err = (a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1.0)
        assert err <= TOL[dtype], f"relative error {err:.2e} for {tuple(b.shape)}"


def test_wide_streams_take_aten_mm(monkeypatch):
    """proj_mm holds one register tile of 2n+n^2 outputs only up to n = 4; wider n (slower there by
    1.2-2.4x, measured) take aten's mm and the unfused boundary; MHC_CPU_FUSED=0 turns both off."""
    from mhc_compile.kernels_cpu import launch

    assert [launch._fused(n) for n in (1, 2, 4, 5, 8)] == [True, True, True, False, False]
    monkeypatch.setattr(launch, "FUSED", False)
    assert not launch._fused(4)
