"""A post-LN site's end in one op: ``passes.post_norm`` and ``ops.post_res_norm`` (kernels_cpu/post_norm.cpp).

The kernel against ``LayerNorm(post_res_fwd(...))`` for n in 1..9, every float dtype, odd C and T,
broadcast coefficients, with and without the affine parameters; in a converted BERT (blocks form), the
rewrite happens at both sites of every layer, the eval forward runs the kernel at perturbed mHC
parameters and gives the numbers of the unfused calls (the path a train step takes) and of the
reference kernels; and every case where the module call must run as written does: hooks, gradients,
CPU autocast, a LayerNorm subclass, the kernels off.
"""
import pytest
import torch
from torch import nn

from mhc_compile import MHCConfig, convert, kernels_cpu, ops
from mhc_compile.kernels_cpu import launch
from mhc_compile.ops import cpu_paths
from tests._convert_checks import compiled_no_grad, main_output
from tests._invariants import perturb_mhc

pytestmark = pytest.mark.skipif(not kernels_cpu.available(), reason=f"CPU kernels not built: {kernels_cpu.build_error()}")

TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 3e-3}


def _site(n, c, t, dtype, seed, static=False):
    g = torch.Generator().manual_seed(seed)
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    x, h_out = (3 * torch.randn(t, n, c, generator=g) + 1).to(dtype), torch.randn(t, c, generator=g).to(dtype)
    rows = 1 if static else t
    return x, h_out, 2 * torch.rand(rows, n, generator=g, dtype=cd), torch.rand(rows, n, n, generator=g, dtype=cd)


def _norm(c, dtype, affine=True, bias=True, seed=0):
    ln = nn.LayerNorm(c, eps=1e-5, elementwise_affine=affine, bias=bias, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ln.parameters():
            p.copy_(torch.randn(p.shape, generator=g).to(dtype))
    return ln


@pytest.mark.parametrize("n,c,t,dtype,static,affine,bias", [
    (1, 7, 37, torch.float32, False, True, True), (2, 13, 5, torch.float32, False, True, False),
    (3, 40, 37, torch.float32, True, True, True), (4, 384, 19, torch.float32, False, True, True),
    (4, 33, 21, torch.float32, False, False, False), (8, 9, 11, torch.float32, False, True, True),
    (9, 17, 7, torch.float32, False, True, True), (4, 37, 23, torch.float64, False, True, True),
    (4, 40, 29, torch.bfloat16, False, True, True), (2, 24, 3, torch.float16, True, True, True),
])
def test_kernel_equals_layer_norm_of_post_res(n, c, t, dtype, static, affine, bias):
    x, h_out, ho, hr = _site(n, c, t, dtype, n * 7 + c, static)
    ln = _norm(c, dtype, affine, bias, seed=c)
    with torch.no_grad():
        want = ln(launch.post_res_forward(x, h_out, ho, hr))
        got = launch.post_res_norm_forward(x, h_out, ho, hr, ln.weight, ln.bias, ln.eps)
    assert got.dtype == dtype and got.shape == (t, n, c)
    err = (got.double() - want.double()).abs().max().item()
    assert err <= TOL[dtype] * max(1.0, want.abs().max().item()), err
    # float64: the same math to rounding; the LayerNorm really ran (not post_res alone)
    assert (got.double() - launch.post_res_forward(x, h_out, ho, hr).double()).abs().max() > 0.1


def test_kernel_refuses_parameters_of_another_size_or_dtype():
    x, h_out, ho, hr = _site(2, 8, 3, torch.float32, 1)
    with pytest.raises(RuntimeError, match="weight and bias must have C elements"):
        torch.ops.mhc_cpu.post_res_norm_fwd(x, h_out, ho, hr, torch.ones(7), None, 1e-5)
    with pytest.raises(RuntimeError, match="weight and bias must have C elements"):
        torch.ops.mhc_cpu.post_res_norm_fwd(x, h_out, ho, hr, None, torch.ones(8, dtype=torch.float64), 1e-5)


# ----------------------------------------------------------------------------- in a converted BERT
def _bert(layers=2):
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    return BertModel(cfg, add_pooling_layer=False).eval()


@pytest.fixture(scope="module")
def converted():
    model = _bert()
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    conv = perturb_mhc(convert(model, MHCConfig(streams=4), (ids,)), seed=5)
    ref = perturb_mhc(convert(_bert(), MHCConfig(streams=4, kernels="reference"), (ids,)), seed=5)
    return conv.eval(), ref.eval(), ids


def _count_fused(monkeypatch):
    calls = []
    real = launch.post_res_norm_forward

    def counting(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(launch, "post_res_norm_forward", counting)
    return calls


def test_both_sites_of_every_layer_are_rewritten(converted):
    """Both sites of a layer end in post_res_norm; the last layer's second LayerNorm reads the collapsed
    chain end (original size), so it stays a module call."""
    conv, _, _ = converted
    first, last = ("".join(set(layer.__dict__["_mhc_carry"].source.values())) for layer in conv.encoder.layer)
    assert first.count("ops_post_res_norm(") == 2 and "ops_post_res(" not in first and ".LayerNorm(" not in first
    assert last.count("ops_post_res_norm(") == 1 and last.count("ops_post_res(") == 1
    assert "self.output.LayerNorm(mhc_collapse)" in last


def test_eval_runs_the_kernel_with_the_numbers_of_the_unfused_calls(converted, monkeypatch):
    conv, ref, ids = converted
    calls = _count_fused(monkeypatch)
    with torch.no_grad():
        fused = main_output(conv(ids))
    assert len(calls) == 3 and all(s == (2, 9, 4, 32) for s in calls)
    unfused = main_output(conv(ids)).detach()  # grad enabled (parameters need it): the module calls
    assert len(calls) == 3
    with torch.no_grad():
        want = main_output(ref(ids))
    assert (fused - unfused).abs().max() <= 2e-5
    assert (fused - want).abs().max() <= 2e-5
    # the perturbed mHC parameters matter: a model at other parameters differs
    assert (fused - main_output(perturb_mhc(convert(_bert(), MHCConfig(streams=4), (ids,)), seed=6)(ids))).abs().max() > 1e-3


def test_every_other_call_runs_the_module(converted, monkeypatch):
    conv, _, ids = converted
    calls = _count_fused(monkeypatch)
    norm = conv.encoder.layer[0].output.LayerNorm
    seen = []
    handle = norm.register_forward_hook(lambda m, a, o: seen.append(o.shape))
    with torch.no_grad():
        main_output(conv(ids))
    handle.remove()
    assert seen == [(2, 9, 4, 32)] and len(calls) == 2  # the hooked one ran as a module call
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        main_output(conv(ids))
    assert len(calls) == 2
    monkeypatch.setattr(launch, "FUSED", False)
    with torch.no_grad():
        main_output(conv(ids))
    assert len(calls) == 2


def test_gradients_reach_the_layer_norm_and_a_subclass_is_called():
    class Scaled(nn.LayerNorm):
        def forward(self, x):
            return 2 * super().forward(x)

    x, h_out, ho, hr = _site(4, 16, 5, torch.float32, 3)
    ln = _norm(16, torch.float32)
    out = ops.post_res_norm(x, h_out, ho, hr, ln)
    out.sum().backward()
    assert ln.weight.grad is not None and ln.weight.grad.abs().sum() > 0
    sub = Scaled(16)
    with torch.no_grad():
        assert not cpu_paths.fusable_layer_norm(sub, x)
        want = 2 * nn.functional.layer_norm(ops.post_res(x, h_out, ho, hr), (16,), sub.weight, sub.bias, sub.eps)
        assert torch.equal(ops.post_res_norm(x, h_out, ho, hr, sub), want)


def test_compiled_bert_traces_the_module_call(converted, monkeypatch):
    """Under torch.compile with the compiled kernels off (``cpu_paths.COMPILED_KERNELS``; the path of a
    compiled train step) Dynamo sees post_res then the LayerNorm (inductor fuses them itself): the graph
    has layer_norm calls on the streams, the kernel never runs, the output is the eager one. With them
    on, a no-grad call runs the kernel: tests/test_compiled_cpu.py."""
    conv, _, ids = converted
    calls = _count_fused(monkeypatch)
    monkeypatch.setattr(cpu_paths, "COMPILED_KERNELS", False)
    with torch.no_grad():
        want = main_output(conv(ids))
    got, targets, _ = compiled_no_grad(conv, ids)
    assert len(calls) == 3  # the eager call only
    norms = [t for t in targets if "layer_norm" in t]
    assert len(norms) >= 5  # embeddings + 4 site ends
    assert (got - want).abs().max() <= 2e-5
