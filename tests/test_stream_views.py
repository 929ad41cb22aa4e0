"""Issue #15: streams survive reshapes, window partitions and casts; dynamic image sizes.

Where a chain used to split (a reshape or a window partition between sites, a cast on the skip
path), the converted model must equal the whole-chain form: the same model written without the
reshape / cast, converted, with the same *random* (non-init) mHC parameters.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import mhc_compile
from mhc_compile import MHCConfig
from mhc_compile.passes.stream_views import view_kind
from tests._convert_checks import StreamGrabber, mhc_params, one_thread, rel_err  # noqa: F401
from tests.models import streams as S
from tests.models.zoo import tiny_convnext, tiny_mixer, tiny_resnet_basic

IDS = (torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0)),)
IMG = (torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)),)


def _convert(model, inputs, n=4):
    return mhc_compile.convert(model, MHCConfig(streams=n), inputs)


def _randomize(model, seed=0):
    """Random (non-init) mHC parameters, so the streams really differ."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mhc_params(model).values():
            p.add_(0.5 * torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype))


def _copy_by_site(src, dst):
    """Copy mHC parameters site by site (the reports' order), whatever the parameter names."""
    rs, rd = src.mhc_report, dst.mhc_report
    assert rs.num_sites == rd.num_sites
    ps, pd = dict(src.named_parameters()), dict(dst.named_parameters())
    with torch.no_grad():
        for a, b in zip(rs.sites, rd.sites):
            for key, p in ps.items():
                if key.startswith(a.name + "."):
                    pd[b.name + key[len(a.name):]].copy_(p)
    assert len(mhc_params(src)) == len(mhc_params(dst))


def _pair(build_model, build_reference, inputs):
    torch.manual_seed(0)
    model = build_model().eval()
    ref = build_reference().eval()
    ref.load_state_dict(model.state_dict())
    return model, ref


CASES = {
    # name: (model, whole-chain reference, inputs, sites)
    "flat_mlp": (lambda: S.TinyFlatMLP(), lambda: S.TinyFlatMLP(flat=False), IDS, 4),
    "swin": (lambda: S.TinySwin(shift=False), lambda: S.TinySwin(shift=False, keep_windows=True), IMG, 4),
    # a float64 residual in a float32 model makes the skip-path casts real (in float32 the
    # `.to(torch.float32)` is the same tensor and export records no cast)
    "ssm_wide_residual": (lambda: S.TinySSM(residual_dtype=torch.float64), lambda: S.TinySSM(paired=False), IDS, 3),
    "cast_skip": (lambda: S.TinyCastSkip(residual_dtype=torch.float64), lambda: S.TinyCastSkip(cast=False), IDS, 2),
}


@pytest.mark.parametrize("name", list(CASES))
def test_one_chain_and_equal_to_whole_chain_form_at_random_params(name):
    build, build_ref, inputs, sites = CASES[name]
    model, ref = _pair(build, build_ref, inputs)
    conv, conv_ref = _convert(model, inputs), _convert(ref, inputs)
    rep = conv.mhc_report
    assert (rep.num_sites, rep.num_chains) == (sites, 1), str(rep)
    assert conv_ref.mhc_report.num_chains == 1
    with torch.no_grad():
        assert rel_err(conv(*inputs), model(*inputs)) < 1e-5  # function preserved at init
        _randomize(conv)
        _copy_by_site(conv, conv_ref)
        out, want = conv(*inputs), conv_ref(*inputs)
    assert rel_err(out, model(*inputs)) > 1e-3, "random mHC parameters must change the output"
    assert rel_err(out, want) < 1e-5


def test_gradients_match_the_whole_chain_form():
    model, ref = _pair(*CASES["flat_mlp"][:2], IDS)
    conv, conv_ref = _convert(model, IDS), _convert(ref, IDS)
    _randomize(conv)
    _copy_by_site(conv, conv_ref)
    conv(*IDS).square().mean().backward()
    conv_ref(*IDS).square().mean().backward()
    ga = [p.grad for p in mhc_params(conv).values()]
    gb = [p.grad for p in mhc_params(conv_ref).values()]
    assert all(g is not None for g in ga)
    # per tensor with an absolute floor: at the chain's first site the streams are still copies, so
    # b_pre's and b_res's true gradients are exactly 0 and each form computes rounding noise there
    # (1e-9 and 1e-12 here, in different orders: the fused CPU kernels vs the whole-chain graph)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-8)
    flat = lambda gs: torch.cat([g.flatten() for g in gs])  # noqa: E731
    assert rel_err(flat(ga), flat(gb)) < 1e-5


def test_shifted_windows_stay_one_chain_and_preserve_function():
    torch.manual_seed(0)
    model = S.TinySwin(layers=2, shift=True).eval()
    conv = _convert(model, IMG)
    assert (conv.mhc_report.num_sites, conv.mhc_report.num_chains) == (4, 1)
    ops = conv.mhc_report.chains[0].stream_wise_ops
    assert any("roll" in o for o in ops) and any("permute" in o for o in ops), ops
    with torch.no_grad():
        assert rel_err(conv(*IMG), model(*IMG)) < 1e-5


def test_reshape_chain_runs_at_other_batch_and_sequence_sizes():
    torch.manual_seed(0)
    model = S.TinyFlatMLP().eval()
    conv = _convert(model, IDS)
    other = torch.randint(0, 64, (3, 5))
    with torch.no_grad():
        assert rel_err(conv(other), model(other)) < 1e-5


def test_fp32_residual_keeps_the_streams_in_fp32():
    torch.manual_seed(0)
    model = S.TinySSM().to(torch.bfloat16).eval()
    conv = _convert(model, IDS)
    rep = conv.mhc_report
    assert rep.num_sites == 3 and rep.num_chains == 1
    assert [s.dtype for s in rep.sites] == ["float32"] * 3
    grab = StreamGrabber(conv)
    with torch.no_grad():
        grab.run(*IDS)
    assert grab.streams and {s.dtype for s in grab.streams} == {torch.float32}
    with torch.no_grad():
        assert rel_err(conv(*IDS).float(), model(*IDS).float()) < 2e-2  # bf16 mixer, fp32 stream


def test_skip_cast_is_reported_and_the_stream_is_fp32():
    torch.manual_seed(0)
    model = S.TinyCastSkip().to(torch.bfloat16).eval()
    conv = _convert(model, IDS)
    rep = conv.mhc_report
    assert (rep.num_sites, rep.num_chains) == (2, 1), str(rep)
    assert [s.dtype for s in rep.sites] == ["float32"] * 2
    skip = [s.skip_ops for s in rep.sites]
    assert all(ops and all(o.startswith("to") for o in ops) for ops in skip), skip
    assert "skip operand is the stream through" in rep.to_table()
    with torch.no_grad():
        assert rel_err(conv(*IDS).float(), model(*IDS).float()) < 2e-2


def test_mixed_dtype_add_not_in_skip_dtype_is_refused_with_reason():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.f = torch.nn.Linear(8, 8).to(torch.float64)

        def forward(self, x):  # float32 skip + float64 branch = float64: not the stream's dtype
            return x + self.f(x.double())

    rep = mhc_compile.find_residuals(Block(), (torch.randn(2, 3, 8),))
    assert rep.num_sites == 0
    assert any("dtypes differ" in t.reason for t in rep.not_taken), rep.not_taken


@pytest.mark.parametrize("name", ["flat_mlp", "swin"])
def test_backend_graphs_keep_one_chain(name):
    build, _, inputs, sites = CASES[name]
    torch.manual_seed(0)
    model = build().eval()
    with torch.no_grad():
        want = model(*inputs)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="mhc", options={"streams": 4})
    with torch.no_grad():
        out = compiled(*inputs)
    rec = mhc_compile.backend.records()[-1]
    assert (rec.num_sites, len(rec.report.chains)) == (sites, 1)
    assert rel_err(out, want) < 1e-5


# ----------------------------------------------------------------------------- the op rules
def _node(fn, shape=(2, 3, 8)):
    mod = type("M", (torch.nn.Module,), {"forward": lambda self, x: fn(x)})()
    ep = torch.export.export(mod, (torch.randn(*shape),), strict=False)
    g = ep.module().graph
    x = next(n for n in g.nodes if n.op == "placeholder")
    node = next(n for n in g.nodes if n.op == "call_function" and n.args and n.args[0] is x
                and "assert" not in str(n.target))
    return node, x


@pytest.mark.parametrize("fn, kind", [
    (lambda x: x.reshape(6, 8), "reshape"),
    (lambda x: x.permute(1, 0, 2), "permute"),
    (lambda x: x.transpose(-3, -2), "leading"),
    (lambda x: x.flatten(0, 1), "leading"),
    (lambda x: torch.roll(x, 1, dims=1), "roll"),
    (lambda x: x.to(torch.float64), "cast"),
    (lambda x: x.reshape(2, 24), None),          # channels mixed with time
    (lambda x: x.permute(0, 2, 1), None),        # channels no longer last
    (lambda x: x.flatten(1), None),              # flatten to the end swallows the channels
    (lambda x: torch.roll(x, 1, dims=2), None),  # rolls the channels
    (lambda x: x.transpose(1, 2), None),
])
def test_view_kind_rules(fn, kind):
    node, x = _node(fn)
    assert view_kind(node, x) == kind


# ----------------------------------------------------------------------------- dynamic image sizes
@pytest.mark.parametrize("build", [tiny_resnet_basic, tiny_convnext])
def test_conv_nets_accept_a_new_image_size(build):
    torch.manual_seed(0)
    model = build().eval()
    conv = _convert(model, (torch.randn(2, 3, 16, 16),), n=2)
    other = torch.randn(3, 3, 24, 20)
    with torch.no_grad():
        assert rel_err(conv(other), model(other)) < 1e-5


def test_a_dim_the_model_fixes_is_named_in_a_warning():
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _convert(tiny_mixer().eval(), (torch.randn(2, 3, 16, 16),), n=2)
    msgs = [str(w.message) for w in caught if "fixes some input sizes" in str(w.message)]
    assert len(msgs) == 1 and "L['img'].size()[2]" in msgs[0] and "== 16" in msgs[0] and "static: input 0 dim 2 (size 16), input 0 dim 3 (size 16)" in msgs[0], msgs


def test_inspect_shows_the_stream_steps():
    from click.testing import CliRunner

    from mhc_compile.cli.main import cli

    res = CliRunner().invoke(cli, ["inspect", "tests.models.streams:TinyFlatMLP", "--input-shape", "2x8",
                                   "--input-dtype", "long"])
    assert res.exit_code == 0, res.output
    assert "4 sites" in res.output and "stream-wise ops between sites" in res.output, res.output
    assert "reshape" in res.output and "view" in res.output


# ----------------------------------------------------------------------------- Hugging Face models
def test_hf_swin_one_chain_per_stage():
    """Window partition / reverse and padding between sites: one chain per stage (was one per site)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.SwinConfig(image_size=16, patch_size=4, num_channels=3, embed_dim=16, depths=[2, 2],
                                  num_heads=[2, 2], window_size=2)
    model = transformers.SwinModel(cfg).eval()
    x = torch.randn(2, 3, 16, 16)
    conv = _convert(model, (x,), n=2)
    rep = conv.mhc_report
    assert (rep.num_sites, [len(c.sites) for c in rep.chains]) == (8, [4, 4]), str(rep)
    with torch.no_grad():
        assert rel_err(conv(x), model(x)) < 1e-5


def test_hf_mamba_residual_in_fp32_blocks():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.MambaConfig(vocab_size=64, hidden_size=32, state_size=4, num_hidden_layers=3, expand=2,
                                   conv_kernel=3, residual_in_fp32=True, use_cache=False)
    model = transformers.MambaForCausalLM(cfg).eval()
    conv = _convert(model, IDS, n=2)
    rep = conv.mhc_report
    assert (rep.num_sites, rep.num_chains) == (3, 1), str(rep)
    with torch.no_grad():
        assert rel_err(conv(*IDS), model(*IDS)) < 1e-5


def test_skip_reshape_into_rank_4_keeps_the_channels_last():
    """A (B, T, C) stream viewed as (B, H, W, C) on the skip path: the branch's linear reads the
    last dim, so the site mixes over C = 8 on dim 3 (the rank alone would have said dim 1)."""
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.f = torch.nn.Linear(8, 8)

        def forward(self, x):  # x: (B, 4, 8)
            b = x.shape[0]
            return x.view(b, 2, 2, 8) + self.f(x).view(b, 2, 2, 8)

    rep = mhc_compile.find_residuals(Block(), (torch.randn(2, 4, 8),))
    assert [(s.feature_axis, s.channels) for s in rep.sites] == [(3, 8)], rep
