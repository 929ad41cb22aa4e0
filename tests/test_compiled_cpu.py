"""A compiled CPU forward without gradient runs the fused kernels as opaque calls (ops/cpu_paths.py
``compiled_nograd``, the fakes of kernels_cpu/fakes.py).

The fakes give each kernel's shapes, dtypes and strides (``torch.library.opcheck``); a compiled eval of
a converted BERT (post-LN sites) and GPT (boundaries) at perturbed mHC parameters calls the kernels
(``mhc_cpu::`` nodes in the one Dynamo graph, no ``mhc::`` custom op) and gives eager's numbers under
inductor; a compiled train step runs the coeffs kernels forward and backward (the mixes inlined for
inductor) with eager's gradients; a compiled call under ``record_coeffs`` takes ``mhc::coeffs`` and records
every site; a LayerNorm with a hook
is called as a module.
"""
import pytest
import torch
from torch import nn

from mhc_compile import MHCConfig, convert, kernels_cpu, ops
from mhc_compile.kernels_cpu import launch
from mhc_compile.models import TinyGPT
from mhc_compile.ops import cpu_paths
from tests._convert_checks import compiled_no_grad, main_output
from tests._invariants import perturb_mhc

pytestmark = pytest.mark.skipif(not kernels_cpu.available(), reason=f"CPU kernels not built: {kernels_cpu.build_error()}")

FORWARD_KERNELS = {"proj_mm", "coeffs_fwd", "pre_fwd", "post_res_fwd", "post_res_norm_fwd", "site_start_fwd",
                   "boundary_fwd"}


def _site_inputs(dtype, t=5, n=4, c=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    x = torch.randn(t, n, c, generator=g).to(dtype)
    h_out = torch.randn(t, c, generator=g).to(dtype)
    h_post, h_res = torch.rand(t, n, generator=g, dtype=cd), torch.rand(t, n, n, generator=g, dtype=cd)
    m = 2 * n + n * n
    phi = 0.1 * torch.randn(n * c, m, generator=g, dtype=cd)
    small = (torch.rand(3, generator=g, dtype=cd), torch.randn(n, generator=g, dtype=cd),
             torch.randn(n, generator=g, dtype=cd), torch.randn(n, n, generator=g, dtype=cd))
    return x, h_out, h_post, h_res, phi, small


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fakes_match_the_kernels(dtype):
    x, h_out, h_post, h_res, phi, small = _site_inputs(dtype)
    t, n, c = x.shape
    ops_ = torch.ops.mhc_cpu
    flat = x.reshape(t, n * c).to(phi.dtype)
    proj = ops_.proj_mm(flat, phi)
    w, b = torch.randn(c).to(dtype), torch.randn(c).to(dtype)
    calls = [
        (ops_.proj_mm, (flat, phi)),
        (ops_.coeffs_fwd, (flat, proj, *small, 1e-6, n, 20, False)),
        (ops_.pre_fwd, (x, h_post)),
        (ops_.post_res_fwd, (x, h_out, h_post, h_res)),
        (ops_.post_res_norm_fwd, (x, h_out, h_post, h_res, w, b, 1e-5)),
        (ops_.post_res_norm_fwd, (x, h_out, h_post, h_res, None, None, 1e-5)),
        (ops_.site_start_fwd, (x, phi, *small, 1e-6, 20, False)),
        (ops_.boundary_fwd, (x, h_out, h_post, h_res, phi, *small, 1e-6, 20, False)),
    ]
    assert {op._qualified_op_name.split("::")[1] for op, _ in calls} == FORWARD_KERNELS
    rms = ops_.site_start_fwd(x, phi, *small, 1e-6, 20, False)[5]
    gates = (torch.randn(t, n).to(phi.dtype), torch.randn(t, n).to(phi.dtype), torch.randn(t, n, n).to(phi.dtype))
    dh_r, coef = ops_.coeffs_bwd(*gates, flat, proj, *small, 1e-6, n, 20, False)[:2]
    calls += [  # the backward's kernels of a compiled train step
        (ops_.coeffs_bwd, (*gates, flat, proj, *small, 1e-6, n, 20, False)),
        (ops_.coeffs_bwd, (*gates, flat, proj, *small, 1e-6, n, 20, False, rms)),
        (ops_.coeffs_gx, (dh_r, phi, x, coef)),
    ]
    for op, args in calls:
        torch.library.opcheck(op.default, args, test_utils=("test_schema", "test_faketensor"))


def _bert(layers=2):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=64)
    model = BertModel(cfg, add_pooling_layer=False).eval()
    ids = torch.randint(0, 97, (2, 9))
    kwargs = {"attention_mask": torch.ones(2, 9, dtype=torch.long)}
    conv = perturb_mhc(convert(model, MHCConfig(streams=4), (ids,), example_kwargs=kwargs), seed=3).eval()
    return conv, (ids,), kwargs


def _gpt():
    torch.manual_seed(0)
    model = TinyGPT(vocab=64, dim=32, layers=2, heads=2, max_len=16)
    ids = torch.randint(0, 64, (2, 16))
    return perturb_mhc(convert(model, MHCConfig(streams=4), (ids,)), seed=4).eval(), (ids,), {}


@pytest.mark.parametrize("build,kernels", [
    (_bert, {"post_res_norm_fwd", "post_res_fwd", "proj_mm", "coeffs_fwd", "pre_fwd"}),
    (_gpt, {"boundary_fwd", "post_res_fwd", "proj_mm", "coeffs_fwd", "pre_fwd"}),
])
def test_compiled_eval_calls_the_kernels(build, kernels):
    model, args, kwargs = build()
    with torch.no_grad():
        eager = main_output(model(*args, **kwargs))
    out, targets, graphs = compiled_no_grad(model, *args, **kwargs)
    called = {t.split(".")[1] for t in targets if t.startswith("mhc_cpu.")}
    assert graphs == 1 and called == kernels, (graphs, called)
    assert not any(t.startswith("mhc.") for t in targets)
    assert torch.allclose(out, eager, rtol=1e-5, atol=1e-6), (out - eager).abs().max()


def test_compiled_eval_under_inductor_equals_eager():
    model, args, kwargs = _bert()
    with torch.no_grad():
        eager = main_output(model(*args, **kwargs))
        torch._dynamo.reset()
        comp = torch.compile(model)
        got = main_output(comp(*args, **kwargs))
        again = main_output(comp(*args, **kwargs))
        cpu_paths.COMPILED_KERNELS = False  # the inlined path, for the same numbers (a guard recompiles)
        try:
            inlined = main_output(comp(*args, **kwargs))
        finally:
            cpu_paths.COMPILED_KERNELS = True
    torch._dynamo.reset()
    assert torch.equal(got, again)
    for other in (eager, inlined):
        assert (got - other).abs().max().item() <= 2e-5 * max(1.0, other.abs().max().item())
    assert (got - inlined).abs().max() > 0 or torch.equal(got, inlined)  # both ran (numbers checked above)


def _loss_and_grads(model, ids, fwd=None):
    model.zero_grad(set_to_none=True)
    loss = (model if fwd is None else fwd)(ids).float().pow(2).mean()
    loss.backward()
    return loss.detach(), {k: q.grad.clone() for k, q in model.named_parameters() if q.grad is not None}


def test_compiled_train_runs_the_coeffs_kernels_and_their_backward():
    """A compiled train step: coeffs as the C++ kernels forward (``proj_mm``, ``coeffs_fwd``) and backward
    (``coeffs_bwd``, ``coeffs_gx``; the projection kept, not recomputed) in AOTAutograd's graphs, no
    ``mhc::`` custom op, the mixes inlined for inductor; the loss and every gradient those of eager at
    perturbed mHC parameters, under AOTAutograd and under inductor."""
    model, (ids,), _ = _gpt()
    model.train()
    loss, grads = _loss_and_grads(model, ids)
    graphs = []

    def backend(gm, example_inputs):
        from torch._dynamo.backends.common import aot_autograd
        from functorch.compile import make_boxed_func

        def keep(g, _):
            graphs.append(g)
            return make_boxed_func(g)

        return aot_autograd(fw_compiler=keep, bw_compiler=keep)(gm, example_inputs)

    torch._dynamo.reset()
    got = _loss_and_grads(model, ids, torch.compile(model, backend=backend, fullgraph=True))
    inductor = _loss_and_grads(model, ids, torch.compile(model, fullgraph=True))
    torch._dynamo.reset()
    fw, bw = ({str(nd.target) for nd in g.graph.nodes if nd.op == "call_function"} for g in graphs)
    assert {"mhc_cpu.proj_mm.default", "mhc_cpu.coeffs_fwd.default"} <= fw
    assert {"mhc_cpu.coeffs_bwd.default", "mhc_cpu.coeffs_gx.default"} <= bw and "mhc_cpu.proj_mm.default" not in bw
    assert not any(t.startswith("mhc.") or t.startswith(("mhc_cpu.pre", "mhc_cpu.post_res")) for t in fw | bw)
    assert sum(".mhc." in k for k in grads) == 20  # 4 sites x (phi, alpha, b_pre, b_post, b_res)
    for loss2, grads2 in (got, inductor):
        assert torch.allclose(loss, loss2, rtol=1e-6, atol=1e-7) and grads.keys() == grads2.keys()
        for k in grads:
            assert (grads[k] - grads2[k]).abs().max() <= 2e-5 * grads[k].abs().max().clamp_min(1e-3), k


def test_compiled_call_under_record_coeffs_records_every_site():
    model, args, kwargs = _gpt()
    comp = torch.compile(model, backend="eager")
    torch._dynamo.reset()
    with torch.no_grad():
        comp(*args, **kwargs)  # compiled with the kernels first: the recorder's guard recompiles
        with ops.record_coeffs() as rec:
            comp(*args, **kwargs)
        with ops.record_coeffs() as eager_rec:
            model(*args, **kwargs)
    torch._dynamo.reset()
    assert len(rec) == len(eager_rec) == 4  # 2 layers x 2 sites
    for got, want in zip(rec, eager_rec):
        for a, b in zip(got, want):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_layer_norm_with_a_hook_is_called_under_compile():
    model, args, kwargs = _bert()
    norm = next(m for name, m in model.named_modules() if isinstance(m, nn.LayerNorm) and ".layer.0." in name)
    calls = []
    norm.register_forward_hook(lambda mod, i, o: calls.append(1) or o * 2)
    with torch.no_grad():
        eager = main_output(model(*args, **kwargs))
    out, targets, graphs = compiled_no_grad(model, *args, **kwargs)
    assert len(calls) == 2 and graphs == 1  # eager, then once while Dynamo traced the compiled call
    assert sum(t.split(".")[:2] == ["mhc_cpu", "post_res_norm_fwd"] for t in targets) == 2  # 3 post-LN site ends, 1 hooked
    assert torch.allclose(out, eager, rtol=1e-5, atol=1e-6)


def test_compiled_hf_gpt2_train_step_with_gradient_checkpointing_equals_eager():
    """A converted GPT-2 (transformers, dropout off) with gradient checkpointing, compiled with inductor
    the way a Trainer does it: the loss and every gradient at perturbed mHC parameters are eager's."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=97, n_positions=32, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False)
    ids = torch.randint(0, 97, (2, 12))
    model = perturb_mhc(convert(GPT2LMHeadModel(cfg), MHCConfig(streams=4), (ids,)), seed=2).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def loss_and_grads(fwd):
        model.zero_grad(set_to_none=True)
        loss = fwd(ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {k: q.grad.clone() for k, q in model.named_parameters() if q.grad is not None}

    loss, grads = loss_and_grads(model)
    torch._dynamo.reset()
    loss2, grads2 = loss_and_grads(torch.compile(model))
    torch._dynamo.reset()
    assert sum(".mhc." in k for k in grads) == 20 and grads.keys() == grads2.keys()
    assert torch.allclose(loss, loss2, rtol=1e-6, atol=1e-6)
    for k in grads:
        assert (grads[k] - grads2[k]).abs().max() <= 2e-5 * grads[k].abs().max().clamp_min(1e-3), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_eval_at_other_lengths_and_in_bf16(dtype):
    """The compiled eval (kernels as opaque calls) at lengths it was not first traced for (Dynamo's
    dynamic-shape recompile: symbolic token counts through the launchers and the fakes), in fp32 and
    bf16: eager's numbers at every length, and causality still holds (a later token changes no earlier
    output)."""
    model, (ids,), _ = _gpt()
    model = model.to(dtype)
    comp = torch.compile(model, backend="eager")
    torch._dynamo.reset()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    with torch.no_grad():
        for t in (16, 9, 13, 5):
            x = ids[:, :t]
            got, want = comp(x), model(x)
            assert got.shape == want.shape and got.dtype == dtype
            assert (got.float() - want.float()).abs().max().item() <= tol * max(1.0, want.float().abs().max().item()), t
        changed = ids[:, :13].clone()
        changed[:, -1] = (changed[:, -1] + 1) % 64
        assert torch.equal(comp(changed)[:, :12], comp(ids[:, :13])[:, :12])
    torch._dynamo.reset()


@pytest.mark.parametrize("grad", [False, True])
def test_strict_export_keeps_the_mhc_ops(grad):
    """``torch.export`` (strict: Dynamo traces it too) keeps ``mhc::coeffs`` and no ``mhc_cpu::`` kernel, so a
    saved program loads wherever ``mhc_compile`` is imported (the kernels register only once built)."""
    model, (ids,), _ = _gpt()
    with torch.set_grad_enabled(grad):
        ep = torch.export.export(model, (ids,), strict=True)
        targets = {str(nd.target) for nd in ep.graph.nodes if nd.op == "call_function"}
        assert "mhc.coeffs.default" in targets and not any(t.startswith("mhc_cpu.") for t in targets)
        assert torch.allclose(ep.module()(ids), model(ids), rtol=1e-5, atol=1e-6)
