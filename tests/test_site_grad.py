"""One dX per site (mhc_compile.site_grad): in eager autograd, pre and post_res/boundary hand their
part of a site's dX to the coeffs backward, which writes it once. Gradients must equal autograd
through the plain-torch reference (perturbed parameters), after partial backward passes too, and
float64 gradcheck must pass through the same entry points."""
import pytest
import torch

import mhc_compile.ops  # noqa: F401  (registers the mhc:: ops; the package imports it lazily)
from mhc_compile import reference, site_grad

T, N, C = 9, 4, 24


def _params(seed, n=N, c=C, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    p = reference.init_site_params(n, c, seed, init="paper", generator=gen)
    return [(p[k] + 0.3 * torch.randn(p[k].shape, generator=gen)).to(dtype).detach().requires_grad_()
            for k in ("phi", "alpha", "b_pre", "b_post", "b_res")]


def _site(x, p, k, outs=None):
    hp, ho, hr = torch.ops.mhc.coeffs(x, *p, 20, 1e-6, "mhc", k)
    h_out = torch.tanh(torch.ops.mhc.pre(x, hp, k))
    if outs is not None:
        outs.update(ho=ho, h_out=h_out)
    return torch.ops.mhc.post_res(x, h_out, ho, hr, k)


def _block2(x, p, q, k):
    hp, ho, hr = torch.ops.mhc.coeffs(x, *p, 20, 1e-6, "mhc", k)
    h = torch.ops.mhc.pre(x, hp, k)
    x1, _, ho2, hr2, h2 = torch.ops.mhc.boundary(x, torch.tanh(h), ho, hr, *q, 20, 1e-6, "mhc", k)
    return torch.ops.mhc.post_res(x1, torch.sin(h2), ho2, hr2, k)


def _ref_site(x, p):
    hp, ho, hr = reference.coeffs(x, *p, iters=20, eps=1e-6)
    return reference.post_res_mix(x, torch.tanh(reference.pre_mix(x, hp)), ho, hr)


def _ref_block2(x, p, q):
    hp, ho, hr = reference.coeffs(x, *p, iters=20, eps=1e-6)
    x1 = reference.post_res_mix(x, torch.tanh(reference.pre_mix(x, hp)), ho, hr)
    hp2, ho2, hr2 = reference.coeffs(x1, *q, iters=20, eps=1e-6)
    return reference.post_res_mix(x1, torch.sin(reference.pre_mix(x1, hp2)), ho2, hr2)


@pytest.fixture
def handovers(monkeypatch):
    seen = []
    orig = site_grad.SiteGrad.add

    def add(self, **kw):
        seen.append(sorted(k for k, v in kw.items() if v is not None))
        return orig(self, **kw)

    monkeypatch.setattr(site_grad.SiteGrad, "add", add)
    return seen


@pytest.mark.parametrize("kernels", ["triton", "reference"])
@pytest.mark.parametrize("form", ["site", "block2"])
def test_grads_equal_reference_autograd(kernels, form, handovers):
    x0 = torch.randn(T, N, C)
    p, q = _params(1), _params(2)
    g = torch.randn(T, N, C)
    x = x0.clone().requires_grad_()
    out = _site(x, p, kernels) if form == "site" else _block2(x, p, q, kernels)
    got = torch.autograd.grad(out, [x, *p, *q], g, allow_unused=True)
    xr = x0.clone().requires_grad_()
    ref = _ref_site(xr, p) if form == "site" else _ref_block2(xr, p, q)
    want = torch.autograd.grad(ref, [xr, *p, *q], g, allow_unused=True)
    for a, b in zip(got, want):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-4)
    # post_res (site) hands over the gradient of its mix (coeffs computes H_res^T g), the boundary
    # (block2) its dX (computed in its own second pass), pre its incoming gradient; in block2 site
    # 2's post_res hands its mix's gradient to the boundary (whose backward adds H_res^T g to dX');
    # the reference keeps autograd's adds (autograd.grad of leaves: the engine cannot say whether
    # coeffs runs, so pre computes its own dH_pre; with .backward() it leaves it to the coeffs dh
    # kernel, "owe_dh")
    want = [["g_hin", "h_pre"], ["g_mix", "h_mix"]]
    want = want if form == "site" else [["g_add"], *want]
    assert sorted(handovers) == (want if kernels == "triton" else [])


def test_partial_pass_does_not_leak_into_the_next(handovers):
    """Pass 1 reaches post_res and pre but not coeffs (grad of the branch output only): what they
    handed over is dropped when that pass ends, so pass 2 (through coeffs only) is exact."""
    x0 = torch.randn(T, N, C)
    p = _params(3)
    x = x0.clone().requires_grad_()
    outs = {}
    out = _site(x, p, "triton", outs)
    torch.autograd.grad(out, [outs["h_out"]], torch.randn_like(out), retain_graph=True)
    assert handovers == [["g_mix", "h_mix"]]
    (gx,) = torch.autograd.grad(outs["ho"].square().sum(), [x])
    xr = x0.clone().requires_grad_()
    _, ho_ref, _ = reference.coeffs(xr, *p, iters=20, eps=1e-6)
    (gx_ref,) = torch.autograd.grad(ho_ref.square().sum(), [xr])
    torch.testing.assert_close(gx, gx_ref, rtol=2e-4, atol=2e-5)


def test_retained_graph_twice_gives_the_same_grads():
    x = torch.randn(T, N, C, requires_grad=True)
    p = _params(4)
    out = _site(x, p, "triton")
    g = torch.randn_like(out)
    first = torch.autograd.grad(out, [x, *p], g, retain_graph=True)
    second = torch.autograd.grad(out, [x, *p], g)
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_boundary_next_site_mailbox_with_other_consumers(handovers):
    """Site 2's X (the boundary's X') feeds its post_res (hands over its mix's gradient), a
    separate pre on the boundary's H_pre (hands over g_hin, computes its own dH_pre) and a plain
    torch op (autograd's gradient): all reach dX' once; gradients equal the reference."""
    x0 = torch.randn(T, N, C)
    p, q = _params(9), _params(10)
    g = torch.randn(T, N, C)

    def run(k):
        x = x0.clone().requires_grad_()
        if k == "ref":
            hp, ho, hr = reference.coeffs(x, *p, iters=20, eps=1e-6)
            x1 = reference.post_res_mix(x, torch.tanh(reference.pre_mix(x, hp)), ho, hr)
            hp2, ho2, hr2 = reference.coeffs(x1, *q, iters=20, eps=1e-6)
            h2, extra = reference.pre_mix(x1, hp2), reference.pre_mix(x1, hp2)
        else:
            hp, ho, hr = torch.ops.mhc.coeffs(x, *p, 20, 1e-6, "mhc", k)
            h = torch.ops.mhc.pre(x, hp, k)
            x1, hp2, ho2, hr2, h2 = torch.ops.mhc.boundary(x, torch.tanh(h), ho, hr, *q, 20, 1e-6, "mhc", k)
            extra = torch.ops.mhc.pre(x1, hp2, k)
        out = reference.post_res_mix(x1, torch.sin(h2), ho2, hr2) if k == "ref" else \
            torch.ops.mhc.post_res(x1, torch.sin(h2), ho2, hr2, k)
        loss = (out * g).sum() + extra.square().sum() + 0.5 * x1.square().sum()
        return torch.autograd.grad(loss, [x, *p, *q])

    got, want = run("triton"), run("ref")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-4)
    assert ["g_mix", "h_mix"] in handovers and ["g_hin", "h_pre"] in handovers


def test_no_handover_without_x_grad_or_for_other_streams(handovers):
    p = _params(5)
    x = torch.randn(T, N, C)  # no grad: params only
    _site(x, p, "triton").sum().backward()
    y = torch.randn(T, N, C, requires_grad=True)
    hp, ho, hr = torch.ops.mhc.coeffs(y, *p, 20, 1e-6, "mhc", "triton")
    other = y.detach().clone().requires_grad_()  # post_res on other streams: not this site's X
    torch.ops.mhc.post_res(other, torch.ops.mhc.pre(y, hp, "triton"), ho, hr, "triton").sum().backward()
    assert handovers == [["g_hin", "h_pre", "owe_dh"]]
    assert other.grad is not None and y.grad is not None


def test_grad_of_h_pre_itself_is_computed_by_pre(handovers):
    """Asked for the gradient of H_pre (coeffs' output) and not of X or the parameters, the
    coeffs backward does not run in the pass: pre computes dH_pre itself (perturbed parameters),
    and in a full pass it leaves it to coeffs (engine_will_run, a private engine query: this
    test is its canary)."""
    x0 = torch.randn(T, N, C)
    p = _params(8)
    x = x0.clone().requires_grad_()
    hp, ho, hr = torch.ops.mhc.coeffs(x, *p, 20, 1e-6, "mhc", "triton")
    out = torch.ops.mhc.post_res(x, torch.tanh(torch.ops.mhc.pre(x, hp, "triton")), ho, hr, "triton")
    g = torch.randn_like(out)
    (ghp,) = torch.autograd.grad(out, [hp], g, retain_graph=True)
    assert sorted(handovers) == [["g_hin", "h_pre"], ["g_mix", "h_mix"]]
    xr = x0.clone().requires_grad_()
    hpr, hor, hrr = (t.detach().requires_grad_() for t in reference.coeffs(xr, *p, iters=20, eps=1e-6))
    ref = reference.post_res_mix(xr, torch.tanh(reference.pre_mix(xr, hpr)), hor, hrr)
    (ghp_ref,) = torch.autograd.grad(ref, [hpr], g)
    torch.testing.assert_close(ghp, ghp_ref, rtol=2e-4, atol=2e-4)
    handovers.clear()
    out.backward(g)
    assert sorted(handovers) == [["g_hin", "h_pre", "owe_dh"], ["g_mix", "h_mix"]]
    xr.grad = None
    hp_r, ho_r, hr_r = reference.coeffs(xr, *[t.detach().requires_grad_() for t in p], iters=20, eps=1e-6)
    ref = reference.post_res_mix(xr, torch.tanh(reference.pre_mix(xr, hp_r)), ho_r, hr_r)
    ref.backward(g)
    torch.testing.assert_close(x.grad, xr.grad, rtol=2e-4, atol=2e-4)


def test_float64_gradcheck_through_the_site():
    """float64 runs the reference (no mailbox): the entry points stay gradcheckable."""
    n, c = 2, 3
    x = torch.randn(2, n, c, dtype=torch.float64, requires_grad=True)
    p = _params(6, n, c, torch.float64)
    assert torch.autograd.gradcheck(lambda x, *p: _site(x, p, "triton"), (x, *p), eps=1e-6, atol=1e-5)


def test_coefficients_copy_and_pickle_without_the_mailbox():
    """A copied or pickled coefficient tensor is no site's output: its mailbox becomes None."""
    import copy
    import pickle

    x = torch.randn(2, N, C, requires_grad=True)
    hp, _, _ = torch.ops.mhc.coeffs(x, *_params(7), 20, 1e-6, "mhc", "triton")
    box = hp._mhc_site_grad
    assert isinstance(box, site_grad.SiteGrad) and box.reads(x, h_pre=hp)
    assert copy.deepcopy(box) is None and pickle.loads(pickle.dumps(box)) is None
    assert pickle.loads(pickle.dumps({"box": box})) == {"box": None}
