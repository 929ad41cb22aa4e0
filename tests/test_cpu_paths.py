"""CPU shortcuts of the mhc_compile.ops wrappers (mhc_compile/ops/cpu_paths.py): the eager fast path
that calls the fused CPU kernels without the mhc:: custom ops, and, under torch.compile on CPU, pre and
post_res emitted as aten math for inductor.

At perturbed mHC parameters: the fast path gives the custom ops' outputs and every gradient bit for
bit (per op, one site + boundary, and a converted GPT's loss and every parameter gradient); the
compiled form equals eager and its graph holds mhc::coeffs but no mhc::pre / mhc::post_res, while
the "mhc" backend's graph keeps them (no inlining under AOTAutograd); the private probe it relies on (plain_dispatch) is checked against the installed torch.
"""
import pytest
import torch

from mhc_compile import MHCConfig, convert, kernels_cpu, ops
from mhc_compile import reference as R
from mhc_compile._torch_internals import dispatch_mode_base, plain_dispatch
from mhc_compile.models import TinyGPT
from mhc_compile.kernels_cpu import launch
from mhc_compile.ops import cpu_paths

pytestmark = pytest.mark.skipif(not kernels_cpu.available(), reason=f"CPU kernels not built: {kernels_cpu.build_error()}")


def test_plain_dispatch_canary():
    assert plain_dispatch()

    class Mode(dispatch_mode_base()):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Mode():
        assert not plain_dispatch()
    seen = []
    torch.vmap(lambda t: seen.append(plain_dispatch()) or t)(torch.ones(2, 3))
    assert seen == [False]
    assert plain_dispatch()


def _params(n, c, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    p = R.init_site_params(n, c, seed, dtype=torch.float64)
    return {k: (v + 0.3 * torch.randn(v.shape, generator=g, dtype=torch.float64)).to(dtype) for k, v in p.items()}


def _site_grads(x, h_out, p):
    """Outputs of coeffs, pre, post_res and a boundary, plus every input gradient, and the grad_fn names."""
    xx, hh = x.clone().requires_grad_(), h_out.clone().requires_grad_()
    pp = {k: v.clone().requires_grad_() for k, v in p.items()}
    args = (pp["phi"], pp["alpha"], pp["b_pre"], pp["b_post"], pp["b_res"])
    hp, ho, hr = ops.coeffs(xx, *args)
    h_in = ops.pre(xx, hp)
    x1 = ops.post_res(xx, hh * h_in.tanh(), ho, hr)
    outs = (hp, ho, hr, h_in, x1, *ops.boundary(x1, hh, ho, hr, *args))
    g = torch.Generator().manual_seed(7)
    torch.autograd.backward(outs[:-2] + outs[-1:], [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in outs[:-2] + outs[-1:]])
    names = {type(o.grad_fn).__name__ for o in outs}
    return [o.detach() for o in outs] + [xx.grad, hh.grad] + [pp[k].grad for k in sorted(pp)], names


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_fast_path_equals_the_custom_ops(monkeypatch, dtype):
    n, c = 4, 24
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, n, c, generator=g).to(dtype)
    h_out = torch.randn(2, 5, c, generator=g).to(dtype)
    p = _params(n, c, 3, torch.float32)
    fast, fast_names = _site_grads(x, h_out, p)
    monkeypatch.setattr(cpu_paths, "_FAST", False)
    slow, slow_names = _site_grads(x, h_out, p)
    assert {"_CoeffsBackward", "_PreBackward", "_PostResBackward", "_BoundaryBackward"} <= fast_names
    assert not fast_names & slow_names  # the second run took the custom ops
    assert len(fast) == len(slow) == 17
    for a, b in zip(fast, slow):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_eager_fast_path_without_grad_and_under_a_mode():
    n, c = 3, 16
    x, p = torch.randn(6, n, c), _params(n, c, 1, torch.float32)
    args = (p["phi"], p["alpha"], p["b_pre"], p["b_post"], p["b_res"])
    with torch.no_grad():
        hp, ho, hr = ops.coeffs(x, *args)
        fast = ops.post_res(x, ops.pre(x, hp), ho, hr)
    calls = []

    class Mode(dispatch_mode_base()):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            calls.append(str(func))
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Mode():  # a mode sees the mhc:: ops, as diagnostics.record_streams needs
        hp2, ho2, hr2 = ops.coeffs(x, *args)
        slow = ops.post_res(x, ops.pre(x, hp2), ho2, hr2)
    assert {"mhc.coeffs.default", "mhc.pre.default", "mhc.post_res.default"} <= set(calls)
    assert torch.equal(fast, slow) and torch.equal(hr, hr2)
    with ops.record_coeffs() as rec:  # a recorder gets every site's coefficients (custom-op path)
        ops.coeffs(x, *args)
    assert len(rec) == 1 and torch.equal(rec[0][2], hr)


def _gpt(seed=0):
    torch.manual_seed(seed)
    model = TinyGPT(vocab=64, dim=32, layers=2, heads=2, max_len=16)
    ids = torch.randint(0, 64, (2, 16))
    conv = convert(model, MHCConfig(streams=4), (ids,))
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for name, q in conv.named_parameters():
            if ".mhc." in name or name.startswith("mhc"):
                q.add_(0.3 * torch.randn(q.shape, generator=g))
    return conv, ids


def _loss_and_grads(model, ids, fwd=None):
    model.zero_grad(set_to_none=True)
    out = (model if fwd is None else fwd)(ids)
    loss = out.float().pow(2).mean()
    loss.backward()
    return loss.detach(), {k: q.grad.clone() for k, q in model.named_parameters() if q.grad is not None}


def test_converted_model_fast_path_equals_the_custom_ops(monkeypatch):
    model, ids = _gpt()
    loss, grads = _loss_and_grads(model, ids)
    monkeypatch.setattr(cpu_paths, "_FAST", False)
    loss2, grads2 = _loss_and_grads(model, ids)
    assert torch.equal(loss, loss2) and grads.keys() == grads2.keys()
    assert any(".mhc." in k or k.startswith("mhc") for k in grads)
    for k in grads:
        assert torch.equal(grads[k], grads2[k]), k


def test_compiled_cpu_inlines_pre_and_post_res(monkeypatch):
    """With the compiled kernels off (``cpu_paths.COMPILED_KERNELS``; on: tests/test_compiled_cpu.py) a
    compiled train step runs ``mhc::coeffs`` and the inlined mixes."""
    monkeypatch.setattr(cpu_paths, "COMPILED_KERNELS", False)
    model, ids = _gpt()
    loss, grads = _loss_and_grads(model, ids)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        from torch._dynamo.backends.common import aot_autograd
        return aot_autograd(fw_compiler=lambda g, _: g, bw_compiler=lambda g, _: g)(gm, example_inputs)

    torch._dynamo.reset()
    loss2, grads2 = _loss_and_grads(model, ids, torch.compile(model, backend=backend, fullgraph=True))
    targets = {str(nd.target) for gm in graphs for nd in gm.graph.nodes if nd.op == "call_function"}
    assert any("mhc.coeffs" in t for t in targets)
    assert not any("mhc.pre" in t or "mhc.post_res" in t or "mhc.boundary" in t for t in targets)
    assert torch.allclose(loss, loss2, rtol=1e-5, atol=1e-7)
    for k in grads:
        scale = grads[k].abs().max().clamp_min(1e-3)
        assert (grads[k] - grads2[k]).abs().max() <= 2e-4 * scale, k
    torch._dynamo.reset()


def test_mhc_backend_keeps_the_custom_ops(monkeypatch):
    """The "mhc" backend's rewritten graph is traced by AOTAutograd, not Dynamo: no inlining there, so
    the recompute pass still finds the mhc:: ops in the joint graph."""
    inlined = []
    monkeypatch.setattr(cpu_paths, "pre_inline", lambda *a: inlined.append(1))
    monkeypatch.setattr(cpu_paths, "post_res_inline", lambda *a: inlined.append(1))
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinyGPT(vocab=64, dim=32, layers=2, heads=2, max_len=16)
    out = torch.compile(model, backend="mhc")(torch.randint(0, 64, (2, 16)))
    out.float().pow(2).mean().backward()
    assert not inlined and torch.isfinite(out).all()
    torch._dynamo.reset()


def _count_pre_calls(monkeypatch):
    from mhc_compile.kernels_cpu import launch

    calls = []
    real = launch.pre_forward
    monkeypatch.setattr(launch, "pre_forward", lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.parametrize("grad", [False, True])
def test_site_start_hands_its_h_in_to_the_pre_that_follows(monkeypatch, grad):
    """coeffs computes h_in in its pass; the pre on the same, unmodified X with the same H_pre takes it
    (no pre kernel), bit-equal to the custom ops; a modified X, another H_pre or inference tensors
    compute pre anew, with the numbers of the new inputs."""
    n, c = 4, 24
    x = torch.randn(2, 5, n, c, generator=torch.Generator().manual_seed(2))
    p = _params(n, c, 5, torch.float32)
    args = (p["phi"], p["alpha"], p["b_pre"], p["b_post"], p["b_res"])
    calls = _count_pre_calls(monkeypatch)
    with torch.set_grad_enabled(grad):
        xx = x.clone().requires_grad_(grad)
        hp, _, _ = ops.coeffs(xx, *args)
        h_in = ops.pre(xx, hp)
        assert calls == []
        want = R.pre_mix(x, hp.detach())
        torch.testing.assert_close(h_in.detach(), want, rtol=1e-6, atol=1e-6)
        monkeypatch.setattr(cpu_paths, "_FAST", False)
        assert torch.equal(h_in.detach(), ops.pre(x, hp.detach()))  # the custom op's bits
        monkeypatch.setattr(cpu_paths, "_FAST", True)
        if grad:
            (h_in.sum() + hp.sum()).backward()
            assert xx.grad is not None and torch.isfinite(xx.grad).all()

    calls.clear()  # the custom op's pre above ran the kernel
    with torch.no_grad():
        y = x.clone()
        hp, _, _ = ops.coeffs(y, *args)
        y.mul_(2.0)  # modified after coeffs: pre must read the new values
        torch.testing.assert_close(ops.pre(y, hp), R.pre_mix(y, hp), rtol=1e-6, atol=1e-6)
        assert len(calls) == 1
        hp, _, _ = ops.coeffs(x, *args)
        other = hp.flip(-1).contiguous()
        torch.testing.assert_close(ops.pre(x, other), R.pre_mix(x, other), rtol=1e-6, atol=1e-6)
        assert len(calls) == 2
        hp, _, _ = ops.coeffs(x, *args)
        hp.mul_(0.5)  # the coeffs output itself, modified in place (its version moved): pre anew
        torch.testing.assert_close(ops.pre(x, hp), R.pre_mix(x, hp), rtol=1e-6, atol=1e-6)
        assert len(calls) == 3
    with torch.inference_mode():
        z = x.clone()
        hp, _, _ = ops.coeffs(z, *args)
        z.add_(1.0)  # inference tensors track no version: the hand-over is off for them
        torch.testing.assert_close(ops.pre(z, hp), R.pre_mix(z, hp), rtol=1e-6, atol=1e-6)
        assert len(calls) == 4


def _coef_always(h, lead, tail, cd):
    per = h.shape[h.dim() - tail:]
    if h.numel() != per.numel():
        h = h.expand(*lead, *per)
    return h.reshape(-1, *per).to(cd)


# the launchers' layout helpers as they were before the shortcuts: an aten call every time
_ALWAYS_ATEN = {
    "_to": lambda t, dtype: t.to(dtype),
    "_flat3": lambda x: x.reshape(-1, x.shape[-2], x.shape[-1]),
    "_flat2": lambda t, c: t.reshape(-1, c),
    "_rows": lambda t, lead, *tail: t.reshape(*lead, *tail),
    "_shaped": lambda t, shape: t.reshape(shape),
    "_coef": _coef_always,
    "_per_token": lambda g, lead, tail, cd: g.to(cd).expand(*lead, *tail).reshape(-1, *tail),
}


@pytest.mark.parametrize("lead,coef_lead", [((), ()), ((5,), (5,)), ((5,), (1,)), ((5,), ()), ((2, 3), (2, 3)),
                                            ((2, 3), (3,)), ((2, 3), (1, 1))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fast_path_layout_shortcuts(monkeypatch, lead, coef_lead, dtype):
    """The launchers skip reshape / expand / .to where they would not change the data (kernels_cpu/launch.py):
    every token layout (no token dim, one, two), per-token and broadcast coefficients, float64 streams with
    float32 coefficients, bit for bit the custom ops' outputs and gradients (the shortcut cannot pick a wrong path)."""
    n, c = 4, 8
    g = torch.Generator().manual_seed(5)
    x = torch.randn(*lead, n, c, generator=g, dtype=dtype)
    h_out = torch.randn(*lead, c, generator=g, dtype=dtype)
    h_pre = torch.rand(*coef_lead, n, generator=g)
    h_post = torch.rand(*coef_lead, n, generator=g)
    h_res = torch.rand(*coef_lead, n, n, generator=g)
    p = _params(n, c, 2, torch.float32)

    def run():
        leaves = [t.clone().requires_grad_() for t in (x, h_out, h_pre, h_post, h_res)]
        xx, hh, hp, ho, hr = leaves
        pp = [p[k].clone().requires_grad_() for k in ("phi", "alpha", "b_pre", "b_post", "b_res")]
        outs = (*ops.coeffs(xx, *pp), ops.pre(xx, hp), ops.post_res(xx, hh, ho, hr))
        if dtype == torch.float32:
            outs += ops.boundary(xx, hh, ho, hr, *pp)
        loss = sum((o.double() * torch.linspace(-1, 1, o.numel(), dtype=torch.float64).view(o.shape)).sum() for o in outs)
        loss.backward()
        only_res = torch.autograd.grad(ops.coeffs(xx, *pp)[2].sum(), [xx, *pp])  # h_pre, h_post: no gradient (zeros)
        with torch.no_grad():
            nograd = (*ops.coeffs(x, *pp), ops.pre(x, h_pre), ops.post_res(x, h_out, h_post, h_res))
        return [o.detach() for o in outs] + [t.grad for t in leaves + pp] + list(only_res) + list(nograd)

    fast = run()
    monkeypatch.setattr(cpu_paths, "_FAST", False)  # the custom ops, and the launchers' helpers always calling aten
    for name, always in _ALWAYS_ATEN.items():
        monkeypatch.setattr(launch, name, always)
    slow = run()
    assert len(fast) == len(slow)
    for i, (a, b) in enumerate(zip(fast, slow)):
        assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b), i


def test_boundary_backward_reuses_the_forwards_x_next_and_h_pre():
    """The fast path's boundary saves x_next and H_pre of site l+1: its backward runs no post_res or
    coeffs forward kernel (it recomputed both before), and its gradients stay the custom op's bits
    (test_eager_fast_path_equals_the_custom_ops)."""
    n, c = 4, 24
    g = torch.Generator().manual_seed(9)
    p = _params(n, c, 4, torch.float32)
    x = torch.randn(7, n, c, generator=g).requires_grad_()
    h_out = torch.randn(7, c, generator=g).requires_grad_()
    ho, hr = torch.rand(7, n, generator=g), torch.softmax(torch.randn(7, n, n, generator=g), -1)
    outs = ops.boundary(x, h_out, ho, hr, p["phi"], p["alpha"], p["b_pre"], p["b_post"], p["b_res"])
    assert type(outs[0].grad_fn).__name__ == "_BoundaryBackward"
    loss = sum((o * torch.randn(o.shape, generator=g)).sum() for o in outs)
    with torch.profiler.profile() as prof:
        loss.backward()
    names = [e.name for e in prof.events()]
    assert "mhc_cpu::coeffs_bwd" in names and "mhc_cpu::post_res_bwd" in names
    assert "mhc_cpu::post_res_fwd" not in names and "mhc_cpu::coeffs_fwd" not in names
