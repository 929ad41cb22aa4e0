"""Recomputation scheduling (mhc_compile.passes.recompute) and what the eager ops save.

Compiled path: a hand-written chain of L mHC sites (mhc_compile.ops, branch f = Linear) compiled
with AOTAutograd + the min-cut partitioner (aot_eager-style, nop compilers), with and without
``recompute_context``; saved activations are measured with ``saved_tensors_hooks``. Then the
same through the ``"mhc"`` backend on a tiny GPT, and once with inductor.

What the scheme saves (paper section 4.3.2). Blocks of L_r sites; a chain of L sites keeps X
only at its later block starts (ceil(L/L_r) - 1 of them: the chain's first X is replayed from the
un-expanded input x, C wide); h_in and the coefficients of every site are replayed from X; every
site keeps its branch output h_out. With recompute on, exactly
    saved = T*e*((ceil(L/L_r) - 1)*n*C + (L + 1)*C) + 4*T*k*(ceil(L/L_r) - 1)
    (k = 2n + n^2: H_pre, H_post, H_res of a fused boundary at a block start, read by the
     replayed boundary / pre; k = 0 with separate ops, whose coeffs are replayed from X)
"""
from __future__ import annotations

import collections
import contextlib
import math
import operator

import pytest
import torch
from torch import nn
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.partitioners import min_cut_rematerialization_partition

from mhc_compile import ops
from mhc_compile import reference as R
from mhc_compile.config import MHCConfig
from mhc_compile.passes import recompute as RC
from mhc_compile.passes.recompute import recompute_block_size, recompute_context


# ----------------------------------------------------------------------------- L_r
@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("L", [1, 2, 3, 5, 12, 24, 48])
def test_block_size_follows_formula(n, L):
    """The paper's L_r*: the integer minimiser of n*ceil(L/L_r) + (n+2)*L_r (saved X plus the block
    replayed in backward), within one of its continuous minimiser sqrt(n*L/(n+2))."""
    cost = {b: n * math.ceil(L / b) + (n + 2) * b for b in range(1, L + 1)}
    got = recompute_block_size(n, L)
    assert cost[got] == min(cost.values())
    assert abs(got - math.sqrt(n * L / (n + 2))) <= 1


def test_block_size_known_values_and_override():
    assert recompute_block_size(4, 24) == 4          # sqrt(96/6) = 4 (the C=1024 GPT: 24 sites)
    assert recompute_block_size(4, 48) == 6          # sqrt(32) = 5.66
    assert recompute_block_size(4, 12) == 3          # sqrt(8) = 2.83
    assert recompute_block_size(4, 16) == 4          # sqrt(10.7) = 3.27, but 4 keeps 4 X, not 6 (cost 40 < 42)
    assert recompute_block_size(1, 1) == 1           # sqrt(1/3) rounds to 1, never 0
    assert recompute_block_size(4, 24, 5) == 5       # MHCConfig.recompute_block overrides
    assert recompute_block_size(4, 3, 10) == 3       # but a block never exceeds the chain
    assert recompute_block_size(4, 0) == 1
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError):
            recompute_block_size(4, 8, bad)


# ----------------------------------------------------------------------------- harness
class Chain(nn.Module):
    """L mHC sites in one chain built from mhc_compile.ops; f = Linear; optional glue between sites."""

    def __init__(self, L=6, n=3, c=8, fused=True, glue=None):
        super().__init__()
        self.n, self.L, self.fused, self.glue = n, L, fused, glue
        self.f = nn.ModuleList(nn.Linear(c, c) for _ in range(L))
        self.sites = nn.ModuleList()
        for l in range(L):
            p = R.init_site_params(n, c, l, init="paper", generator=torch.Generator().manual_seed(l))
            site = nn.Module()
            for k, v in p.items():
                site.register_parameter(k, nn.Parameter(v + 0.1 * torch.randn(v.shape)))
            self.sites.append(site)

    def _p(self, l):
        s = self.sites[l]
        return s.phi, s.alpha, s.b_pre, s.b_post, s.b_res

    def forward(self, x):
        X = ops.expand(x, self.n)
        hp, ho, hr = ops.coeffs(X, *self._p(0), kernels="reference")
        h_in = ops.pre(X, hp, "reference")
        for l in range(self.L):
            h_out = self.f[l](h_in)
            if self.fused and l + 1 < self.L:
                X, hp, ho, hr, h_in = ops.boundary(X, h_out, ho, hr, *self._p(l + 1), kernels="reference")
                continue
            X = ops.post_res(X, h_out, ho, hr, "reference")
            if self.glue == "relu":
                X = torch.relu(X)
            elif self.glue == "dropout":
                X = torch.nn.functional.dropout(X, 0.1, training=True)
            if l + 1 < self.L:
                hp, ho, hr = ops.coeffs(X, *self._p(l + 1), kernels="reference")
                h_in = ops.pre(X, hp, "reference")
        return ops.collapse(X)


def _saved_bytes(saved):
    """Activation bytes: saved tensors that are not parameters, each storage counted once."""
    seen, total = set(), 0
    for t in saved:
        if isinstance(t, nn.Parameter):
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _saved_shapes(saved):
    """Shapes of the saved non-parameter tensors, each storage once."""
    seen, shapes = set(), []
    for t in saved:
        if not isinstance(t, nn.Parameter) and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            shapes.append(tuple(t.shape))
    return shapes


def _streams(shapes, n, c):
    """How many saved tensors are stream-sized (..., n, C)."""
    return sum(1 for sh in shapes if sh[-2:] == (n, c))


def _run(model, x, config=None, backend="aot_min_cut"):
    """Compile (optionally inside recompute_context), then one measured fwd+bwd. Returns a dict."""
    graphs = {}

    def fw(gm, ex):
        graphs["fw"] = gm
        return gm

    def bw(gm, ex):
        graphs["bw"] = gm
        return gm

    torch._dynamo.reset()
    if backend == "aot_min_cut":
        from functorch.compile import make_boxed_func

        backend = aot_autograd(fw_compiler=lambda g, e: make_boxed_func(fw(g, e).forward),
                               bw_compiler=lambda g, e: make_boxed_func(bw(g, e).forward),
                               partition_fn=min_cut_rematerialization_partition)
    compiled = torch.compile(model, backend=backend)
    ctx = recompute_context(config) if config is not None else contextlib.nullcontext()
    with ctx as record:
        compiled(x)  # compile outside the hooks
    saved = []
    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = compiled(x)
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return dict(out=out.detach(), grads=grads, bytes=_saved_bytes(saved), record=record,
                shapes=_saved_shapes(saved), **graphs)


def _bw_targets(gm):
    return collections.Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function")


# ----------------------------------------------------------------------------- compiled path
@pytest.mark.parametrize("fused,glue,L,block", [
    (True, None, 6, None),     # n=3, L=6: L_r = round(sqrt(18/5)) = 2, starts 0, 2, 4
    (True, None, 7, 3),        # override: starts 0, 3, 6
    (False, None, 6, None),
    (False, "relu", 5, 2),     # stream-wise glue (post-activation ResNet) is replayed too
])
def test_recompute_saves_the_scheme_and_keeps_gradients(fused, glue, L, block):
    n, c, T = 3, 8, 10
    torch.manual_seed(0)
    model = Chain(L=L, n=n, c=c, fused=fused, glue=glue)
    x = torch.randn(2, 5, c, requires_grad=True)
    off = _run(model, x)
    on = _run(model, x, MHCConfig(streams=n, recompute_block=block))

    (plan,) = on["record"].chains
    lr = recompute_block_size(n, L, block)
    assert plan.length == L and plan.block == lr
    assert plan.starts == list(range(0, L, lr))
    kept = math.ceil(L / lr)
    assert plan.start_from_input and plan.kept_streams == kept - 1 and plan.dropped == L - kept + 1
    k = 2 * n + n * n if fused else 0
    e = 4
    end = 1 if glue == "relu" else 0   # relu's output after the last site: saved with or without
    predicted = T * e * ((kept - 1 + end) * n * c + (L + 1) * c) + 4 * T * k * (kept - 1)
    assert on["bytes"] == predicted, (on["bytes"], predicted)
    assert _streams(on["shapes"], n, c) == kept - 1 + end
    assert _streams(off["shapes"], n, c) == L + end        # without recompute: every X
    assert plan.stream_bytes == T * n * c * e

    # fp32, same ops replayed: bit-identical results
    assert torch.equal(on["out"], off["out"])
    assert on["grads"].keys() == off["grads"].keys()
    for name, g in off["grads"].items():
        assert torch.equal(on["grads"][name], g), name


def test_recompute_replays_only_mhc_ops_never_f():
    """The backward of recompute-on differs from recompute-off only by replayed mHC ops, getitem, the
    relu glue and views (f's reshape of the replayed h_in: metadata only, no compute)."""
    torch.manual_seed(0)
    model = Chain(L=6, fused=False, glue="relu")
    x = torch.randn(2, 5, 8, requires_grad=True)
    off = _run(model, x)
    on = _run(model, x, MHCConfig(streams=3))
    extra = _bw_targets(on["bw"]) - _bw_targets(off["bw"])
    assert extra, "nothing was recomputed"
    allowed = {"mhc.coeffs.default", "mhc.pre.default", "mhc.post_res.default", "mhc.boundary.default",
               str(operator.getitem), "aten.relu.default", "aten.view.default",
               "aten.unsqueeze.default", "aten.expand.default", "aten.clone.default"}  # X_0 = expand(x)
    assert set(extra) <= allowed, extra
    # the branch f (a Linear: addmm forward) is never replayed
    assert _bw_targets(on["bw"])["aten.addmm.default"] == 0
    # 6 sites, blocks of 2: sites 1, 3, 5 are replayed (post_res of 0, 2, 4), and every site's
    # coeffs / pre from its X (saved at 2 and 4, replayed from x at 0)
    assert extra["mhc.post_res.default"] == 3 and extra["mhc.coeffs.default"] == 6
    assert extra["aten.expand.default"] == 1


def test_user_checkpoint_inside_f_coexists():
    """f wrapped in torch.utils.checkpoint (its own MUST/PREFER_RECOMPUTE tags, small ac_graph_ids):
    mHC blocks are still dropped and gradients stay identical."""
    import torch.utils.checkpoint as cp

    class Ck(nn.Module):
        def __init__(self, lin):
            super().__init__()
            self.lin = lin

        def forward(self, h):
            return cp.checkpoint(lambda t: torch.tanh(self.lin(t)) * 2, h, use_reentrant=False)

    torch.manual_seed(0)
    model = Chain(L=6, fused=True)
    model.f = nn.ModuleList(Ck(lin) for lin in model.f)
    x = torch.randn(2, 5, 8, requires_grad=True)
    off = _run(model, x)
    on = _run(model, x, MHCConfig(streams=3))
    assert on["record"].chains[0].starts == [0, 2, 4]
    assert off["bytes"] - on["bytes"] >= 3 * 10 * 3 * 8 * 4  # at least the 3 dropped X
    for name, g in off["grads"].items():
        assert torch.equal(on["grads"][name], g), name


def test_recompute_off_leaves_partition_unchanged():
    torch.manual_seed(0)
    model = Chain(L=4, fused=True)
    x = torch.randn(2, 5, 8, requires_grad=True)
    base = _run(model, x)
    off = _run(model, x, MHCConfig(streams=3, recompute=False))
    assert off["record"] is None
    assert off["fw"].code == base["fw"].code and off["bw"].code == base["bw"].code
    assert off["bytes"] == base["bytes"]
    assert not any("recompute" in n.meta for n in off["fw"].graph.nodes)


def test_unreplayable_glue_starts_a_new_block():
    """Dropout between sites cannot be replayed: the site after it becomes a block start."""
    torch.manual_seed(0)
    model = Chain(L=4, fused=False, glue="dropout")
    x = torch.randn(2, 5, 8, requires_grad=True)
    on = _run(model, x, MHCConfig(streams=3, recompute_block=4))
    (plan,) = on["record"].chains
    assert plan.starts == [0, 1, 2, 3]
    # nothing replayed across sites: only each site's coeffs / pre (from its X) and X_0 = expand(x)
    assert not any(name.startswith(("post_res", "boundary", "dropout")) for name in plan.recomputed_nodes)
    assert _streams(on["shapes"], 3, 8) >= 3


def test_block_of_one_recomputes_nothing_across_sites():
    torch.manual_seed(0)
    model = Chain(L=4, fused=True)
    x = torch.randn(2, 5, 8, requires_grad=True)
    off = _run(model, x)
    on = _run(model, x, MHCConfig(streams=3, recompute_block=1))
    (plan,) = on["record"].chains
    assert plan.starts == [0, 1, 2, 3] and plan.kept_streams == 3 and plan.dropped == 1
    # every X but the first (replayed from x) stays saved; h_in is replayed from it
    assert _streams(on["shapes"], 3, 8) == 3 and _streams(off["shapes"], 3, 8) == 4
    assert on["bytes"] < off["bytes"]
    for name, g in off["grads"].items():
        assert torch.equal(on["grads"][name], g), name


def test_recompute_with_inductor():
    """Inductor: the hook runs as joint_custom_pre_pass (cache-keyed); same bytes drop, same grads.

    Caches are off here so the joint graph is really traced and tagged (a cache hit skips the
    pass and the record stays empty; the cached artifact is the tagged one, its key holds the
    pass's uuid)."""
    import torch._inductor.config as iconfig

    n, c, L, T = 3, 8, 6, 10
    torch.manual_seed(0)
    model = Chain(L=L, n=n, c=c, fused=True)
    x = torch.randn(2, 5, c, requires_grad=True)
    with iconfig.patch(force_disable_caches=True):
        off = _run(model, x, backend="inductor")
        on = _run(model, x, MHCConfig(streams=n), backend="inductor")
    (plan,) = on["record"].chains
    assert plan.starts == [0, 2, 4]
    # the scheme's saved set, as through aot_eager (module docstring): 2 X, x, 6 h_out, 2 coefficient sets
    assert on["bytes"] == T * 4 * (2 * n * c + (L + 1) * c) + 4 * T * (2 * n + n * n) * 2, on["bytes"]
    assert _streams(on["shapes"], n, c) == 2
    for name, g in off["grads"].items():
        torch.testing.assert_close(on["grads"][name], g, rtol=1e-6, atol=1e-6)


def test_mhc_backend_tiny_gpt_recompute_on_vs_off():
    """Through backend "mhc" (inner aot_eager): fewer saved bytes, identical gradients."""
    import mhc_compile
    from mhc_compile import backend as B
    from tests.models.zoo import tiny_gpt, token_inputs

    def run(recompute):
        torch._dynamo.reset()
        B.clear_records()
        torch.manual_seed(0)
        model = tiny_gpt(c=16, layers=2).train()
        (idx,) = token_inputs(2, 8)
        compiled = torch.compile(model, backend="mhc",
                                 options={"streams": 4, "inner": "aot_eager", "recompute": recompute})
        mhc_compile.materialize(compiled, idx)
        n_records = len(RC.last_records())
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = compiled(idx)
        out.float().square().mean().backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        return _saved_bytes(saved), grads, RC.last_records()[-1] if recompute and n_records else None

    b_off, g_off, _ = run(False)
    b_on, g_on, rec = run(True)
    (plan,) = rec.chains
    assert plan.length == 4 and plan.n == 4 and plan.block == 2          # round(sqrt(16/6)) = 2
    assert rec.expected_chains == [4]
    T, C, n = 16, 16, 4
    # two of the four X (T*n*C*4 bytes each) are dropped, plus h_in / coefficients of those sites
    assert b_off - b_on >= 2 * T * n * C * 4, (b_off, b_on)
    assert g_on.keys() == g_off.keys() and any("mhc" in k for k in g_on)
    for k, g in g_off.items():
        torch.testing.assert_close(g_on[k], g, rtol=1e-6, atol=1e-6, msg=k)


# ----------------------------------------------------------------------------- eager ops
def test_eager_ops_save_only_their_inputs():
    """Eager chain of fused sites: every saved tensor is an op input (X, h_out, coefficients,
    parameters, the Linear's input); no Sinkhorn iterate, no normalised x. One X per site."""
    n, c, L = 4, 16, 5
    torch.manual_seed(0)
    model = Chain(L=L, n=n, c=c, fused=True)
    x = torch.randn(3, 7, c, requires_grad=True)
    inputs = {}

    def remember(*ts):
        for t in ts:
            if isinstance(t, torch.Tensor):
                inputs[t.untyped_storage().data_ptr()] = t  # views of an input share its storage

    real = {k: getattr(ops, k) for k in ("coeffs", "pre", "post_res", "boundary")}

    def wrap(name):
        def f(*args, **kw):
            remember(*args)
            return real[name](*args, **kw)
        return f

    saved = []
    try:
        for k in real:
            setattr(ops, k, wrap(k))
        for lin in model.f:
            lin.register_forward_pre_hook(lambda m, a: remember(*a))
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = model(x)
    finally:
        for k, fn in real.items():
            setattr(ops, k, fn)
    remember(*model.parameters())
    keys = [t.untyped_storage().data_ptr() for t in saved]
    strangers = [tuple(t.shape) for t, k in zip(saved, keys) if k not in inputs]
    assert not strangers, f"saved tensors that are no op input: {strangers}"
    streams = {k for t, k in zip(saved, keys) if tuple(t.shape) == (3, 7, n, c)}
    assert len(streams) == L  # X_0 .. X_{L-1}, each saved once however many ops read it
    out.sum().backward()  # and the backward works from that state
    assert all(p.grad is not None for p in model.parameters())


# ----------------------------------------------------------------------------- canary
def test_joint_graph_hook_canary():
    """_torch_internals.joint_graph_hook: fn sees a joint graph (with tangents) before partitioning,
    both private configs are set while open (inductor's as a CustomGraphPass carrying the uuid)
    and restored after."""
    import torch._functorch.config as fconfig
    import torch._inductor.config as iconfig
    from torch._inductor.custom_graph_pass import CustomGraphPass

    from mhc_compile import _torch_internals as ti

    seen = []

    def fn(graph):
        assert isinstance(graph, torch.fx.Graph)
        seen.append([n.target for n in graph.nodes if n.op == "placeholder"])

    before = (fconfig.joint_custom_pass, iconfig.joint_custom_pre_pass)
    with ti.joint_graph_hook(fn, "canary-uuid"):
        assert callable(fconfig.joint_custom_pass)
        p = iconfig.joint_custom_pre_pass
        assert isinstance(p, CustomGraphPass) and p.uuid() == "canary-uuid"
        torch._dynamo.reset()
        f = torch.compile(lambda a: (a.sin() * 2).cos().sum(), backend="aot_eager")
        f(torch.randn(4, requires_grad=True)).backward()
    assert (fconfig.joint_custom_pass, iconfig.joint_custom_pre_pass) == before
    assert seen and any("tangents" in str(t) for t in seen[0]), seen


def test_converted_gpt_saves_one_stream_tensor_per_site():
    """convert path (eager mhc:: ops): per site one X is saved, no other stream-sized or n x n
    intermediates beyond one H_res per site (Sinkhorn iterates would be 20 per site)."""
    import mhc_compile
    from tests.models.zoo import tiny_gpt, token_inputs

    n, c = 4, 16
    model = tiny_gpt(c=c, layers=2).train()
    (idx,) = token_inputs(2, 8)
    converted = mhc_compile.convert(model, MHCConfig(streams=n, kernels="reference"), (idx,))
    sites = sum(len(ch.sites) for ch in converted.mhc_report.chains)
    assert sites == 4
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = converted(idx)
    storages = {}
    for t in saved:
        if not isinstance(t, nn.Parameter):
            storages.setdefault(t.untyped_storage().data_ptr(), t)
    streams = [t for t in storages.values() if tuple(t.shape[-2:]) == (n, c)]
    squares = [t for t in storages.values() if tuple(t.shape[-2:]) == (n, n)]
    assert len(streams) == sites, [tuple(t.shape) for t in streams]
    assert len(squares) <= sites, [tuple(t.shape) for t in squares]
    out.float().sum().backward()


def test_bench_train_quick_smoke(tmp_path):
    """benchmarks/bench_train.py --quick (aot_eager): rows without errors, the same loss at init for
    every variant (function-preserving init), and recompute saving activations."""
    import importlib.util
    import json
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train.py"
    spec = importlib.util.spec_from_file_location("bench_train", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "rows.json"
    rows = bench.main(["--quick", "--compiler", "aot_eager", "--shapes", "16x2x2x8", "--steps", "1",
                       "--json", str(out), "--markdown", str(tmp_path / "rows.md")])
    assert [r["variant"] for r in rows] == list(bench.VARIANTS)
    for r in rows:
        assert r["error"] is None, r
        assert r["saved_mb"] > 0 and r["step_ms"] > 0 and r["first_step_s"] > 0
    by = {r["variant"]: r for r in rows}
    for v in ("hand_mhc", "mhc", "mhc_norecomp"):
        assert by[v]["first_loss"] == pytest.approx(by["plain"]["first_loss"], rel=1e-5)
    assert by["mhc"]["saved_mb"] < by["mhc_norecomp"]["saved_mb"]
    assert by["mhc"]["recompute"].startswith("L=4 L_r=2")
    assert json.loads(out.read_text())["rows"][0]["variant"] == "plain"
    assert "| mhc |" in (tmp_path / "rows.md").read_text()


def test_joint_graph_hook_keeps_the_users_inductor_pass():
    import torch._inductor.config as iconfig
    from torch._inductor.custom_graph_pass import CustomGraphPass

    from mhc_compile import _torch_internals as ti

    calls = []

    class UserPass(CustomGraphPass):
        def __call__(self, graph):
            calls.append("user")

        def uuid(self):
            return "user-uuid"

    with iconfig.patch(joint_custom_pre_pass=UserPass()):
        with ti.joint_graph_hook(lambda g: calls.append("mhc"), "mhc-uuid"):
            p = iconfig.joint_custom_pre_pass
            p(torch.fx.Graph())
            assert p.uuid() == ("mhc-uuid", "user-uuid")
        assert isinstance(iconfig.joint_custom_pre_pass, UserPass)
    assert calls == ["mhc", "user"]
    with iconfig.patch(joint_custom_pre_pass=lambda g: None):  # a raw callable: no cache key possible
        with ti.joint_graph_hook(lambda g: None, "mhc-uuid"):
            assert iconfig.joint_custom_pre_pass.uuid() is None


@pytest.mark.gpu
def test_gpu_backend_recompute_bf16_triton():
    """CUDA, bf16, Triton kernels, inner inductor: recompute drops at least the predicted X bytes
    and gradients agree with recompute off."""
    import mhc_compile
    from tests.models.zoo import tiny_gpt, token_inputs

    def run(recompute):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = tiny_gpt(c=64, layers=4).train().to(device="cuda", dtype=torch.bfloat16)
        (idx,) = token_inputs(4, 64)
        idx = idx.cuda()
        compiled = torch.compile(model, backend="mhc", options={"streams": 4, "recompute": recompute})
        mhc_compile.materialize(compiled, idx)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = compiled(idx)
        out.float().square().mean().backward()
        grads = {k: p.grad.float().clone() for k, p in model.named_parameters() if p.grad is not None}
        return _saved_bytes(saved), grads

    import torch._inductor.config as iconfig

    with iconfig.patch(force_disable_caches=True):
        b_off, g_off = run(False)
        b_on, g_on = run(True)
    sites, T, C, n = 8, 4 * 64, 64, 4
    dropped = sites - math.ceil(sites / recompute_block_size(n, sites))
    assert b_off - b_on >= dropped * T * n * C * 2, (b_off, b_on)
    for k, g in g_off.items():
        torch.testing.assert_close(g_on[k], g, rtol=2e-2, atol=1e-3, msg=k)
