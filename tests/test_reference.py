"""The reference math (DESIGN.md section 1): gradchecks, Sinkhorn properties, precision, init."""
import itertools

import pytest
import torch
from torch.autograd import gradcheck as _gradcheck


def gradcheck(fn, inputs):
    """float64 gradcheck; the fast (random projection) mode once phi gets large (n >= 4)."""
    big = sum(t.numel() for t in inputs if isinstance(t, torch.Tensor)) > 300
    return _gradcheck(fn, inputs, fast_mode=big)

from mhc_compile import reference as R

NS = [1, 2, 3, 4, 8]


def _params(n, c, site=0, variant="mhc", dynamic=True, dtype=torch.float64, scale=0.3):
    """Random (nonzero) parameters so that every path of the math matters."""
    p = R.init_site_params(n, c, site, variant=variant, dynamic=dynamic, dtype=dtype)
    g = torch.Generator().manual_seed(n * 100 + c)
    return {k: (v + scale * torch.randn(v.shape, generator=g, dtype=dtype)).requires_grad_() for k, v in p.items()}


@pytest.mark.parametrize("n", NS)
def test_sinkhorn_gradcheck(n):
    logits = torch.randn(3, n, n, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda l: R.sinkhorn(l, 20), (logits,))


@pytest.mark.parametrize("n,variant,dynamic", list(itertools.product(NS, ["mhc", "hc"], [True, False])))
def test_coeffs_gradcheck(n, variant, dynamic):
    c = 3
    x = torch.randn(2, 2, n, c, dtype=torch.float64, requires_grad=True)
    p = _params(n, c, variant=variant, dynamic=dynamic)
    names = ["phi", "alpha"] if dynamic else []
    names += ["b_pre", "b_post", "b_res"]

    def fn(x, *ts):
        kw = dict(zip(names, ts))
        return R.coeffs(x, kw.get("phi"), kw.get("alpha"), kw["b_pre"], kw["b_post"], kw["b_res"],
                        iters=20, variant=variant, dynamic=dynamic)

    assert gradcheck(fn, (x, *[p[k] for k in names]))


@pytest.mark.parametrize("n", NS)
def test_mix_gradcheck(n):
    c = 5
    x = torch.randn(2, 3, n, c, dtype=torch.float64, requires_grad=True)
    h_out = torch.randn(2, 3, c, dtype=torch.float64, requires_grad=True)
    hp = torch.rand(2, 3, n, dtype=torch.float64, requires_grad=True)
    ho = torch.rand(2, 3, n, dtype=torch.float64, requires_grad=True)
    hr = torch.rand(2, 3, n, n, dtype=torch.float64, requires_grad=True)
    assert gradcheck(R.pre_mix, (x, hp))
    assert gradcheck(R.post_res_mix, (x, h_out, ho, hr))
    # static (broadcast) coefficients
    hp1 = torch.rand(1, 1, n, dtype=torch.float64, requires_grad=True)
    hr1 = torch.rand(1, 1, n, n, dtype=torch.float64, requires_grad=True)
    assert gradcheck(R.pre_mix, (x, hp1))
    assert gradcheck(R.post_res_mix, (x, h_out, hp1, hr1))


@pytest.mark.parametrize("n", NS)
def test_expand_collapse_gradcheck(n):
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda t: R.expand(t, n), (x,))
    xs = torch.randn(2, n, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(n, dtype=torch.float64, requires_grad=True)
    for mode in ("mean", "sum"):
        assert gradcheck(lambda t: R.collapse(t, mode), (xs,))
    assert gradcheck(lambda t, w: R.collapse(t, "learned", w), (xs, w))


@pytest.mark.parametrize("n", NS)
def test_site_gradcheck(n):
    c = 4
    x = torch.randn(3, n, c, dtype=torch.float64, requires_grad=True)
    lin = torch.nn.Linear(c, c, dtype=torch.float64)
    p = _params(n, c)
    assert gradcheck(lambda x, phi: R.site(x, lin, {**p, "phi": phi}), (x, p["phi"]))


@pytest.mark.parametrize("n", [2, 3, 4, 8])
def test_sinkhorn_is_doubly_stochastic(n):
    # Moderate mixing logits (std 0.5): 20 iterations converge the columns within 1e-3.
    logits = 0.5 * torch.randn(512, n, n)
    m = R.sinkhorn(logits, 20)
    assert (m.sum(-1) - 1).abs().max() < 1e-6  # rows: exact to fp32 rounding (last step)
    assert (m.sum(-2) - 1).abs().max() < 1e-3  # columns: converged within 1e-3
    assert (m >= 0).all()
    # Near-identity logits (the preserve init 6I-3 plus noise) converge slower: Sinkhorn's
    # rate depends on the spread. Measured bound at 20 iterations (docs/design.md).
    m = R.sinkhorn(R.init_biases(n, 0)["b_res"] + 0.3 * torch.randn(512, n, n), 20)
    assert (m.sum(-1) - 1).abs().max() < 1e-6
    assert (m.sum(-2) - 1).abs().max() < 2.5e-2


def test_sinkhorn_rows_preserve_copies():
    n, c = 4, 16
    x = torch.randn(5, c)
    streams = R.expand(x, n)
    m = R.sinkhorn(torch.randn(5, n, n), 20)
    out = torch.matmul(m, streams)
    torch.testing.assert_close(out, streams, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n", [1, 3, 8])
def test_extreme_logits_are_finite(n):
    logits = torch.tensor([1e4, -1e4]).repeat(n * n)[: n * n].reshape(1, n, n)
    logits = torch.cat([logits, torch.full((1, n, n), -1e4), torch.full((1, n, n), 1e4)])
    m = R.sinkhorn(logits, 20)
    assert torch.isfinite(m).all()
    assert (m.sum(-1) - 1).abs().max() < 1e-5
    # through coeffs too: huge biases and a huge projection
    x = torch.randn(4, n, 8) * 1e3
    p = R.init_site_params(n, 8, 0)
    p = {k: v * 1e4 + 1e4 * torch.randn_like(v) for k, v in p.items()}
    outs = R.coeffs(x, p["phi"], p["alpha"], p["b_pre"], p["b_post"], p["b_res"])
    assert all(torch.isfinite(o).all() for o in outs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_coefficients_are_fp32_whatever_the_input(dtype):
    n, c = 4, 8
    x = torch.randn(3, n, c).to(dtype)
    p = _params(n, c, dtype=torch.float32)
    outs = R.coeffs(x, p["phi"], p["alpha"], p["b_pre"], p["b_post"], p["b_res"])
    assert all(o.dtype == torch.float32 for o in outs)
    ref = R.coeffs(x.float(), p["phi"], p["alpha"], p["b_pre"], p["b_post"], p["b_res"])
    for o, r in zip(outs, ref):
        torch.testing.assert_close(o, r)  # same math: bf16 x is upcast exactly before anything
    assert R.pre_mix(x, outs[0]).dtype == dtype
    assert R.post_res_mix(x, x[:, 0], outs[1], outs[2]).dtype == dtype


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("variant", ["mhc", "hc"])
@pytest.mark.parametrize("dynamic", [True, False])
def test_preserve_init_computes_x_plus_f(n, variant, dynamic):
    c = 32
    x = torch.randn(6, 7, c)
    f = torch.nn.Sequential(torch.nn.Linear(c, c), torch.nn.GELU())
    streams = R.expand(x, n)
    for site in range(2 * n):
        p = R.init_site_params(n, c, site, variant=variant, dynamic=dynamic)
        out = R.site(streams, f, p, variant=variant, dynamic=dynamic)
        want = x + f(x)
        for i in range(n):
            err = (out[..., i, :] - want).abs().max() / want.abs().max()
            assert err <= 1e-6, (site, i, err.item())
        torch.testing.assert_close(R.collapse(out, "mean"), want, rtol=1e-6, atol=1e-6)
        w = R.init_collapse_weight(n)
        torch.testing.assert_close(R.collapse(out, "learned", w), want, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("n", [2, 3, 4, 8])
def test_preserve_init_pre_gates_sum_to_one_and_home_streams_differ(n):
    homes = []
    for site in range(2 * n):
        b = R.init_biases(n, site)
        h_pre = torch.sigmoid(b["b_pre"])
        assert abs(h_pre.sum().item() - 1.0) < 1e-6
        assert h_pre.argmax().item() == R.home_stream(site, n)
        assert not torch.allclose(h_pre, torch.full_like(h_pre, 1.0 / n))  # not symmetric
        homes.append(h_pre.argmax().item())
    assert homes[:n] == list(range(n))  # consecutive sites read different streams
    assert all(a != b for a, b in zip(homes, homes[1:]))
    h_res = R.sinkhorn(R.init_biases(n, 0)["b_res"], 20)
    assert (torch.diagonal(h_res) > 0.9).all()  # near identity


def test_paper_init():
    p = R.init_site_params(4, 8, 0, init="paper")
    assert p["phi"].abs().sum() > 0 and p["b_pre"].abs().sum() == 0 and p["b_res"].abs().sum() == 0
    hc = R.init_site_params(4, 8, 2, variant="hc", init="preserve")
    assert hc["b_pre"].tolist() == [0, 0, 1, 0] and hc["b_post"].tolist() == [1] * 4
    assert torch.equal(hc["b_res"], torch.eye(4))
    assert "phi" not in R.init_site_params(4, 8, 0, dynamic=False)


def test_static_coeffs_broadcast_over_tokens():
    n = 3
    x = torch.randn(2, 5, n, 4)
    p = _params(n, 4, dynamic=False, dtype=torch.float32)
    hp, ho, hr = R.coeffs(x, None, None, p["b_pre"], p["b_post"], p["b_res"], dynamic=False)
    assert hp.shape == (1, 1, n) and hr.shape == (1, 1, n, n)
    assert R.pre_mix(x, hp).shape == (2, 5, 4)


def test_bad_arguments():
    x = torch.randn(2, 2, 3)
    b = R.init_biases(2, 0)
    with pytest.raises(ValueError, match="phi and alpha"):
        R.coeffs(x, None, None, b["b_pre"], b["b_post"], b["b_res"])
    with pytest.raises(ValueError, match="variant"):
        R.activate(x[..., 0], x[..., 0], x, iters=1, variant="dense")
    with pytest.raises(ValueError, match="collapse"):
        R.collapse(x, "max")
    with pytest.raises(ValueError, match="weight"):
        R.collapse(x, "learned")


# ----------------------------------------------------------------------------- hand-written backward
def _autograd(fn, inputs, grads):
    leaves = [t.detach().requires_grad_() for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    return torch.autograd.grad(outs, leaves, grads, allow_unused=True)


@pytest.mark.parametrize("n", NS)
def test_sinkhorn_backward_matches_autograd(n):
    logits = 2 * torch.randn(4, n, n, dtype=torch.float64)
    logits[0, 0, 0] = 80.0  # one entry clamps the others (spread > 50)
    g = torch.randn(4, n, n, dtype=torch.float64)
    (want,) = _autograd(lambda l: R.sinkhorn(l, 7), (logits,), (g,))
    torch.testing.assert_close(R.sinkhorn_backward(g, logits, 7), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("n,variant", list(itertools.product(NS, ["mhc", "hc"])))
def test_coeffs_backward_matches_autograd(n, variant):
    c = 5
    x = torch.randn(2, 3, n, c, dtype=torch.float64)
    p = {k: v.detach() for k, v in _params(n, c, variant=variant).items()}
    names = ["phi", "alpha", "b_pre", "b_post", "b_res"]
    grads = (torch.randn(2, 3, n, dtype=torch.float64), torch.randn(2, 3, n, dtype=torch.float64),
             torch.randn(2, 3, n, n, dtype=torch.float64))
    want = _autograd(lambda x, *ts: R.coeffs(x, *ts, variant=variant), (x, *[p[k] for k in names]), grads)
    got = R.coeffs_backward(*grads, x, *[p[k] for k in names], variant=variant)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("static", [False, True])
def test_mix_backward_matches_autograd(n, static):
    c = 6
    lead = (1, 1) if static else (2, 3)
    x = torch.randn(2, 3, n, c, dtype=torch.float64)
    h_out = torch.randn(2, 3, c, dtype=torch.float64)
    hp, hr = torch.rand(*lead, n, dtype=torch.float64), torch.rand(*lead, n, n, dtype=torch.float64)
    g1, g2 = torch.randn(2, 3, c, dtype=torch.float64), torch.randn(2, 3, n, c, dtype=torch.float64)
    for got, want in [
        (R.pre_mix_backward(g1, x, hp), _autograd(R.pre_mix, (x, hp), (g1,))),
        (R.post_res_mix_backward(g2, x, h_out, hp, hr), _autograd(R.post_res_mix, (x, h_out, hp, hr), (g2,))),
    ]:
        for g, w in zip(got, want):
            assert g.shape == w.shape
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
