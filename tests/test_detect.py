"""Residual detection and rewrite on FX graphs of both flavours: aten-level (torch.export), torch-level
(Dynamo, torch.fx.symbolic_trace). Every add spelling, either operand order, alpha, parallel
blocks, layer scale, adds not taken (with reasons), nested residuals, outside consumers."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import mhc_compile
from mhc_compile import MHCConfig
from mhc_compile.graph_pipeline import rewrite_graph
from mhc_compile.passes import build_chains, detect_sites
from mhc_compile.passes.nodes import normalize_path
from tests._convert_checks import one_thread, rel_err  # noqa: F401
from tests.models.zoo import tiny_gpt, token_inputs

CFG = MHCConfig(streams=3)


class Spellings(nn.Module):
    """Seven residual sites, one per add spelling, on one stream."""

    def __init__(self, c=16):
        super().__init__()
        self.f = nn.ModuleList(nn.Sequential(nn.LayerNorm(c), nn.Linear(c, c), nn.Tanh()) for _ in range(7))

    def forward(self, x):
        f = self.f
        x = x + f[0](x)
        x = f[1](x) + x
        x = torch.add(x, f[2](x))
        x = torch.add(x, f[3](x), alpha=0.5)
        x = x.add(f[4](x))
        h = f[5](x)
        x += h
        x = x.add_(f[6](x))
        return x * 2


def _export_gm(model, args):
    return torch.export.export(model, args, strict=False).module()


def _dynamo_graphs(model, args, cfg=None):
    """torch.compile with a backend that records (and optionally rewrites) each Dynamo graph."""
    import torch._dynamo

    graphs, reports = [], []

    def backend(gm, example_inputs):
        graphs.append(gm)
        if cfg is not None:
            reports.append(rewrite_graph(gm, cfg))
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    out = compiled(*args)
    return graphs, reports, out


def _symbolic_gm(model, args):
    gm = fx.symbolic_trace(model)
    fx.passes.shape_prop.ShapeProp(gm).propagate(*args)
    return gm


@pytest.mark.parametrize("flavour", ["export", "symbolic_trace"])
def test_all_add_spellings_are_sites(flavour):
    model, x = Spellings().eval(), (torch.randn(2, 5, 16),)
    gm = _export_gm(model, x) if flavour == "export" else _symbolic_gm(model, x)
    det = detect_sites(gm.graph)
    assert len(det.sites) == 7, [t.reason for t in det.not_taken]
    chains = build_chains(gm.graph, det)
    assert len(chains) == 1 and len(chains[0].sites) == 7
    scales = [s.branches[0][1] for s in det.sites]
    assert scales[3] == 0.5 and all(v == 1 for i, v in enumerate(scales) if i != 3)
    rep = rewrite_graph(gm, CFG)
    assert rep.num_sites == 7
    with torch.no_grad():
        assert rel_err(gm(*x), model(*x)) <= 1e-5


def test_all_add_spellings_dynamo():
    model, x = Spellings().eval(), (torch.randn(2, 5, 16),)
    graphs, reports, out = _dynamo_graphs(model, x, cfg=CFG)
    assert len(graphs) == 1
    assert (reports[0].num_sites, reports[0].num_chains) == (7, 1), str(reports[0])
    with torch.no_grad():
        assert rel_err(out, model(*x)) <= 1e-5


def test_dynamo_backend_rewrite_preserves_function():
    model, x = tiny_gpt(), token_inputs(2, 6)
    graphs, reports, out = _dynamo_graphs(model, x, cfg=CFG)
    assert len(graphs) == 1
    assert (reports[0].num_sites, reports[0].num_chains) == (4, 1)
    names = {k for k, _ in graphs[0].named_parameters()}
    assert any(k.endswith("attn.mhc.phi") for k in names), names
    with torch.no_grad():
        assert rel_err(out, model(*x)) <= 1e-5


class NotSites(nn.Module):
    def __init__(self, c=16):
        super().__init__()
        self.lin, self.lin2 = nn.Linear(c, c), nn.Linear(c, c)
        self.bias = nn.Parameter(torch.randn(c))

    def forward(self, x):
        a = x + x                                       # branch does no work
        b = a + 0.044715 * a.pow(3)                     # GELU-tanh style: elementwise only
        c = self.lin(b) + self.bias                     # shapes differ (bias broadcast)
        d = self.lin(c) + self.lin2(c)                  # no dependency (two branches of c)
        e = d + d.double().float()                      # dtype cast only: no work
        return e


def test_adds_not_taken_have_reasons():
    model, x = NotSites().eval(), (torch.randn(2, 4, 16),)
    rep = mhc_compile.find_residuals(model, x, CFG)
    assert rep.num_sites == 0
    reasons = " | ".join(t.reason for t in rep.not_taken)
    assert "branch does no work" in reasons
    assert "shapes differ" in reasons
    assert "no dependency" in reasons
    assert len(rep.not_taken) >= 4


class Nested(nn.Module):
    def __init__(self, c=16):
        super().__init__()
        self.a, self.b = nn.Linear(c, c), nn.Linear(c, c)

    def forward(self, x):
        h = x + self.a(x)
        h = h + self.b(h)
        return x + h  # a residual around two residuals


def test_nested_residual_outer_not_taken():
    rep = mhc_compile.find_residuals(Nested().eval(), (torch.randn(2, 3, 16),), CFG)
    assert rep.num_sites == 2 and rep.num_chains == 1
    assert any("nested" in t.reason for t in rep.not_taken)


class OutsideUse(nn.Module):
    """Returns a mid-chain hidden state: that use reads the collapsed streams; the chain goes on."""

    def __init__(self, c=16):
        super().__init__()
        self.f = nn.ModuleList(nn.Linear(c, c) for _ in range(3))

    def forward(self, x):
        h1 = x + self.f[0](x)
        h2 = F.relu(h1 + self.f[1](h1))  # post-activation: relu is stream-wise
        h3 = h2 + self.f[2](h2)
        return h3, h1 * 3, h2.sum(-1)


def test_outside_consumers_read_collapsed_value():
    model, x = OutsideUse().eval(), (torch.randn(2, 3, 16),)
    cm = mhc_compile.convert(model, CFG, x)
    rep = cm.mhc_report
    assert (rep.num_sites, rep.num_chains) == (3, 1)
    assert rep.chains[0].stream_wise_ops  # the relu
    with torch.no_grad():
        for a, b in zip(cm(*x), model(*x)):
            assert rel_err(a, b) <= 1e-5


class PostNormChannelsFirst(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1) for _ in range(2))

    def forward(self, x):
        for conv in self.convs:
            x = torch.relu(x + conv(x))
        return x


def test_channel_first_mixes_over_channels():
    model, x = PostNormChannelsFirst().eval(), (torch.randn(2, 8, 5, 5),)
    cm = mhc_compile.convert(model, CFG, x)
    rep = cm.mhc_report
    assert rep.num_chains == 1 and all(s.feature_axis == 1 and s.channels == 8 for s in rep.sites)
    assert cm.get_parameter("convs.0.mhc.phi").shape == (3 * 8, 3 * 2 + 9)
    with torch.no_grad():
        assert rel_err(cm(*x), model(*x)) <= 1e-5
        x2 = (torch.randn(3, 8, 5, 5),)
        assert rel_err(cm(*x2), model(*x2)) <= 1e-5


def test_normalize_path():
    assert normalize_path("L['self'].blocks[3].attn") == "blocks.3.attn"
    assert normalize_path("getattr(L['self'].layers, '0').mlp") == "layers.0.mlp"


def test_core_aten_graph_after_decompositions():
    """Inference-IR graphs (native_layer_norm + getitem between post-LN sites) chain the same way."""
    from tests.models.zoo import tiny_bert

    model, x = tiny_bert(), token_inputs(2, 6)
    gm = torch.export.export(model, x, strict=False).run_decompositions().module()
    rep = rewrite_graph(gm, CFG)
    assert (rep.num_sites, rep.num_chains) == (4, 1)
    with torch.no_grad():
        assert rel_err(gm(*x), model(*x)) <= 1e-5


def test_train_mode_capture_batchnorm_and_dropout():
    """A model converted in train mode keeps batch-stat BatchNorm (running stats update) and dropout,
    and .eval() switches both off as on the original model."""
    from tests.models.zoo import tiny_bert, tiny_resnet_basic

    model = tiny_resnet_basic().train()
    x = (torch.randn(4, 3, 8, 8),)
    ref_model = __import__("copy").deepcopy(model)
    cm = mhc_compile.convert(model, CFG, x)
    before = cm.get_buffer("layer1.0.bn1.running_mean").clone()
    out = cm(*x)
    assert rel_err(out, ref_model(*x)) <= 1e-5
    assert not torch.equal(before, cm.get_buffer("layer1.0.bn1.running_mean"))
    out.square().mean().backward()
    assert cm.get_parameter("layer1.0.mhc.b_pre").grad.abs().max() > 0

    bert = tiny_bert()
    for m in bert.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.5
    bert.train()
    cb = mhc_compile.convert(bert, CFG, token_inputs(2, 6))
    t = token_inputs(2, 6)
    assert not torch.equal(cb(*t), cb(*t))  # dropout active
    cb(*t).square().mean().backward()
    assert cb.get_parameter("layers.0.attn.mhc.b_post").grad.abs().max() > 0
    # train()/eval() switch dropout and batch norm like on the original model
    cb.eval()
    with torch.no_grad():
        assert torch.equal(cb(*t), cb(*t))
        assert rel_err(cb(*t), bert.eval()(*t)) <= 1e-5
    cm.eval()
    before = cm.get_buffer("layer1.0.bn1.running_mean").clone()
    with torch.no_grad():
        assert rel_err(cm(*x), ref_model.eval()(*x)) <= 1e-5
    assert torch.equal(before, cm.get_buffer("layer1.0.bn1.running_mean"))


class InplaceIntoView(nn.Module):
    def __init__(self, c=16):
        super().__init__()
        self.lin = nn.Linear(c, c)

    def forward(self, x):
        buf = x.clone()
        v = buf[:, :2]
        v += self.lin(v)  # mutates buf through the view: rewriting it would drop the mutation
        return buf


def test_inplace_add_into_view_not_taken():
    model, x = InplaceIntoView().eval(), (torch.randn(2, 4, 16),)
    gm = _export_gm(model, x)
    det = detect_sites(gm.graph)
    assert not det.sites
    assert any("view" in t.reason for t in det.not_taken)


class GRNBlock(nn.Module):
    """ConvNeXt-V2 style: the GRN inside the branch has its own parameter-only 'residual'."""

    def __init__(self, c=16):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(c, 2 * c), nn.Linear(2 * c, c)
        self.gamma, self.beta = nn.Parameter(torch.full((2 * c,), 0.1)), nn.Parameter(torch.zeros(2 * c))

    def forward(self, x):
        h = F.gelu(self.fc1(x))
        n = h.norm(dim=1, keepdim=True) / (h.norm(dim=1, keepdim=True).mean(-1, keepdim=True) + 1e-6)
        h = self.gamma * (h * n) + self.beta + h  # GRN: elementwise with parameters only
        return x + self.fc2(h)


def test_parameter_only_branch_is_not_a_site():
    model = nn.Sequential(GRNBlock(), GRNBlock()).eval()
    rep = mhc_compile.find_residuals(model, (torch.randn(2, 5, 16),), CFG)
    assert (rep.num_sites, rep.num_chains) == (2, 1), str(rep)
    assert any("no work" in t.reason and "inside the branch" in t.reason for t in rep.not_taken)


@pytest.mark.parametrize("name", ["bert", "resnet_bottleneck", "convnext", "parallel", "encdec", "llama"])
def test_zoo_on_dynamo_graphs(name):
    """The torch-level Dynamo graph of each family gives the same sites and chains as export."""
    from tests.models.zoo import FAMILIES

    build, ex, _, n_sites, n_chains = FAMILIES[name]
    model, x = build(), ex()
    _, reports, out = _dynamo_graphs(model, x, cfg=CFG)
    assert (reports[0].num_sites, reports[0].num_chains) == (n_sites, n_chains), str(reports[0])
    with torch.no_grad():
        assert rel_err(out, model(*x)) <= 1e-5


def test_param_provider_reuses_parameters_across_graphs():
    """The backend contract: a provider that returns existing parameters makes two rewrites share them."""
    model, x = tiny_gpt(), token_inputs(2, 6)
    store: dict = {}
    calls = []

    def provider(site_name, init):
        calls.append(site_name)
        if site_name not in store:
            store[site_name] = {k: nn.Parameter(v.clone()) for k, v in init.items()}
        return store[site_name]

    gm1, gm2 = _export_gm(model, x), _export_gm(model, x)
    rep1 = rewrite_graph(gm1, CFG, provider)
    rep2 = rewrite_graph(gm2, CFG, provider)
    assert calls[:4] == ["blocks.0.attn.mhc", "blocks.0.mlp.mhc", "blocks.1.attn.mhc", "blocks.1.mlp.mhc"]
    assert len(calls) == 8 and rep1.param_names == rep2.param_names
    assert gm1.get_parameter("blocks.1.mlp.mhc.phi") is gm2.get_parameter("blocks.1.mlp.mhc.phi")
    with torch.no_grad():
        store["blocks.0.mlp.mhc"]["b_post"].add_(0.5)  # visible through both graphs
        assert torch.equal(gm1(*x), gm2(*x))
        assert rel_err(gm1(*x), model(*x)) > 1e-4
    # the rewrite is idempotent: a second pass over a rewritten graph finds nothing to do
    again = rewrite_graph(gm1, CFG, provider)
    assert not again.rewritten and again.num_sites == 0


class _PoolMixer(nn.Module):
    """PoolFormer-style block: norm -> avg-pool token mixer -> add, plus an elementwise-only add."""

    def __init__(self, c=8):
        super().__init__()
        self.norm = nn.LayerNorm(c)

    def forward(self, x):  # (B, T, C)
        h = self.norm(x).transpose(1, 2)
        x = x + F.avg_pool1d(h, 3, 1, 1).transpose(1, 2)
        return x + torch.tanh(x)


def test_pooling_branch_is_a_site_and_elementwise_is_not_with_reason():
    x = torch.randn(2, 6, 8)
    gm = _export_gm(_PoolMixer(), (x,))
    det = detect_sites(gm.graph)
    assert len(det.sites) == 1
    assert any("elementwise only" in t.reason for t in det.not_taken)
