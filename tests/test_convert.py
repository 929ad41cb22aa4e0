"""mhc_compile.convert on the tiny model zoo: exact site/chain counts, function preservation at init
(also at other batch / sequence sizes), training (gradients to every new parameter, broken
symmetry between streams), state_dict round trips, parameter names, no mutation of the caller's
model, the no-residual warning and the capture error."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import mhc_compile
from mhc_compile import MHCCaptureError, MHCConfig, ResidualReport
from tests._convert_checks import (mhc_ops_run,   # noqa: F401 (one_thread: autouse fixture)
    check_training_breaks_symmetry, mhc_params, one_thread, rel_err, state_dict_roundtrip,
)
from tests.models.zoo import FAMILIES, plain_inputs, tiny_gpt, tiny_plain, token_inputs

CFG = MHCConfig(streams=4)
_CACHE: dict = {}


def converted(name):
    """(original model, converted model, example inputs, other inputs) for a family; built once."""
    if name not in _CACHE:
        build, ex, other, _, _ = FAMILIES[name]
        torch.manual_seed(0)
        model = build()
        ex_in, other_in = ex(), other()
        _CACHE[name] = (model, mhc_compile.convert(model, CFG, ex_in), ex_in, other_in)
    return _CACHE[name]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family(name):
    model, cm, ex_in, other_in = converted(name)
    _, _, _, n_sites, n_chains = FAMILIES[name]
    rep = cm.mhc_report
    assert isinstance(rep, ResidualReport)
    assert (rep.num_sites, rep.num_chains) == (n_sites, n_chains), str(rep)

    # function preservation at init, at the example shapes and at other batch/sequence sizes
    with torch.no_grad():
        for inputs in (ex_in, other_in):
            assert rel_err(cm(*inputs), model(*inputs)) <= 1e-5

    # every site has its parameters, named after the module path, and home streams differ in a chain
    params = mhc_params(cm)
    per_site = 5 if CFG.dynamic else 3
    assert len(params) == per_site * n_sites
    assert sum(p.numel() for p in params.values()) == rep.params_added
    for s in rep.sites:
        assert f"{s.name}.phi" in params and f"{s.name}.b_res" in params
    for c in rep.chains:
        homes = [rep.sites[i].home_stream for i in c.sites]
        assert all(a != b for a, b in zip(homes, homes[1:]))

    # original parameter and buffer names are kept
    orig = set(model.state_dict())
    assert orig <= set(cm.state_dict())

    # streams are identical at init, and differ after training
    trained = check_training_breaks_symmetry(cm, ex_in)

    # state_dict round trip into a freshly converted model
    build = FAMILIES[name][0]
    torch.manual_seed(123)
    fresh = mhc_compile.convert(build(), CFG, ex_in)
    assert state_dict_roundtrip(trained, fresh, other_in) == 0.0


def test_convert_does_not_mutate_caller_model():
    model = tiny_gpt()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules_before = [n for n, _ in model.named_modules()]
    cm = mhc_compile.convert(model, CFG, token_inputs())
    assert cm is not model
    assert [n for n, _ in model.named_modules()] == modules_before
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any("mhc" in k for k in after)


def test_param_names_and_config_variants():
    model = tiny_gpt()
    cm = mhc_compile.convert(model, MHCConfig(streams=2, dynamic=False, collapse="learned"), token_inputs())
    names = set(mhc_params(cm))
    assert "blocks.0.attn.mhc.b_pre" in names and "blocks.1.mlp.mhc.b_res" in names
    assert not any(k.endswith(".phi") or k.endswith(".alpha") for k in names)
    assert "blocks.1.mlp.mhc_collapse.weight" in names
    x = token_inputs(3, 7)
    with torch.no_grad():
        assert rel_err(cm(*x), model(*x)) <= 1e-5
    assert cm.mhc_report.params_added == sum(p.numel() for p in mhc_params(cm).values())
    cm(*x).square().mean().backward()
    assert cm.get_parameter("blocks.1.mlp.mhc_collapse.weight").grad.abs().max() > 0
    assert cm.get_parameter("blocks.0.attn.mhc.b_pre").grad.abs().max() > 0


def test_no_fusion_matches_fusion():
    model = tiny_gpt()
    x = token_inputs(2, 6)
    a = mhc_compile.convert(model, MHCConfig(streams=3, fuse_boundaries=True), x)
    b = mhc_compile.convert(model, MHCConfig(streams=3, fuse_boundaries=False), x)
    assert "boundary" in mhc_ops_run(a, *x) and "boundary" not in mhc_ops_run(b, *x)
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        assert torch.allclose(a(*x), b(*x), atol=1e-6)


def test_to_and_dtype():
    cm = mhc_compile.convert(tiny_gpt(), CFG, token_inputs())
    cm.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in cm.parameters())
    out = cm(*token_inputs())
    assert out.dtype == torch.float64


def test_no_residual_warns_and_returns_model():
    model = tiny_plain()
    with pytest.warns(UserWarning, match="no residual site"):
        out = mhc_compile.convert(model, CFG, plain_inputs())
    assert out is model


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        h = self.lin(x)
        if h.sum() > 0:  # data-dependent Python control flow: not capturable
            return x + h
        return x - h


def test_uncapturable_model_raises_clear_error():
    with pytest.raises(MHCCaptureError, match="What to try"):
        mhc_compile.convert(_DataDependent(), CFG, (torch.randn(2, 8),))


def test_find_residuals_report():
    rep = mhc_compile.find_residuals(FAMILIES["resnet_basic"][0](), FAMILIES["resnet_basic"][1](), CFG)
    assert (rep.num_sites, rep.num_chains) == (3, 2)
    reasons = [t.reason for t in rep.not_taken]
    assert any("no dependency" in r for r in reasons)  # the projection shortcut block
    d = json.loads(rep.to_json())
    assert d["num_sites"] == 3 and len(d["chains"]) == 2 and d["not_taken"]
    table = str(rep)
    assert "layer1.0.mhc" in table and "not taken" in table
    assert [s.home_stream for s in rep.sites] == [0, 1, 0]
    assert rep.sites[0].feature_axis == 1
    par = mhc_compile.find_residuals(FAMILIES["parallel"][0](), FAMILIES["parallel"][1](), CFG)
    assert [s.kind for s in par.sites] == ["parallel", "parallel"]
    cnx = mhc_compile.find_residuals(FAMILIES["convnext"][0](), FAMILIES["convnext"][1](), CFG)
    assert [s.kind for s in cnx.sites] == ["layer_scale", "layer_scale"]


def test_options_dict_and_single_tensor_input():
    model = tiny_gpt()
    idx = token_inputs(2, 5)[0]
    cm = mhc_compile.convert(model, {"streams": 2, "sinkhorn_iters": 5}, idx)
    assert cm.mhc_config.streams == 2
    assert cm.get_parameter("blocks.0.attn.mhc.b_res").shape == (2, 2)
    with torch.no_grad():
        assert rel_err(cm(idx), model(idx)) <= 1e-5
    with pytest.raises(TypeError, match="example_inputs"):
        mhc_compile.convert(model, CFG)
