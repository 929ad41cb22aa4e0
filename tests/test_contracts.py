"""The typed, versioned contracts between the layers: ``ResidualReport.from_dict`` is the exact
inverse of ``to_dict`` (also through JSON, as mhc.json stores it), ``MHCConfig.from_dict`` the
inverse of ``MHCConfig.to_dict``; newer versions and malformed dicts are refused with errors
that say what to do; readers refuse an untyped report instead of probing it."""
from __future__ import annotations

import json

import pytest
import torch

import mhc_compile
from mhc_compile import MHCConfig, MHCConfigError, ResidualReport
from mhc_compile.report import ReportVersionError
from tests.models.zoo import encdec_inputs, image_inputs, tiny_encdec, tiny_gpt, tiny_resnet_basic, token_inputs


@pytest.fixture(scope="module")
def reports():
    torch.manual_seed(0)
    gpt = mhc_compile.convert(tiny_gpt(), MHCConfig(streams=3), token_inputs()).mhc_report
    torch.manual_seed(0)
    encdec = mhc_compile.convert(tiny_encdec(), MHCConfig(streams=2), encdec_inputs()).mhc_report
    torch.manual_seed(0)
    resnet = mhc_compile.convert(tiny_resnet_basic(), MHCConfig(streams=4), image_inputs()).mhc_report
    return {"gpt": gpt, "encdec": encdec, "resnet": resnet}


@pytest.mark.parametrize("name", ["gpt", "encdec", "resnet"])
def test_report_round_trip(reports, name):
    report = reports[name]
    assert isinstance(report, ResidualReport) and report.rewritten
    data = report.to_dict()
    assert data["version"] == ResidualReport.VERSION
    back = ResidualReport.from_dict(data)
    assert back == report
    assert back.to_dict() == data
    # through JSON as mhc.json stores it (symbolic dims become strings): the text is unchanged
    via_json = ResidualReport.from_dict(json.loads(json.dumps(data, default=str)))
    assert via_json.num_sites == report.num_sites and via_json.num_chains == report.num_chains
    assert [s.name for s in via_json.sites] == [s.name for s in report.sites]
    assert via_json.to_table() == report.to_table()


def test_report_round_trip_keeps_not_taken(reports):
    report = reports["resnet"]
    assert report.num_sites == 3 and report.num_chains == 2
    assert len(report.not_taken) == 1, "the projection-shortcut add is not a residual site"
    back = ResidualReport.from_dict(report.to_dict())
    assert [(t.node, t.reason) for t in back.not_taken] == [(t.node, t.reason) for t in report.not_taken]


def test_report_versions(reports):
    data = reports["gpt"].to_dict()
    legacy = {k: v for k, v in data.items() if k != "version"}  # written by mhc-compile 0.1
    assert ResidualReport.from_dict(legacy) == reports["gpt"]
    with pytest.raises(ReportVersionError, match="version 2 is not readable"):
        ResidualReport.from_dict({**data, "version": 2})
    with pytest.raises(ReportVersionError, match="must be a dict"):
        ResidualReport.from_dict([1, 2])
    with pytest.raises(ReportVersionError, match="malformed"):
        ResidualReport.from_dict({"version": 1})


def test_render_takes_a_typed_report(reports):
    from mhc_compile.cli import render

    view = render.build_view(reports["gpt"], MHCConfig(streams=3))
    assert len(view["sites"]) == 4
    with pytest.raises(TypeError, match="ResidualReport"):
        render.build_view(reports["gpt"].to_dict(), MHCConfig(streams=3))


def test_config_round_trip():
    configs = [MHCConfig(), MHCConfig(streams=1, dynamic=False, variant="hc", init="paper", collapse="learned",
                                      kernels="reference", recompute=False, recompute_block=3, eps=1e-5,
                                      fuse_boundaries=False, inner="aot_eager", sinkhorn_iters=7, alpha_init=0.1)]
    for cfg in configs:
        data = cfg.to_dict()
        assert data["version"] == MHCConfig.VERSION
        assert set(data) == set(MHCConfig.field_names()) | {"version"}
        assert MHCConfig.from_dict(data) == cfg
        assert MHCConfig.from_dict(json.loads(json.dumps(data))) == cfg
        assert MHCConfig.from_options(data) == cfg  # torch.compile options / mhc.json accept it too


def test_config_dict_errors():
    data = MHCConfig(streams=2).to_dict()
    with pytest.raises(MHCConfigError, match="version 9 is not readable"):
        MHCConfig.from_dict({**data, "version": 9})
    with pytest.raises(MHCConfigError, match="unknown mhc option.*'colapse'"):
        MHCConfig.from_dict({**data, "colapse": "mean"})
    with pytest.raises(MHCConfigError, match="must be a dict"):
        MHCConfig.from_dict("streams=2")
    legacy = {k: v for k, v in data.items() if k != "version"}  # mhc.json of mhc-compile 0.1
    assert MHCConfig.from_dict(legacy) == MHCConfig(streams=2)


def test_passes_take_the_config_built_at_the_entry_point(monkeypatch):
    """convert builds the MHCConfig once; the passes read it and never rebuild it from options."""
    from mhc_compile.graph_pipeline import rewrite_graph

    calls = []
    real = MHCConfig.from_options.__func__
    monkeypatch.setattr(MHCConfig, "from_options", classmethod(lambda cls, o=None: calls.append(o) or real(cls, o)))
    torch.manual_seed(0)
    converted = mhc_compile.convert(tiny_gpt(), MHCConfig(streams=2), token_inputs())
    assert converted.mhc_report.num_sites == 4
    assert len(calls) == 1, f"MHCConfig.from_options ran {len(calls)} times for one convert"
    gm = torch.export.export(tiny_gpt(), token_inputs(), strict=False).module()
    with pytest.raises(TypeError, match="needs an MHCConfig"):
        rewrite_graph(gm, {"streams": 2})
