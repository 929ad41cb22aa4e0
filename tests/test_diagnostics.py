"""Tests for mhc_compile.diagnostics: Amax gains on hand-built matrices and on a stream model built from ops."""
import math

import pytest
import torch
from torch import nn

from mhc_compile import diagnostics as D
from mhc_compile import ops, reference


# ----------------------------------------------------------------------------- pure functions
def test_permutation_and_identity_have_gain_one():
    perm = torch.eye(4)[[2, 0, 3, 1]]
    assert D.amax_gain(perm) == (1.0, 1.0)
    assert D.amax_gain(torch.eye(4)) == (1.0, 1.0)
    g = D.amax_gain(D.composite([perm, perm.T, perm, perm]))
    assert g.forward == pytest.approx(1.0) and g.backward == pytest.approx(1.0)


def test_scaled_matrix_gain():
    perm = torch.eye(3)[[1, 2, 0]]
    g = D.amax_gain(2.5 * perm)
    assert g.forward == pytest.approx(2.5) and g.backward == pytest.approx(2.5)
    # composite of scaled permutations multiplies the scales
    g = D.amax_gain(D.composite([2.0 * perm, 3.0 * torch.eye(3), 0.5 * perm]))
    assert g.forward == pytest.approx(3.0) and g.backward == pytest.approx(3.0)


def test_asymmetric_row_and_column_sums():
    # rows sum (abs) to 3, 5 -> forward 5 ; columns to 6, 2 -> backward 6
    m = torch.tensor([[1.0, -2.0], [5.0, 0.0]])
    g = D.amax_gain(m)
    assert g.forward == pytest.approx(5.0)
    assert g.backward == pytest.approx(6.0)
    rows, cols = D.row_col_sums(m)
    assert rows.tolist() == [[3.0, 5.0]] and cols.tolist() == [[6.0, 2.0]]


def test_composite_order_and_non_doubly_stochastic_product():
    a = torch.tensor([[1.0, 1.0], [0.0, 1.0]])  # rows 2,1 ; cols 1,2
    b = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    # execution order [a, b] means b @ a
    p = D.composite([a, b])
    assert torch.equal(p, (b @ a).double())
    assert not torch.equal(p, (a @ b).double())
    # b @ a = [[2, 2], [0, 1]]: row sums 4, 1 ; col sums 2, 3
    g = D.amax_gain(p)
    assert g.forward == pytest.approx(4.0) and g.backward == pytest.approx(3.0)


def test_gain_is_averaged_over_tokens_and_broadcasts():
    tokens = torch.stack([torch.eye(2), 3.0 * torch.eye(2), torch.tensor([[1.0, 1.0], [1.0, 1.0]])])
    g = D.amax_gain(tokens.view(3, 1, 2, 2))
    assert g.forward == pytest.approx((1 + 3 + 2) / 3)
    assert g.backward == pytest.approx((1 + 3 + 2) / 3)
    # a static (1, 1, n, n) site broadcasts against per-token ones
    static = (2.0 * torch.eye(2)).view(1, 1, 2, 2)
    p = D.composite([tokens.view(3, 1, 2, 2), static])
    assert p.shape == (3, 1, 2, 2)
    assert D.amax_gain(p).forward == pytest.approx(2 * (1 + 3 + 2) / 3)


def test_sinkhorn_products_stay_near_one():
    torch.manual_seed(1)
    mats = [reference.sinkhorn(3.0 * torch.randn(16, 4, 4), 20) for _ in range(12)]
    g = D.amax_gain(D.composite(mats))
    assert g.forward == pytest.approx(1.0, abs=1e-5)
    # columns after 20 iterations are within a small tolerance of 1 too
    assert g.backward == pytest.approx(1.0, abs=0.05)
    # and an unconstrained product of the same size explodes
    raw = [torch.eye(4) + 0.5 * torch.rand(16, 4, 4) for _ in range(12)]
    assert D.amax_gain(D.composite(raw)).forward > 100


def test_report_from_records_and_chains():
    n = 2
    eye = torch.eye(n)
    h_pre = torch.full((5, n), 0.5)
    h_post = torch.ones(5, n)
    recs = [
        (h_pre, h_post, eye.expand(5, n, n)),
        (h_pre, h_post, 2.0 * eye.expand(5, n, n)),
        (h_pre, h_post, torch.tensor([[1.0, -2.0], [5.0, 0.0]]).expand(5, n, n)),
    ]
    rep = D.gains_from_records(recs, chains=[[0, 1], [2]], names=["a", "b", "c"])
    assert [s.forward for s in rep.sites] == pytest.approx([1.0, 2.0, 5.0])
    assert [s.backward for s in rep.sites] == pytest.approx([1.0, 2.0, 6.0])
    assert [s.chain for s in rep.sites] == [0, 0, 1]
    assert rep.chains[0].forward == pytest.approx(2.0)
    assert rep.chains[0].cumulative_forward == pytest.approx([1.0, 2.0])
    assert rep.chains[1].backward == pytest.approx(6.0)
    assert rep.chains[1].row_sums == pytest.approx([3.0, 5.0])
    assert rep.max_forward == pytest.approx(5.0)
    assert rep.sites[0].pre_sum == pytest.approx(1.0)
    d = rep.to_dict()
    assert d["chains"][0]["sites"] == [0, 1] and d["sites"][2]["name"] == "c"
    table = rep.to_table()
    assert "chain 1" in table and len(table.splitlines()) == 1 + 3 + 2
    with pytest.raises(ValueError):
        D.gains_from_records(recs, chains=[[0, 7]])
    with pytest.raises(ValueError):
        D.gains_from_records([])


def test_chains_from_report_shapes():
    class S:
        def __init__(self, index, name):
            self.index, self.name = index, name

    rep = {"chains": [{"sites": [S(0, "blocks.0.attn"), S(1, "blocks.0.mlp")]}, [2]]}
    chains, names = D.chains_from_report(rep, 3)
    assert chains == [[0, 1], [2]]
    assert names[:2] == ["blocks.0.attn", "blocks.0.mlp"]
    assert D.chains_from_report(rep, 4) == (None, None)


# ----------------------------------------------------------------------------- on a stream model
class StreamNet(nn.Module):
    """L residual MLP sites on n streams, assembled by hand from mhc_compile.ops."""

    def __init__(self, c=16, n=4, layers=3, variant="mhc"):
        super().__init__()
        self.n, self.variant = n, variant
        self.branches = nn.ModuleList(nn.Sequential(nn.Linear(c, c), nn.GELU(), nn.Linear(c, c)) for _ in range(layers))
        self.params = nn.ModuleList()
        for i in range(layers):
            p = reference.init_site_params(n, c, i, variant=variant)
            self.params.append(nn.ParameterDict({k: nn.Parameter(v) for k, v in p.items()}))

    def forward(self, x):
        s = ops.expand(x, self.n)
        for f, p in zip(self.branches, self.params):
            hp, ho, hr = ops.coeffs(s, p["phi"], p["alpha"], p["b_pre"], p["b_post"], p["b_res"], variant=self.variant, kernels="reference")
            s = ops.post_res(s, f(ops.pre(s, hp, "reference")), ho, hr, "reference")
        return ops.collapse(s)


def test_amax_gains_on_stream_model_at_init_and_perturbed():
    net = StreamNet()
    x = torch.randn(2, 8, 16)
    rep = D.amax_gains(net, x)
    assert len(rep.sites) == 3 and rep.streams == 4
    assert rep.max_forward == pytest.approx(1.0, abs=1e-5)
    assert rep.max_backward == pytest.approx(1.0, abs=0.05)
    assert rep.sites[0].pre_sum == pytest.approx(1.0, abs=1e-5)
    # streams are copies at the first site: divergence 0, equal RMS
    assert rep.sites[0].stream_divergence == pytest.approx(0.0, abs=1e-12)
    assert len(set(round(v, 6) for v in rep.sites[0].stream_rms)) == 1
    # after site 0 the home stream differs (H_post=1 adds f everywhere, H_res ~ I keeps it)
    assert rep.sites[1].stream_rms is not None
    assert net.training  # mode restored

    # push the static part far off: still doubly stochastic for mHC
    with torch.no_grad():
        for p in net.params:
            p["b_res"].copy_(5.0 * torch.randn(4, 4))
            p["alpha"].fill_(1.0)
            p["phi"].normal_()
    rep = D.amax_gains(net, x, chains=[[0, 1], [2]])
    assert len(rep.chains) == 2
    assert rep.max_forward == pytest.approx(1.0, abs=1e-4)


def test_amax_gains_hc_grows_when_weights_grow():
    net = StreamNet(variant="hc")
    x = torch.randn(2, 8, 16)
    assert D.amax_gains(net, x).max_forward == pytest.approx(1.0, abs=1e-5)  # b_res = I, phi = 0
    with torch.no_grad():
        for p in net.params:
            p["b_res"].add_(0.4)  # every row sums to 1 + 4*0.4 = 2.6
    rep = D.amax_gains(net, x)
    assert rep.max_site_forward == pytest.approx(2.6, rel=1e-5)
    assert rep.max_forward == pytest.approx(2.6**3, rel=1e-4)


def test_amax_gains_under_torch_compile():
    net = StreamNet(layers=2)
    x = torch.randn(2, 8, 16)
    compiled = torch.compile(net, backend="aot_eager", fullgraph=True)
    rep = D.amax_gains(compiled, x)
    assert len(rep.sites) == 2
    assert rep.sites[0].stream_rms is None  # streams are not recorded inside compiled graphs
    assert rep.max_forward == pytest.approx(1.0, abs=1e-5)


# ----------------------------------------------------------------------------- on converted models
def _converted(variant="mhc"):
    import mhc_compile
    from mhc_compile import MHCConfig
    from tests.models.zoo import tiny_gpt, token_inputs

    model = tiny_gpt()
    return mhc_compile.convert(model, MHCConfig(streams=4, variant=variant), token_inputs(2, 8))


def test_amax_gains_on_converted_model_uses_rewrite_report():
    conv = _converted()
    from tests.models.zoo import token_inputs

    x = token_inputs(2, 8)[0]
    rep = D.amax_gains(conv, x)
    report = conv.mhc_report
    assert len(rep.sites) == report.num_sites == 4
    assert [c.sites for c in rep.chains] == [list(c.sites) for c in report.chains]
    assert [s.name for s in rep.sites] == [s.name for s in report.sites]
    assert rep.max_forward == pytest.approx(1.0, abs=1e-5)
    assert all(s.stream_rms is not None and len(s.stream_rms) == 4 for s in rep.sites)
    # compiled converted model: same coefficients recorded inside the compiled graph
    compiled = torch.compile(conv, backend="aot_eager")
    rep_c = D.amax_gains(compiled, x)
    assert [s.forward for s in rep_c.sites] == pytest.approx([s.forward for s in rep.sites], abs=1e-6)
    assert rep_c.max_forward == pytest.approx(1.0, abs=1e-5)


def test_amax_gains_converted_hc_after_perturbation():
    conv = _converted("hc")
    from tests.models.zoo import token_inputs

    with torch.no_grad():
        for name, p in conv.named_parameters():
            if name.endswith("b_res"):
                p.add_(0.25)  # rows sum to 1 + 4 * 0.25 = 2
    rep = D.amax_gains(conv, token_inputs(2, 8)[0])
    assert rep.max_site_forward == pytest.approx(2.0, rel=1e-5)
    assert rep.max_forward == pytest.approx(2.0 ** len(rep.chains[0].sites), rel=1e-4)


def test_amax_gains_on_mhc_backend_compiled_model():
    import warnings

    from tests.models.zoo import tiny_gpt, token_inputs

    model = tiny_gpt()
    compiled = torch.compile(model, backend="mhc", options={"streams": 4, "inner": "aot_eager"})
    x = token_inputs(2, 8)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled(x)
        rep = D.amax_gains(compiled, x)
    assert len(rep.sites) == 4
    assert [s.name for s in rep.sites] == ["blocks.0.attn.mhc", "blocks.0.mlp.mhc", "blocks.1.attn.mhc", "blocks.1.mlp.mhc"]
    assert rep.max_forward == pytest.approx(1.0, abs=1e-5)


def test_stream_stats_known_values():
    # two streams, constant 1 and 3 over 5 tokens x 4 features: RMS 1 and 3; mean stream 2,
    # deviation from it 1 everywhere -> divergence 1 / 2
    x = torch.stack([torch.ones(5, 4), 3 * torch.ones(5, 4)], dim=-2)  # (5, 2, 4)
    st = D._stream_stats(x)
    assert st.rms == pytest.approx([1.0, 3.0])
    assert st.divergence == pytest.approx(0.5)
    # identical copies: divergence 0 (the collapsed / just-expanded state)
    st = D._stream_stats(ops.expand(torch.randn(3, 7, 8), 4))
    assert st.divergence == 0.0 and len(set(st.rms)) == 1
    # one attenuated stream shows up in the per-stream RMS
    y = torch.randn(64, 4, 16)
    y[:, 2] *= 0.01
    rms = D._stream_stats(y).rms
    assert rms[2] < 0.05 * min(rms[0], rms[1], rms[3])
