"""The channel axis is a fact of the graph, and models with native hyper-connections are left alone
(issue #22). Every family of the tests (hand-written zoo, HF families) plus HF SAM and VitDet
(residual (B, H, W, C)) is converted, its mHC parameters moved off init (seeded N(0, 0.3)), and
the original's invariants asserted: the channels are the hidden size, decoders stay causal, SAM
with window attention stays local, other sizes run, greedy ``generate`` agrees with and without
the KV cache, and the stream-carrying blocks equal the whole-graph form. HY-V4, DeepSeek-V4 and
Qwen4-Exp (native hyper-connections) come back unchanged with one line saying which dim carries
their streams. Tiny configs, no download."""
from __future__ import annotations

import warnings

import pytest
import torch

import mhc_compile
from mhc_compile import MHCConfig
from mhc_compile.cli.render import build_view, to_text
from mhc_compile.passes.detect import detect_sites
from tests._convert_checks import one_thread  # noqa: F401 (autouse fixture)
from tests._invariants import causality_leak, forms_differ, generate_agrees, locality_leak, perturb_mhc, runs_at
from tests.models.zoo import FAMILIES as ZOO

CFG = MHCConfig(streams=4)
pytestmark = pytest.mark.filterwarnings("ignore")

# name: (expected channels, index of the causal token input or None)
ZOO_EXPECT = {"gpt": ({32}, 0), "llama": ({32}, 0), "bert": ({32}, None), "vit": ({32}, None),
              "mixer": ({32}, None), "resnet_basic": ({16, 32}, None), "resnet_bottleneck": ({16, 32}, None),
              "convnext": ({16}, None), "parallel": ({32}, 0), "encdec": ({32}, 1)}
HF_EXPECT = {"gpt2": ({32}, 0), "llama": ({32}, 0), "bert": ({32}, None), "vit": ({32}, None),
             "resnet": ({16, 32}, None), "convnext": ({16, 32}, None), "gpt_neox": ({32}, 0), "t5": ({32}, 2)}


def _converted(build, ex):
    torch.manual_seed(0)
    model, args = build(), ex()
    return model, args, mhc_compile.convert(model, CFG, args)


def _check_family(model, args, other, cm, channels, causal):
    rep = cm.mhc_report
    assert {s.channels for s in rep.sites} == channels, str(rep)
    assert all(str(s.channels) == str(s.shape[s.feature_axis]) for s in rep.sites)
    perturb_mhc(cm)
    if causal is not None:
        for t in (3, args[causal].shape[1] - 1):
            leak = _causal_leak(cm, args, causal, t)
            assert leak == 0.0 or leak < 1e-6, f"token {t} leaks {leak:.2e} into earlier outputs"
        assert _causal_leak(model, args, causal, 3) < 1e-6
    shape, want = runs_at(model, cm, other)
    assert shape == want


def _causal_leak(model, args, index, t):
    def run(ids):
        call = list(args)
        call[index] = ids
        return model(*call)

    return causality_leak(run, args[index], t, vocab=64)


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_family_axis_and_invariants_at_trained_mhc_parameters(name):
    build, ex, other, _, _ = ZOO[name]
    model, args, cm = _converted(build, ex)
    _check_family(model, args, other(), cm, *ZOO_EXPECT[name])


@pytest.mark.parametrize("name", list(HF_EXPECT))
def test_hf_family_axis_and_invariants_at_trained_mhc_parameters(name):
    pytest.importorskip("transformers")
    from tests.models.hf import HF_FAMILIES

    build, ex, other, _, _ = HF_FAMILIES[name]
    model, args, cm = _converted(build, ex)
    channels, causal = HF_EXPECT[name]
    assert forms_differ(model, CFG, args, carried=cm) < 1e-5
    _check_family(model, args, other(), cm, channels, causal)
    if causal == 0:
        assert generate_agrees(cm, args[0][:, :5])


@pytest.fixture(scope="module")
def sam():
    pytest.importorskip("transformers")
    from tests.models.hf_axis import sam_vision_local

    torch.manual_seed(0)
    model, px = sam_vision_local(), torch.randn(2, 3, 16, 16)
    return model, px, mhc_compile.convert(model, CFG, (px,))


def test_sam_mixes_over_its_channels_and_window_attention_stays_local(sam):
    """SAM's residual is (B, H, W, C): the sites mix over dim 3 (C = 32), not over H. With every
    layer windowed (2x2 patches), output patch row 0 reads pixel rows 0-7 only, also at trained
    mHC parameters (the neck's 3x3 conv reads one patch row further: row 0 is the local one)."""
    model, px, cm = sam
    rep = cm.mhc_report
    assert rep.form == "blocks" and [(s.feature_axis, s.channels) for s in rep.sites] == [(3, 32)] * 4, str(rep)
    assert cm.get_parameter("vision_encoder.layers.0.attn.mhc.phi").shape == (4 * 32, 24)
    table = str(rep).splitlines()
    assert table[2].split()[4:6] == ["axis", "C"] and table[4].split()[4:6] == ["3", "32"], str(rep)
    text = to_text(build_view(rep, CFG))  # what `mhc inspect` prints
    assert "axis  C " in text and " 3     32 " in text, text
    assert locality_leak(model, px, slice(0, 1), slice(8, 16), row_dim=2) == 0.0
    assert locality_leak(model, px, slice(1, 2), slice(8, 16), row_dim=2) > 0.1  # the test can fail
    trained = perturb_mhc(_copy(cm))
    assert locality_leak(trained, px, slice(0, 1), slice(8, 16), row_dim=2) == 0.0
    shape, want = runs_at(model, trained, (torch.randn(3, 3, 16, 16),))
    assert shape == want
    assert forms_differ(model, CFG, (px,), carried=cm) < 1e-5


def _copy(m):
    import copy

    return copy.deepcopy(m)


def test_vitdet_mixes_over_its_channels_and_runs_at_another_image_size():
    pytest.importorskip("transformers")
    from tests.models.hf_axis import vitdet

    torch.manual_seed(0)
    model, px = vitdet(), torch.randn(2, 3, 16, 16)
    cm = mhc_compile.convert(model, CFG, (px,))
    assert {(s.feature_axis, s.channels) for s in cm.mhc_report.sites} == {(3, 32)}, str(cm.mhc_report)
    perturb_mhc(cm)
    shape, want = runs_at(model, cm, (torch.randn(3, 3, 32, 32),))
    assert shape == want == (3, 32, 8, 8)


@pytest.mark.parametrize("name, axis", [("hy_v4", 2), ("deepseek_v4", 2), ("qwen4_exp", -1)])
def test_native_hyper_connections_are_not_widened_again(name, axis):
    """HY-V4 and DeepSeek-V4 keep a (B, T, 4, C) state (expanded at the embedding, collapsed at
    the head): convert returns the model unchanged with one line naming dim 2 and the layers;
    Qwen4-Exp (a (B, T, 4*C) state) cannot be captured, and gets that line from its config and
    modules instead of a capture error."""
    pytest.importorskip("transformers")
    from tests.models import hf_axis

    torch.manual_seed(0)
    model, ids = getattr(hf_axis, name)(), torch.randint(2, 64, (2, 12))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = mhc_compile.convert(model, CFG, (ids,))
    assert out is model and not any(".mhc" in k for k in model.state_dict())
    lines = [str(w.message) for w in caught if "hyper-connections" in str(w.message) or "streams on dim" in str(w.message)]
    assert len(lines) == 1 and "not widened again" in lines[0] and "returning the model unchanged" in lines[0], lines
    if axis >= 0:
        assert f"4 streams on dim {axis}" in lines[0] and "model.layers.0" in lines[0], lines[0]
    if name == "hy_v4":
        rep = mhc_compile.find_residuals(model, (ids,))
        assert rep.num_sites == 0 and [(n.axis, n.streams) for n in rep.native] == [(axis, 4)]
        assert "native hyper-connections: " in str(rep) and rep.to_dict()["native"][0]["axis"] == axis
        assert any("native hyper-connections" in t.reason for t in rep.not_taken)
        from mhc_compile.cli.main import _why_none  # what `mhc convert` says when nothing is left

        assert "4 streams on dim 2" in _why_none(rep)
    if axis < 0:
        assert "config.hc_count = 4" in lines[0] and "attn_hyper_connection" in lines[0], lines[0]


def test_a_site_whose_axis_cannot_be_known_is_refused_with_the_reason():
    """A branch that reads the stream only through ops that tell no axis (an einsum here) is not
    taken: the report says why, instead of guessing from the rank."""
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(8, 8))

        def forward(self, x):  # (B, 4, 4, 8)
            return x + torch.einsum("bhwc,cd->bhwd", x, self.w)

    gm = torch.fx.symbolic_trace(Block())
    torch.fx.passes.shape_prop.ShapeProp(gm).propagate(torch.randn(2, 4, 4, 8))
    found = detect_sites(gm.graph)
    assert not found.sites
    assert any("channel axis cannot be known" in t.reason for t in found.not_taken), found.not_taken


def test_conflicting_uses_refuse_the_site():
    """The branch reads dim 3 (a linear), the consumer after the add reads dim 1 (a conv): the
    sides disagree, so the site is refused rather than mixed over either."""
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.f, self.conv = torch.nn.Linear(8, 8), torch.nn.Conv2d(4, 4, 1)

        def forward(self, x):  # (B, 4, 4, 8)
            return self.conv(x + self.f(x))

    rep = mhc_compile.find_residuals(Block(), (torch.randn(2, 4, 4, 8),))
    assert rep.num_sites == 0
    assert any("ambiguous" in t.reason and "conv" in t.reason for t in rep.not_taken), rep.not_taken


class _WindowedHWC(torch.nn.Module):
    """A (B, H, W, C) residual with 2x2 window attention-like mixing (a linear over each window's
    4 positions) and an MLP: rows 0-1 of the output read rows 0-1 of the input only."""

    def __init__(self, c=8):
        super().__init__()
        self.ln1, self.ln2 = torch.nn.LayerNorm(c), torch.nn.LayerNorm(c)
        self.mix, self.mlp = torch.nn.Linear(4, 4), torch.nn.Linear(c, c)

    def forward(self, x):  # (B, 4, 4, C)
        b, h, w, c = x.shape
        win = self.ln1(x).view(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 5, 2, 4).reshape(b, h // 2, w // 2, c, 4)
        win = self.mix(win).view(b, h // 2, w // 2, c, 2, 2).permute(0, 1, 4, 2, 5, 3).reshape(b, h, w, c)
        x = x + win
        return x + self.mlp(self.ln2(x))


def test_backend_reads_the_axis_of_a_channels_last_stream_from_the_dynamo_graph():
    """Through torch.compile(backend="mhc") (Dynamo's torch-level graph): the sites mix over C =
    8 on dim 3, and at trained mHC parameters the window rows stay local."""
    from mhc_compile import backend as B

    torch._dynamo.reset()
    B.clear_records()
    torch.manual_seed(0)
    model, x = _WindowedHWC().eval(), torch.randn(2, 4, 4, 8)
    compiled = torch.compile(model, backend="mhc", options={"inner": "eager", "streams": 4})
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-4)
    sites = [s for r in B.records() for s in r.report.sites]
    assert [(s.feature_axis, s.channels) for s in sites] == [(3, 8), (3, 8)], sites
    perturb_mhc(model)  # the backend registers the mHC parameters on the compiled module
    assert _hwc_leak(model, x) == 0.0 and _hwc_leak(compiled, x) == 0.0
    torch._dynamo.reset()


def _hwc_leak(model, x):
    other = x.clone()
    other[:, 2:] = torch.randn(other[:, 2:].shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = model(x), model(other)
    return ((a - b)[:, :2].abs().max() / a.abs().max()).item()


def test_a_branch_that_permutes_to_channels_last_first_mixes_over_dim_1():
    """(B, C, H, W) stream whose branch permutes to channels-last before its norm and linear (the
    permute is seen through): dim 1, C = 8; at trained mHC parameters a pixel still reads only
    its own position (the branch is pointwise), as in the original."""
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ln, self.fc = torch.nn.LayerNorm(8), torch.nn.Linear(8, 8)

        def forward(self, x):
            for _ in range(2):
                x = x + self.fc(self.ln(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
            return x

    torch.manual_seed(0)
    model, x = Block().eval(), torch.randn(2, 8, 4, 4)
    cm = mhc_compile.convert(model, CFG, (x,))
    assert [(s.feature_axis, s.channels) for s in cm.mhc_report.sites] == [(1, 8), (1, 8)], str(cm.mhc_report)
    perturb_mhc(cm)
    assert locality_leak(cm, x, slice(0, 2), slice(2, 4), row_dim=2) == 0.0


def test_a_branch_contracting_two_dims_together_is_refused():
    """A (B, T, 4, C) input whose branch flattens (4, C) and contracts them in one linear (a
    multi-stream state the graph does not show being expanded): no single channel axis, refused."""
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(32, 32)

        def forward(self, x):  # (B, T, 4, 8)
            return x + self.fc(x.flatten(2)).unflatten(2, (4, 8))

    gm = torch.fx.symbolic_trace(Block())
    torch.fx.passes.shape_prop.ShapeProp(gm).propagate(torch.randn(2, 5, 4, 8))
    found = detect_sites(gm.graph)
    assert not found.sites
    assert any("several stream dims" in t.reason for t in found.not_taken), found.not_taken
