"""Fused CPU kernels (mhc_compile.kernels_cpu) behind the mhc:: ops under kernels="auto" on CPU.

Checked against the reference (mhc_compile.reference) at perturbed mHC parameters: forward and
every gradient for n in 1..8, float32/bfloat16/float16/float64, odd shapes, both variants, static
(broadcast) coefficients and the fused boundary; float64 gradchecks through the ops; the
fallback; and the aten op count of one site (a handful, not hundreds).
"""
import itertools

import pytest
import torch
from torch.autograd import gradcheck

from mhc_compile import kernels_cpu, ops
from mhc_compile import reference as R
from mhc_compile._torch_internals import dispatch_mode_base

pytestmark = pytest.mark.skipif(not kernels_cpu.available(), reason=f"CPU kernels not built: {kernels_cpu.build_error()}")

TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def _params(n, c, variant, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    p = R.init_site_params(n, c, seed, variant=variant, dtype=torch.float64)
    return {k: (v + 0.3 * torch.randn(v.shape, generator=g, dtype=torch.float64)).to(dtype) for k, v in p.items()}


def _site(kernels, x, h_out, p, variant, dynamic=True):
    """One site plus a boundary into a second site: every op, forward and backward."""
    hp, ho, hr = ops.coeffs(x, p.get("phi"), p.get("alpha"), p["b_pre"], p["b_post"], p["b_res"],
                            variant=variant, dynamic=dynamic, kernels=kernels)
    h_in = ops.pre(x, hp, kernels)
    x1 = ops.post_res(x, h_out * h_in.tanh(), ho, hr, kernels)
    outs = ops.boundary(x1, h_out, ho, hr, p.get("phi"), p.get("alpha"), p["b_pre"], p["b_post"], p["b_res"],
                        variant=variant, dynamic=dynamic, kernels=kernels)
    return (x1, *outs)


def _run(kernels, x, h_out, p, variant, dynamic=True):
    xx, hh = x.clone().requires_grad_(), h_out.clone().requires_grad_()
    pp = {k: v.clone().requires_grad_() for k, v in p.items()}
    outs = _site(kernels, xx, hh, pp, variant, dynamic)
    g = torch.Generator().manual_seed(7)
    loss = sum((o.double() * torch.randn(o.shape, generator=g, dtype=torch.float64)).sum() for o in outs)
    loss.backward()
    return list(outs) + [xx.grad, hh.grad] + [pp[k].grad for k in sorted(pp)]


def _close(got, want, dtype):
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        scale = w.double().abs().max().clamp_min(1.0)
        err = (g.double() - w.double()).abs().max() / scale
        assert err <= TOL[dtype], f"relative error {err:.2e} for {tuple(w.shape)} {w.dtype}"


@pytest.mark.parametrize("n,dtype,variant", [
    *[(n, torch.float32, "mhc") for n in range(1, 10)],  # 9: the generic (not unrolled) n path
    *[(n, dt, "mhc") for n in (1, 3, 4) for dt in (torch.bfloat16, torch.float16, torch.float64)],
    *[(n, torch.float32, "hc") for n in (1, 4, 8)],
    (4, torch.bfloat16, "hc"),
])
def test_matches_reference_forward_and_backward(n, dtype, variant):
    c = 7 if n % 2 else 13   # odd channel counts: vector tails in every kernel
    g = torch.Generator().manual_seed(n)
    x = torch.randn(2, 5, n, c, generator=g).to(dtype)
    h_out = torch.randn(2, 5, c, generator=g).to(dtype)
    p = _params(n, c, variant, n, torch.float64 if dtype == torch.float64 else torch.float32)
    _close(_run("auto", x, h_out, p, variant), _run("reference", x, h_out, p, variant), dtype)


@pytest.mark.parametrize("n,dtype", [(1, torch.float32), (4, torch.float32), (4, torch.bfloat16), (8, torch.float64)])
def test_static_coefficients_broadcast(n, dtype):
    """dynamic=False: (1, 1, n) coefficients broadcast over tokens; their gradients are summed."""
    c = 9
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, n, c, generator=g).to(dtype)
    h_out = torch.randn(3, 4, c, generator=g).to(dtype)
    p = {k: v for k, v in _params(n, c, "mhc", 2, torch.float64 if dtype == torch.float64 else torch.float32).items()
         if k not in ("phi", "alpha")}
    _close(_run("auto", x, h_out, p, "mhc", False), _run("reference", x, h_out, p, "mhc", False), dtype)


def test_large_and_extreme_logits_and_many_tokens():
    """Sinkhorn logits far apart (the clamp at SPREAD) and tied maxima; T larger than one thread chunk."""
    n, c = 4, 40
    g = torch.Generator().manual_seed(5)
    x = torch.randn(300, n, c, generator=g)
    h_out = torch.randn(300, c, generator=g)
    p = _params(n, c, "mhc", 1)
    p["b_res"] = torch.tensor([[80.0, 0, 0, 80.0], [0, 3, 0, 0], [0, 0, -70, 0], [1, 0, 0, 2]])
    p["alpha"] = torch.tensor([0.5, 0.5, 0.0])  # alpha_res = 0: the biases alone, with a tie at the max
    _close(_run("auto", x, h_out, p, "mhc"), _run("reference", x, h_out, p, "mhc"), torch.float32)


def test_saturated_gates_match_reference():
    """Gate logits where the vector exp saturates (|z| around 88, 100 and 1e4: sigmoid at 0 or 1, no
    NaN) and Sinkhorn logits at the clamp, against the reference's torch.sigmoid and torch.exp."""
    n, c = 4, 8
    g = torch.Generator().manual_seed(9)
    x = torch.randn(21, n, c, generator=g)
    h_out = torch.randn(21, c, generator=g)
    p = _params(n, c, "mhc", 6)
    p["b_pre"] = torch.tensor([88.5, -88.5, 100.0, -1e4])
    p["b_post"] = torch.tensor([-87.5, 87.0, -100.0, 1e4])
    p["alpha"] = torch.tensor([0.0, 0.0, 30.0])
    _close(_run("auto", x, h_out, p, "mhc"), _run("reference", x, h_out, p, "mhc"), torch.float32)


def test_gate_sigmoids_follow_float64_across_the_range():
    """H_pre = sigmoid(z), H_post = 2 sigmoid(z) through the gates' vector exp: with alpha_pre = alpha_post = 0
    the logits are the biases, swept over [-100, 100] and exp's edges (log FLT_MAX, log FLT_MIN, the
    2^k split at k = 128 and -126); relative error within 4e-7 of float64, and 0 allowed below FLT_MIN
    (exp(-z) overflows float there, as std::exp does: the old scalar kernels gave 0 too)."""
    k = torch.ops.mhc_cpu
    n = 8
    z = torch.cat([torch.linspace(-100, 100, 1024),
                   torch.tensor([88.72, 88.7228, 88.5, 88.38, 88.37, 87.34, 87.33, -87.33, -87.34, -88.37, -88.72, 0.0])])
    z = torch.cat([z, z.new_zeros((-len(z)) % (2 * n))])
    flat, proj = torch.randn(3, n * 5), torch.randn(3, 2 * n + n * n)
    alpha, b_res = torch.tensor([0.0, 0.0, 1.0]), torch.zeros(n, n)
    for chunk in z.split(2 * n):
        hp, ho, _ = k.coeffs_fwd(flat, proj, alpha, chunk[:n], chunk[n:], b_res, 1e-6, n, 20, False)
        want = torch.sigmoid(chunk.double())
        for got, w in ((hp, want[:n]), (ho / 2, want[n:])):
            assert (got.double() - w).abs().le(4e-7 * w + 1.2e-38).all(), (chunk, got, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gates_do_not_depend_on_token_position(dtype):
    """The gates run 16 (float) or 8 (double) tokens per vector with spare lanes filled: a token's
    H_pre, H_post, H_res and every coeffs_bwd output are the same bits alone, in a partial group,
    and anywhere in a long run."""
    k = torch.ops.mhc_cpu
    n, c, T = 4, 12, 37
    g = torch.Generator().manual_seed(4)
    flat = torch.randn(T, n * c, generator=g, dtype=dtype)
    phi = 0.3 * torch.randn(n * c, 2 * n + n * n, generator=g, dtype=dtype)
    small = (torch.tensor([1.0, 0.7, 1.3], dtype=dtype), torch.randn(n, generator=g, dtype=dtype),
             torch.randn(n, generator=g, dtype=dtype), torch.randn(n, n, generator=g, dtype=dtype))
    grads = (torch.randn(T, n, generator=g, dtype=dtype), torch.randn(T, n, generator=g, dtype=dtype),
             torch.randn(T, n, n, generator=g, dtype=dtype))
    proj = flat @ phi
    full_f = k.coeffs_fwd(flat, proj, *small, 1e-6, n, 20, False)
    full_b = k.coeffs_bwd(*grads, flat, proj, *small, 1e-6, n, 20, False)
    for lo, hi in ((0, 1), (3, 4), (5, 12), (16, 33), (30, 37)):
        part_f = k.coeffs_fwd(flat[lo:hi], proj[lo:hi], *small, 1e-6, n, 20, False)
        part_b = k.coeffs_bwd(*(t[lo:hi] for t in grads), flat[lo:hi], proj[lo:hi], *small, 1e-6, n, 20, False)
        for a, b in zip(part_f, full_f):
            assert torch.equal(a, b[lo:hi]), (lo, hi)
        for a, b in zip(part_b[:2], full_b[:2]):  # per token: dh_r and coef (the rest are token sums)
            assert torch.equal(a, b[lo:hi]), (lo, hi)


def test_two_threads_give_the_same_bits():
    """Tokens split over intra-op threads; the token sums are reduced in token order: bitwise equal."""
    n, c = 4, 24
    g = torch.Generator().manual_seed(11)
    x, h_out = torch.randn(4, 97, n, c, generator=g), torch.randn(4, 97, c, generator=g)
    p = _params(n, c, "mhc", 3)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run("auto", x, h_out, p, "mhc")
        torch.set_num_threads(2)
        two = _run("auto", x, h_out, p, "mhc")
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


@pytest.mark.parametrize("n,variant", [(1, "mhc"), (3, "mhc"), (4, "hc")])
def test_float64_gradcheck_through_the_ops(n, variant):
    c = 3
    g = torch.Generator().manual_seed(n)
    x = torch.randn(2, n, c, generator=g, dtype=torch.float64, requires_grad=True)
    h_out = torch.randn(2, c, generator=g, dtype=torch.float64, requires_grad=True)
    p = _params(n, c, variant, n, torch.float64)
    names = sorted(p)
    leaves = [p[k].requires_grad_() for k in names]

    def f(x, h_out, *ts):
        return _site("auto", x, h_out, dict(zip(names, ts)), variant)

    assert gradcheck(f, (x, h_out, *leaves), fast_mode=n >= 3)


def test_reference_setting_and_fallback_select_the_reference(monkeypatch):
    """kernels="reference" never runs the CPU kernels; nor does "auto" when they are unavailable."""
    n, c = 4, 8
    x, h_out = torch.randn(6, n, c), torch.randn(6, c)
    p = _params(n, c, "mhc", 0)
    want = R.post_res_mix(x, h_out, *R.coeffs(x, p["phi"], p["alpha"], p["b_pre"], p["b_post"], p["b_res"])[1:])
    ran = []
    monkeypatch.setattr(torch.ops.mhc_cpu.post_res_fwd, "default", _Spy(torch.ops.mhc_cpu.post_res_fwd.default, ran),
                        raising=False)
    hp, ho, hr = ops.coeffs(x, p["phi"], p["alpha"], p["b_pre"], p["b_post"], p["b_res"], kernels="reference")
    assert torch.equal(ops.post_res(x, h_out, ho, hr, "reference"), want)
    monkeypatch.setitem(kernels_cpu._state, "ok", False)
    hp, ho, hr = ops.coeffs(x, p["phi"], p["alpha"], p["b_pre"], p["b_post"], p["b_res"], kernels="auto")
    assert torch.equal(ops.post_res(x, h_out, ho, hr, "auto"), want)


class _Spy:
    def __init__(self, fn, log):
        self.fn, self.log = fn, log

    def __call__(self, *a, **k):
        self.log.append(1)
        return self.fn(*a, **k)


# ----------------------------------------------------------------------------- op counts
def _count_site_ops(launch_fwd, launch_bwd, n=4, c=16, t=24):
    """Calls below autograd that do work (views and dtype queries left out) in one site's
    coeffs + pre + post_res forward, and in their backward."""
    from collections import Counter

    counts = Counter()

    class Count(dispatch_mode_base()):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view and func is not torch.ops.aten.promote_types.default:
                counts[str(func.overloadpacket)] += 1
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(0)
    x, h_out = torch.randn(t, n, c, generator=g), torch.randn(t, c, generator=g)
    p = _params(n, c, "mhc", 0)
    args = (p["phi"], p["alpha"], p["b_pre"], p["b_post"], p["b_res"])
    with Count():
        hp, ho, hr = launch_fwd["coeffs"](x, *args)
        launch_fwd["pre"](x, hp)
        y = launch_fwd["post_res"](x, h_out, ho, hr)
    fwd, counts = sum(counts.values()), Counter()
    with Count():
        launch_bwd["post_res"](y, x, h_out, ho, hr)
        _, ghp = launch_bwd["pre"](h_out, x, hp)
        launch_bwd["coeffs"](ghp, ho, hr, x, *args)
    return fwd, sum(counts.values())


def test_op_count_per_site_is_a_handful():
    from mhc_compile.kernels_cpu import launch as L

    fused = _count_site_ops(
        {"coeffs": lambda x, *a: L.coeffs_forward(x, *a, 20, 1e-6, "mhc"), "pre": L.pre_forward, "post_res": L.post_res_forward},
        {"coeffs": lambda *a: L.coeffs_backward(*a, 20, 1e-6, "mhc"), "pre": L.pre_backward, "post_res": L.post_res_backward},
    )
    ref = _count_site_ops(
        {"coeffs": lambda x, *a: R.coeffs(x, *a), "pre": R.pre_mix, "post_res": R.post_res_mix},
        {"coeffs": lambda *a: R.coeffs_backward(*a), "pre": R.pre_mix_backward, "post_res": R.post_res_mix_backward},
    )
    assert fused == FUSED_OPS_PER_SITE, (fused, ref)
    assert ref[0] > 5 * fused[0] and ref[1] > 5 * fused[1], (fused, ref)  # the reference: hundreds


# (forward, backward). Forward: the phi GEMM, mhc_cpu.coeffs_fwd (RMS, logits, gates, 20 Sinkhorn
# iterations), pre_fwd, post_res_fwd. Backward: post_res_bwd, pre_bwd, the phi GEMM again (recomputed),
# coeffs_bwd (Sinkhorn replay, bias/alpha sums), phi_grad_mm (the g_phi GEMM, written in phi's layout)
# and coeffs_gx (the g_x GEMM with the rank-1 RMS term as its epilogue).
FUSED_OPS_PER_SITE = (4, 6)


def test_under_torch_compile_matches_reference():
    """The ops stay opaque under torch.compile on CPU and run the fused kernels inside the graph
    (aot_eager: the same autograd and fake paths as inductor, without its C++ compile)."""
    torch._dynamo.reset()
    n, c = 3, 8
    p = {k: v.requires_grad_() for k, v in _params(n, c, "mhc", 4).items()}
    lin = torch.nn.Linear(c, c)

    def model(x, kernels):
        s = ops.expand(x, n)
        hp, ho, hr = ops.coeffs(s, p["phi"], p["alpha"], p["b_pre"], p["b_post"], p["b_res"], kernels=kernels)
        s, hp, ho, hr, h_in = ops.boundary(s, lin(ops.pre(s, hp, kernels)), ho, hr, p["phi"], p["alpha"], p["b_pre"],
                                           p["b_post"], p["b_res"], kernels=kernels)
        return ops.collapse(ops.post_res(s, lin(h_in), ho, hr, kernels))

    leaves = [*p.values(), *lin.parameters()]
    x = torch.randn(2, 5, c)
    want = model(x, "reference")
    want_grads = torch.autograd.grad(want.square().sum(), leaves)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=True)
    got = compiled(x, "auto")
    got_grads = torch.autograd.grad(got.square().sum(), leaves)
    _close([got, *got_grads], [want, *want_grads], torch.float32)
    assert compiled(torch.randn(3, 7, c), "auto").shape == (3, 7, c)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefetch_changes_no_bit(dtype):
    """The forward mixes prefetch rows a few tokens ahead (common.h): same outputs with it off, at token
    counts below, at and above the distance; set_prefetch returns the old distance and clamps at 0."""
    k = torch.ops.mhc_cpu
    n, c = 4, 40
    g = torch.Generator().manual_seed(2)
    phi = 0.1 * torch.randn(n * c, 2 * n + n * n, generator=g)
    small = (torch.ones(3), 0.1 * torch.randn(n, generator=g), 0.1 * torch.randn(n, generator=g), 0.1 * torch.randn(n, n, generator=g))
    calls = {
        "pre_fwd": lambda x, h, hp, hr: k.pre_fwd(x, hp),
        "pre_bwd": lambda x, h, hp, hr: k.pre_bwd(h, x, hp),
        "post_res_fwd": lambda x, h, hp, hr: k.post_res_fwd(x, h, hp, hr),
        "post_res_norm_fwd": lambda x, h, hp, hr: k.post_res_norm_fwd(x, h, hp, hr, None, None, 1e-5),
        "boundary_fwd": lambda x, h, hp, hr: k.boundary_fwd(x, h, hp, hr, phi, *small, 1e-6, 20, False),
    }
    old = k.set_prefetch(6)
    try:
        for t in (1, 6, 7, 37):
            x, h = torch.randn(t, n, c, generator=g).to(dtype), torch.randn(t, c, generator=g).to(dtype)
            hp, hr = torch.rand(t, n, generator=g), torch.rand(t, n, n, generator=g)
            for name, fn in calls.items():
                k.set_prefetch(6)
                on = fn(x, h, hp, hr)
                assert k.set_prefetch(0) == 6
                off = fn(x, h, hp, hr)
                on, off = (on,) if isinstance(on, torch.Tensor) else on, (off,) if isinstance(off, torch.Tensor) else off
                assert all(torch.equal(a, b) for a, b in zip(on, off)), (name, t)
        assert k.set_prefetch(-3) == 0 and k.set_prefetch(6) == 0
    finally:
        k.set_prefetch(old)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_wide_projection_tile_changes_no_bit(n):
    """On AVX-512 hosts the float projection GEMM (proj_mm, and inside site_start_fwd / boundary_fwd) holds
    16 + 8 outputs per token (gemm_tile_wide): the same FMA chain per output as the 8-lane tile, so the
    same bits, at token counts off its 8-token tile and at every n <= 4 (Kp = 8, 8, 16, 24)."""
    k = torch.ops.mhc_cpu
    c = 40
    g = torch.Generator().manual_seed(n)
    phi = torch.randn(n * c, 2 * n + n * n, generator=g)
    small = (torch.rand(3, generator=g), torch.randn(n, generator=g), torch.randn(n, generator=g), torch.randn(n, n, generator=g))
    old = k.set_wide_gemm(True)
    try:
        for t in (1, 7, 8, 37):
            x, h = torch.randn(t, n, c, generator=g), torch.randn(t, c, generator=g)
            hp, hr = torch.rand(t, n, generator=g), torch.rand(t, n, n, generator=g)
            calls = (lambda: [k.proj_mm(x.reshape(t, n * c), phi)],
                     lambda: k.site_start_fwd(x, phi, *small, 1e-6, 20, False),
                     lambda: k.boundary_fwd(x, h, hp, hr, phi, *small, 1e-6, 20, False))
            for fn in calls:
                k.set_wide_gemm(True)
                wide = fn()
                assert k.set_wide_gemm(False) is True
                narrow = fn()
                assert all(torch.equal(a, b) for a, b in zip(wide, narrow)), t
            assert torch.allclose(k.proj_mm(x.reshape(t, n * c), phi), x.reshape(t, n * c) @ phi, rtol=1e-4, atol=1e-4)
    finally:
        k.set_wide_gemm(old)


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_float_mixes_give_one_value_the_same_bits_in_every_lane_width(n):
    """The float pre / post_res forward (mix_tokens.h, also inside boundary_fwd) run C in 16-lane, then
    8-lane vectors, then one channel at a time. With C = 41, channel 0 falls in a 16-lane vector, 32 in an
    8-lane one and 40 in the scalar tail: given the same inputs there, they must give the same bits."""
    k = torch.ops.mhc_cpu
    c, t = 41, 5
    g = torch.Generator().manual_seed(n)
    x, h = torch.randn(t, n, c, generator=g), torch.randn(t, c, generator=g)
    for ch in (32, 40):
        x[..., ch], h[..., ch] = x[..., 0], h[..., 0]
    hp, hr = torch.rand(t, n, generator=g), torch.rand(t, n, n, generator=g)
    outs = [k.post_res_fwd(x, h, hp, hr), k.pre_fwd(x, hp)]
    if n <= 4:
        phi = torch.randn(n * c, 2 * n + n * n, generator=g)
        small = (torch.rand(3, generator=g), torch.randn(n, generator=g), torch.randn(n, generator=g),
                 torch.randn(n, n, generator=g))
        outs.append(k.boundary_fwd(x, h, hp, hr, phi, *small, 1e-6, 20, False)[0])
    for out in outs:
        assert torch.equal(out[..., 32], out[..., 0]) and torch.equal(out[..., 40], out[..., 0])
        assert not torch.equal(out[..., 1], out[..., 0])
