"""Tests of the ``mhc`` command line (mhc_compile/cli): convert for every source kind, load round
trips, inspect in every format, demo, and the error cases with their exit codes."""
from __future__ import annotations

import shutil
import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import mhc_compile
from mhc_compile.cli.main import cli
from mhc_compile.cli.render import site_cost
from mhc_compile.io import MHCIOError
from tests._convert_checks import main_output, one_thread, rel_err  # noqa: F401 (one_thread: autouse fixture)

transformers = pytest.importorskip("transformers")


def run(*args, ok=True):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, (result.output, result.exception)
    return result


# ------------------------------------------------------------------------------- HF models
HF_MODELS = {
    "gpt2": lambda: transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64,
                                bos_token_id=0, eos_token_id=0)),
    "bert": lambda: transformers.BertModel(
        transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                vocab_size=100, max_position_embeddings=64)),
    "vit": lambda: transformers.ViTModel(
        transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                               image_size=16, patch_size=8, num_channels=3)),
}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name, make in HF_MODELS.items():
        torch.manual_seed(1)
        make().save_pretrained(root / name)
        out[name] = root / name
    return out


def _hf_reference(path: Path):
    cfg = transformers.AutoConfig.from_pretrained(path)
    cls = getattr(transformers, cfg.architectures[0])
    return cls.from_pretrained(path, use_cache=False).eval() if hasattr(cfg, "use_cache") else cls.from_pretrained(path).eval()


@pytest.mark.parametrize("name", ["gpt2", "bert", "vit"])
def test_convert_hf_roundtrip(hf_dirs, tmp_path, name):
    dst = tmp_path / "out"
    res = run("convert", hf_dirs[name], "-o", dst, "--streams", "2", "--no-progress")
    assert "residual sites" in res.output
    assert {p.name for p in dst.iterdir()} >= {"config.json", "mhc.json", "model.safetensors", "example_inputs.safetensors"}
    meta = json.loads((dst / "mhc.json").read_text())
    assert meta["source"] == "hf" and meta["mhc_config"]["streams"] == 2
    assert meta["rebuild"]["architecture"] == {"gpt2": "GPT2LMHeadModel", "bert": "BertModel", "vit": "ViTModel"}[name]
    expected_shape = [2, 3, 16, 16] if name == "vit" else [2, 16]
    assert meta["example_inputs"][0]["shape"] == expected_shape
    n_sites = len(meta["report"]["sites"])
    assert n_sites == 4  # 2 layers x (attention, MLP)
    weights = load_file(str(dst / "model.safetensors"))
    phis = [k for k in weights if k.endswith(".mhc.phi")]
    assert len(phis) == n_sites

    loaded = mhc_compile.load(dst)
    ref = _hf_reference(hf_dirs[name])
    ex = load_file(str(dst / "example_inputs.safetensors"))["arg.0"]
    for x in (ex, ex.flip(0)):
        with torch.no_grad():
            got, want = main_output(loaded(x)), main_output(ref(x))
        assert got.shape == want.shape
        assert rel_err(got, want) < 1e-5  # init="preserve": the original function
    # it is trainable: the mHC parameters get gradients
    params = dict(loaded.named_parameters())
    main_output(loaded(ex)).float().pow(2).mean().backward()
    assert params[phis[0]].grad is not None and params[phis[0]].grad.abs().sum() > 0


def test_hf_to_pt2_loads_in_a_fresh_process(hf_dirs, tmp_path):
    """ModelOutput classes must be registered before deserialising: load() imports them."""
    import subprocess

    dst = tmp_path / "g.pt2"
    run("convert", hf_dirs["gpt2"], "-o", dst, "--no-progress")
    ref = _hf_reference(hf_dirs["gpt2"])
    x = torch.randint(0, 100, (2, 16))
    torch.save(x, tmp_path / "x.pt")
    code = (
        "import torch, mhc_compile; m = mhc_compile.load(%r); x = torch.load(%r); "
        "torch.save(m(x).logits.detach(), %r)" % (str(dst), str(tmp_path / "x.pt"), str(tmp_path / "y.pt"))
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with torch.no_grad():
        assert rel_err(torch.load(tmp_path / "y.pt"), ref(x).logits) < 1e-5


def test_model_output_dataclass_roundtrip(user_module, tmp_path):
    x = user_module.example_inputs()[0]
    for dst in (tmp_path / "d", tmp_path / "m.pt2"):
        run("convert", "clitestmods:res_modeloutput", "-o", dst, "--no-progress")
        with torch.no_grad():
            out = mhc_compile.load(dst, trust_code=True)(x)
        assert out.last_hidden_state.shape == (3, 8, 7)


def test_inspect_hf_formats(hf_dirs, tmp_path):
    src = hf_dirs["gpt2"]
    text = run("inspect", src, "--streams", "4").output
    assert "residual sites (4)" in text
    assert "transformer.h.1.mlp" in text
    chain_line = [ln for ln in text.splitlines() if ln.startswith("chain 0:")]
    assert chain_line == ["chain 0: 4 sites (0 -> 1 -> 2 -> 3); the value of node dropout is expanded to n streams, "
                          "collapsed after node add_11"], chain_line
    assert "parameters added: 12,396 (40.4% of 30,720)" in text, text  # 4 x 3099 (see the JSON check below); 3 significant digits

    view = json.loads(run("inspect", src, "--format", "json").output)
    assert len(view["sites"]) == 4 and len(view["chains"]) == 1
    n_orig = sum(p.numel() for p in _hf_reference(src).parameters())
    per_site = 4 * 32 * (2 * 4 + 4 * 4) + 3 + 4 + 4 + 4 * 4  # phi nC x (2n+n^2), alpha 3, b_pre n, b_post n, b_res n^2
    assert view["params"]["original"] == n_orig
    assert view["params"]["added"] == 4 * per_site
    assert view["params"]["percent"] == pytest.approx(100 * 4 * per_site / n_orig)
    n, C = 4, 32
    assert view["sites"][0]["features"] == C
    assert view["sites"][0]["cost"] == site_cost(n, C, 4)
    assert view["cost_per_token"]["bytes"] == 4 * 4 * C * (4 * n + 2)
    assert view["cost_per_token"]["extra_bytes"] == 4 * 4 * C * (4 * n - 1)  # over the plain adds (read 2C, write C)
    assert view["cost_per_token"]["flops"] == 4 * (2 * n * C * (2 * n + n * n) + 2 * n * C + 2 * n * n * C + 2 * n * C)
    assert view["cost_per_token"]["projection_flops"] == 4 * 2 * n * C * (2 * n + n * n)
    assert sorted(s["home_stream"] for s in view["sites"]) == [0, 1, 2, 3]

    dot = run("inspect", src, "--format", "dot").output
    assert dot.startswith("digraph") and "cluster_0" in dot and "cluster_1" in dot
    assert "mhc.coeffs" in dot or "mhc.boundary" in dot  # mHC ops in the "after" graph
    assert "#ffd8a8" in dot  # residual adds highlighted in the "before" graph

    out = tmp_path / "report.html"
    run("inspect", src, "--format", "html", "-o", out)
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page and "chain 0" in page
    assert page.count("<tr>") >= 5  # header + 4 sites
    assert "<b>4</b>residual sites<" in page and "<b>1</b>chain<" in page and "<b>4</b>streams<" in page

    res = run("inspect", src, "--format", "svg", ok=False)
    from mhc_compile.cli.render import render_svg

    if render_svg("digraph { a -> b }") is None:
        assert res.exit_code == 1 and "Graphviz" in res.output and "Traceback" not in res.output
    else:
        assert res.exit_code == 0 and "<svg" in res.output


def test_inspect_format_follows_output_extension(user_module, tmp_path):
    run("inspect", "clitestmods:res", "-o", tmp_path / "r.html")
    assert (tmp_path / "r.html").read_text().startswith("<!DOCTYPE html>")
    run("inspect", "clitestmods:res", "-o", tmp_path / "r.json")
    assert len(json.loads((tmp_path / "r.json").read_text())["sites"]) == 2
    run("inspect", "clitestmods:res", "-o", tmp_path / "r.txt")
    assert (tmp_path / "r.txt").read_text().startswith("model: clitestmods:res (factory)")
    run("inspect", "clitestmods:res", "--format", "json", "-o", tmp_path / "forced.html")  # --format wins
    assert json.loads((tmp_path / "forced.html").read_text())["streams"] == 4


def test_inspect_without_graphviz(user_module, monkeypatch, tmp_path):
    import mhc_compile.cli.render as render

    monkeypatch.setattr(render.shutil, "which", lambda name: None)
    monkeypatch.setitem(sys.modules, "graphviz", None)  # the python package is absent too
    res = run("inspect", "clitestmods:res", "--format", "svg", "-o", tmp_path / "g.svg", ok=False)
    _error(res, 1, "clitestmods:res", "Graphviz", "apt install graphviz")
    assert not (tmp_path / "g.svg").exists()
    run("inspect", "clitestmods:res", "--format", "html", "-o", tmp_path / "r.html")
    page = (tmp_path / "r.html").read_text()
    assert "DOT source" in page and "digraph mhc" in page and "Graphviz" in page
    assert oct((tmp_path / "r.html").stat().st_mode & 0o777) != oct(0o600)  # not a private temp file


def test_progress_bar_stages(user_module, tmp_path):
    res = CliRunner().invoke(cli, ["convert", "clitestmods:res", "-o", str(tmp_path / "o"), "--progress"])
    assert res.exit_code == 0, res.output
    err = res.stderr if hasattr(res, "stderr") else res.output
    for stage in ("load", "capture", "rewrite", "save"):
        assert stage in err


def test_inspect_converted_directory(hf_dirs, tmp_path):
    dst = tmp_path / "bert-mhc"
    run("convert", hf_dirs["bert"], "-o", dst, "-c", "sinkhorn_iters=5", "--no-progress")
    view = json.loads(run("inspect", dst, "--format", "json").output)
    assert view["config"]["sinkhorn_iters"] == 5
    res = run("inspect", dst, "--streams", "2", "-o", tmp_path / "v.json")
    warns = [ln for ln in res.output.splitlines() if ln.startswith("mhc: warning: ")]
    assert len(warns) == 1 and "already converted (n=4)" in warns[0] and "ignored" in warns[0], res.output
    assert json.loads((tmp_path / "v.json").read_text())["streams"] == 4
    assert len(view["sites"]) == 4
    assert "(converted)" in view["source"]


def test_dynamic_dims_read_s0_s1_everywhere_json_keeps_raw_shapes():
    """The capture's dynamic-size symbols (s95, s75, ...) read s0, s1, ... in order of first
    appearance, the same in find_residuals' table, the inspect text/HTML and the reasons of the
    adds not taken; the JSON keeps the raw shapes."""
    from mhc_compile import MHCConfig
    from mhc_compile.cli import render as rp
    from mhc_compile.models import TinyGPT
    from mhc_compile.report import shape_text

    assert shape_text(["2*s95", "s7", "64"], {"s95": "s0", "s7": "s1"}) == "2*s0×s1×64"
    assert shape_text([2, 16, 64]) == "2×16×64"
    model = TinyGPT(dim=16, layers=1, heads=2).eval()
    rep = mhc_compile.find_residuals(model, (torch.randint(0, 256, (2, 8)),))
    raw = list(rep.sites[0].shape)
    assert raw[2] == "16" and raw[0] != raw[1] and all(d.startswith("s") for d in raw[:2]), raw
    table = rep.to_table()
    assert table.count("s0×s1×16") == 2 and "shapes differ: (s0, s1, 16) vs (s1, 16)" in table, table
    view = rp.build_view(rep, MHCConfig(streams=4), model)
    text = rp.to_text(view)
    assert text.count("s0×s1×16") == 2 and "(s0, s1, 16) vs (s1, 16)" in text and "*" not in text, text
    assert "(s0, s1: dynamic sizes" in text
    html_out = rp.to_html(view, svg=rp.chain_svg(view))
    assert "<td>s0×s1×16</td>" in html_out and "shape s0×s1×16" in html_out
    assert json.loads(rp.to_json(view))["sites"][0]["shape"] == raw
    assert json.loads(rep.to_json())["sites"][0]["shape"] == raw


# ------------------------------------------------------------------------------ other sources
MODULE_SRC = textwrap.dedent(
    """
    import torch
    from torch import nn

    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 16)
            self.a = nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 16), nn.GELU())
            self.b = nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 16))
            self.head = nn.Linear(16, 7)

        def forward(self, idx):
            x = self.emb(idx)
            x = x + self.a(x)
            x = x + self.b(x)
            return self.head(x)

    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.f = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))

        def forward(self, x):
            return self.f(x)

    def res():
        return Res()

    class ResOut(Res):
        def forward(self, idx):
            from transformers.modeling_outputs import BaseModelOutput

            return BaseModelOutput(last_hidden_state=super().forward(idx))

    def res_modeloutput():
        return ResOut()

    def plain():
        return Plain()

    class Branchy(Res):
        def forward(self, idx):
            y = super().forward(idx)
            return y * 2 if y.sum() > 0 else y  # data-dependent control flow: torch.export refuses

    def branchy():
        return Branchy()

    def example_inputs():
        return (torch.randint(0, 50, (3, 8)),)
    """
)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A user package on sys.path: ``clitestmods.res`` / ``.plain`` / ``.example_inputs``."""
    import importlib
    import sys

    (tmp_path / "clitestmods.py").write_text(MODULE_SRC)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    sys.modules.pop("clitestmods", None)
    mod = importlib.import_module("clitestmods")
    yield mod
    sys.modules.pop("clitestmods", None)


def test_convert_factory_with_state_dict(user_module, tmp_path):
    torch.manual_seed(3)
    model = user_module.res().eval()
    torch.save(model.state_dict(), tmp_path / "w.pt")
    dst = tmp_path / "fac"
    run("convert", "clitestmods:res", "--state-dict", tmp_path / "w.pt", "--input-shape", "2x8",
        "--input-dtype", "long", "-o", dst, "--no-progress")
    meta = json.loads((dst / "mhc.json").read_text())
    assert meta["source"] == "factory" and meta["rebuild"]["factory"] == "clitestmods:res"
    assert meta["example_inputs"] == [{"name": "arg0", "shape": [2, 8], "dtype": "int64"}]
    loaded = mhc_compile.load(dst, trust_code=True)
    x = torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        assert rel_err(loaded(x), model(x)) < 1e-5  # the state_dict's weights, not the factory's init
        assert rel_err(user_module.res()(x), model(x)) > 1e-2


def test_convert_factory_example_inputs_and_safetensors(user_module, tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(4)
    model = user_module.res().eval()
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    dst = tmp_path / "fac2"
    run("convert", "clitestmods:res", "--state-dict", tmp_path / "w.safetensors", "-o", dst, "-n", "3", "--no-progress")
    meta = json.loads((dst / "mhc.json").read_text())
    assert meta["example_inputs"][0]["shape"] == [3, 8]  # from clitestmods.example_inputs()
    loaded = mhc_compile.load(dst, trust_code=True)
    x = user_module.example_inputs()[0]
    with torch.no_grad():
        assert rel_err(loaded(x), model(x)) < 1e-5


def test_convert_export_program(user_module, tmp_path):
    torch.manual_seed(5)
    model = user_module.res().eval()
    x = user_module.example_inputs()[0]
    torch.export.save(torch.export.export(model, (x,)), str(tmp_path / "m.pt2"))
    dst = tmp_path / "m-mhc.pt2"
    run("convert", tmp_path / "m.pt2", "-o", dst, "-c", "sinkhorn_iters=7", "--no-progress")
    loaded = mhc_compile.load(dst)
    with torch.no_grad():
        assert rel_err(loaded(x), model(x)) < 1e-5
    names = [k for k, _ in loaded.named_parameters()]
    assert sum(k.endswith(".mhc.phi") for k in names) == 2
    # inspect on the original program: the same two sites, nothing written
    view = json.loads(run("inspect", tmp_path / "m.pt2", "--format", "json").output)
    assert len(view["sites"]) == 2 and view["source"].endswith("(export)")
    assert [s["module"] for s in view["sites"]] == ["a", "b"]
    # inspect reads the mhc.json carried inside the converted program
    view = json.loads(run("inspect", dst, "--format", "json").output)
    assert len(view["sites"]) == 2 and view["config"]["sinkhorn_iters"] == 7
    n_orig = sum(p.numel() for p in model.parameters())
    assert view["params"]["original"] == n_orig
    assert view["params"]["added"] == sum(p.numel() for p in loaded.parameters()) - n_orig > 0
    # and a directory output of the same program round-trips too
    run("convert", tmp_path / "m.pt2", "-o", tmp_path / "m-dir", "--no-progress")
    with torch.no_grad():
        assert rel_err(mhc_compile.load(tmp_path / "m-dir")(x), model(x)) < 1e-5


def test_convert_pickled_module_needs_trust(user_module, tmp_path):
    torch.manual_seed(6)
    model = user_module.res().eval()
    torch.save(model, tmp_path / "whole.pt")
    dst = tmp_path / "pk"
    res = run("convert", tmp_path / "whole.pt", "-o", dst, "--input-shape", "2x8", "--input-dtype", "long", ok=False)
    assert res.exit_code == 1 and "--trust-pickle" in res.output and "runs" in res.output
    assert not dst.exists()
    res = run("inspect", tmp_path / "whole.pt", "--input-shape", "2x8", "--input-dtype", "long", ok=False)
    assert res.exit_code == 1 and "--trust-pickle" in res.output
    view = json.loads(run("inspect", tmp_path / "whole.pt", "--input-shape", "2x8", "--input-dtype", "long",
                          "--trust-pickle", "--format", "json").output)
    assert len(view["sites"]) == 2 and view["source"].endswith("(pickle)")
    run("convert", tmp_path / "whole.pt", "-o", dst, "--input-shape", "2x8", "--input-dtype", "long",
        "--trust-pickle", "--no-progress")
    with pytest.raises(MHCIOError, match="trust_pickle"):
        mhc_compile.load(dst)
    loaded = mhc_compile.load(dst, trust_pickle=True)
    x = torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        assert rel_err(loaded(x), model(x)) < 1e-5


# -------------------------------------------------------------------------------------- errors
def _error(res, code, *words):
    assert res.exit_code == code, (res.exit_code, res.output)
    assert "Traceback" not in res.output
    lines = [ln for ln in res.output.strip().splitlines() if ln.startswith("mhc: error") or ln.startswith("Error")]
    assert len(lines) == 1, res.output  # one error line ...
    others = [ln for ln in res.output.strip().splitlines()
              if ln.strip() and not ln.startswith(("mhc: error", "mhc: warning: ", "Usage: ", "Try '", "Error: "))]
    assert not others, res.output  # ... and nothing else but one-line warnings (or click's usage lines)
    for w in words:
        assert w in res.output, (w, res.output)


def test_error_missing_file(tmp_path):
    missing = tmp_path / "nope.pt2"
    _error(run("convert", missing, "-o", tmp_path / "o", ok=False), 2, str(missing), "no such file")
    _error(run("inspect", missing, ok=False), 2, str(missing))


def test_error_corrupt_files(tmp_path):
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(b"this is not a zip archive")
    _error(run("convert", bad, "-o", tmp_path / "o.pt2", ok=False), 1, str(bad), "torch.export")
    bad_pt = tmp_path / "bad.pt"
    bad_pt.write_bytes(b"\x00garbage" * 10)
    _error(run("convert", bad_pt, "-o", tmp_path / "o", "--input-shape", "2x4", ok=False), 1, str(bad_pt))
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{not json")
    _error(run("convert", hf, "-o", tmp_path / "o", ok=False), 1, "config.json")
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.pt2").exists()


def test_error_directory_without_config(tmp_path):
    d = tmp_path / "empty_model"
    d.mkdir()
    (d / "weights.bin").write_bytes(b"x")
    _error(run("convert", d, "-o", tmp_path / "o", ok=False), 1, str(d), "config.json")


def test_error_no_residuals(user_module, tmp_path):
    dst = tmp_path / "o"
    _error(run("convert", "clitestmods:plain", "--input-shape", "2x8", "-o", dst, ok=False), 1,
           "clitestmods:plain", "no residual")
    assert not dst.exists()
    text = run("inspect", "clitestmods:plain", "--input-shape", "2x8").output  # inspect still reports
    assert "none found" in text


def test_error_capture_failure_is_one_line(user_module, tmp_path):
    """torch.export prints the partial graph and logs tracebacks when it fails: hidden without
    --debug; the one error line names the factory and says what to try."""
    res = run("convert", "clitestmods:branchy", "-o", tmp_path / "o", "--no-progress", ok=False)
    _error(res, 1, "clitestmods:branchy: ", "could not capture Branchy", "What to try")
    assert "def forward" not in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert not (tmp_path / "o").exists()
    res = run("inspect", "clitestmods:branchy", ok=False)
    _error(res, 1, "clitestmods:branchy: ", "could not capture Branchy")
    res = run("--debug", "convert", "clitestmods:branchy", "-o", tmp_path / "o", ok=False)
    assert type(res.exception).__name__ == "MHCCaptureError"


def test_warnings_are_one_line_each(user_module, tmp_path):
    """A warning raised by both the capture and the rewrite shows once, as one line."""
    res = run("convert", "clitestmods:res", "--input-shape", "1x8", "--input-dtype", "long", "-o", tmp_path / "o",
              "--no-progress")
    warns = [ln for ln in res.output.splitlines() if ln.startswith("mhc: warning: ")]
    assert len(warns) == 1 and "batch size 1" in warns[0], res.output
    assert "UserWarning" not in res.output and "warnings.warn" not in res.output
    assert "mhc_compile: " not in res.output
    assert len(res.output.strip().splitlines()) == 2, res.output  # the warning and the result line


def test_error_unwritable_output(user_module, tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    dst = blocker / "out"  # parent is a file: cannot be created, even as root
    _error(run("convert", "clitestmods:res", "-o", dst, "--no-progress", ok=False), 1, str(dst), "cannot write")
    # a non-empty directory that is not an mhc output is never replaced
    other = tmp_path / "precious"
    other.mkdir()
    (other / "keep.txt").write_text("keep")
    _error(run("convert", "clitestmods:res", "-o", other, "--no-progress", ok=False), 1, "refusing")
    assert (other / "keep.txt").read_text() == "keep"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_error_usage(user_module, tmp_path):
    _error(run("convert", "clitestmods:res", "-o", tmp_path / "o", "-c", "streams=99", ok=False), 2, "streams")
    _error(run("convert", "clitestmods:res", "-o", tmp_path / "o", "-c", "bogus=1", ok=False), 2, "bogus")
    _error(run("convert", "clitestmods:res", "-o", tmp_path / "o", "-c", "novalue", ok=False), 2, "key=value")
    _error(run("convert", "clitestmods:res", "-o", tmp_path / "o", "--input-shape", "2xq", ok=False), 2, "2xq")
    assert run("convert", "clitestmods:res", ok=False).exit_code == 2  # -o missing (click usage error)
    assert run("inspect", "clitestmods:res", "--format", "pdf", ok=False).exit_code == 2
    for bad in (["demo", "--steps", "0"], ["demo", "--threads", "-1"], ["inspect", "x", "--batch-size", "0"],
                ["inspect", "x", "--seq-len", "-2"]):
        res = run(*bad, ok=False)
        assert res.exit_code == 2 and "is not in the range" in res.output and "IndexError" not in res.output, res.output


def test_debug_shows_traceback(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    res = run("--debug", "convert", d, "-o", tmp_path / "o", ok=False)
    assert isinstance(res.exception, MHCIOError)
    res = run("convert", d, "-o", tmp_path / "o", "--debug", ok=False)
    assert isinstance(res.exception, MHCIOError)


def test_error_wrong_kind_of_file(user_module, tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "w.safetensors"))
    _error(run("convert", tmp_path / "w.safetensors", "-o", tmp_path / "o", ok=False), 1, "--state-dict")
    torch.save({"w": torch.zeros(2)}, tmp_path / "sd.pt")
    _error(run("convert", tmp_path / "sd.pt", "-o", tmp_path / "o", ok=False), 1, "state_dict")
    run("convert", "clitestmods:res", "-o", tmp_path / "done", "--no-progress")
    _error(run("convert", tmp_path / "done", "-o", tmp_path / "again", ok=False), 2, "already an mhc output")


def test_overwrite_previous_output(user_module, tmp_path):
    dst = tmp_path / "o"
    run("convert", "clitestmods:res", "-o", dst, "-n", "2", "--no-progress")
    run("convert", "clitestmods:res", "-o", dst, "-n", "3", "--no-progress")
    assert json.loads((dst / "mhc.json").read_text())["mhc_config"]["streams"] == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------------------------------- demo
def test_demo_runs_and_reports_gains():
    res = run("demo", "--steps", "4")
    out = res.output
    assert "residual sites (8)" in out
    err = float(out.split("max relative error ")[1].split()[0])
    assert err < 1e-5
    losses = [float(line.split("loss")[1]) for line in out.splitlines() if line.strip().startswith("step")]
    assert len(losses) >= 2 and all(l == l for l in losses)
    assert losses[-1] < losses[0] - 0.5, losses  # it trains (5.85 -> ~4.5 in 4 steps)
    gains = [line for line in out.splitlines() if "forward gain" in line]
    assert len(gains) == 1
    fwd = float(gains[0].split("forward gain ")[1].split(",")[0])
    bwd = float(gains[0].split("backward gain ")[1])
    assert abs(fwd - 1) < 1e-3 and abs(bwd - 1) < 0.1  # doubly stochastic H_res: no amplification


def test_top_level_help_lists_commands_untruncated():
    text = run("--help").output
    commands = text.split("Commands:")[1]
    assert "..." not in commands, commands
    for name in ("convert", "demo", "inspect"):
        assert f"  {name} " in commands


def test_help_documents_sources():
    text = run("convert", "--help").output
    for word in ("save_pretrained", ".pt2", "package.module:function", "--trust-pickle", "example_inputs()", "--input-shape"):
        assert word in text


def test_chain_diagram_labels_shorten_at_dots():
    """Long module paths in the HTML chain diagram keep their last components after an ellipsis
    (they used to lose their first characters: "ansformer.h.0.attn")."""
    from mhc_compile.cli import render as rp

    assert rp._short_label("blocks.0.attn", 17) == "blocks.0.attn"
    assert rp._short_label("transformer.h.0.attn", 17) == "…h.0.attn"
    assert rp._short_label("encoder.layer.11.attention.output", 17) == "…attention.output"
    assert rp._short_label("x" * 30, 17) == "…" + "x" * 16
    view = {"streams": 2, "chains": [{"index": 0, "sites": [0, 1]}], "sites": [
        {"index": 0, "site": "add_4", "module": "transformer.h.0.attn", "home_stream": 0, "shape": [2, 16, 32]},
        {"index": 1, "site": "add_7", "module": "transformer.h.0.mlp", "home_stream": 1, "shape": [2, 16, 32]}],
        "rejected": []}
    svg = rp.chain_svg(view)
    assert ">0: …h.0.attn<" in svg and ">1: …h.0.mlp<" in svg
    assert "ansformer" not in svg.replace("transformer", "")  # the full path stays in the tooltip only
    assert svg.count("<title>add_4 transformer.h.0.attn shape 2×16×32 home stream 0</title>") == 1


def test_dot_labels_hide_torch_placeholder_module():
    """Nodes torch.export tags with its "no module" key get no module line in the DOT labels."""
    from mhc_compile.cli import render as rp

    g = torch.fx.Graph()
    x = g.placeholder("x")
    a = g.call_function(torch.ops.aten.sin.default, (x,))
    a.meta["nn_module_stack"] = {"_empty_nn_module_stack_from_metadata_hook": ("_empty_nn_module_stack_from_metadata_hook", object)}
    b = g.call_function(torch.ops.aten.cos.default, (a,))
    b.meta["nn_module_stack"] = {"L__self___blocks_0": ("L['self'].blocks.0", object)}
    g.output(b)
    dot = rp.graph_to_dot([("before", g)])
    assert "_empty_nn_module_stack" not in dot
    assert 'label="sin"' in dot and 'label="cos\\nblocks.0"' in dot


def test_error_corrupt_hf_weights_names_the_file(hf_dirs, tmp_path):
    broken = tmp_path / "gpt2_broken"
    shutil.copytree(hf_dirs["gpt2"], broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated download
    _error(run("convert", broken, "-o", tmp_path / "o", ok=False), 1, str(weights), "safetensors")
    assert not (tmp_path / "o").exists()


def _count_captures(monkeypatch) -> list:
    """Count the calls of mhc_compile.pipeline.capture (the torch.export capture)."""
    import importlib

    convert_mod = importlib.import_module("mhc_compile.pipeline")  # the one pipeline: its capture
    calls = []
    real = convert_mod.capture

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(convert_mod, "capture", counting)
    return calls


def test_convert_captures_the_model_once(user_module, tmp_path, monkeypatch):
    """mhc convert takes the report from the rewrite: the model is captured once, and the report
    stored in mhc.json is the report of that rewrite."""
    calls = _count_captures(monkeypatch)
    dst = tmp_path / "o"
    res = run("convert", "clitestmods:res", "-o", dst, "--no-progress")
    assert len(calls) == 1, f"mhc convert captured the model {len(calls)} times"
    assert "2 residual sites" in res.output
    stored = mhc_compile.ResidualReport.from_dict(json.loads((dst / "mhc.json").read_text())["report"])
    assert stored.num_sites == 2 and stored.rewritten
    calls.clear()
    _error(run("convert", "clitestmods:plain", "--input-shape", "2x8", "-o", tmp_path / "p", ok=False), 1,
           "clitestmods:plain", "no residual")
    assert len(calls) == 1


@pytest.mark.parametrize("fmt", ["text", "dot"])
def test_inspect_captures_the_model_once(user_module, tmp_path, monkeypatch, fmt):
    """inspect: the report, the converted model and the graph before the rewrite all come from one
    capture, for a source and for a converted directory (whose read rebuilds and converts)."""
    run("convert", "clitestmods:res", "-o", tmp_path / "o", "--no-progress")
    calls = _count_captures(monkeypatch)
    text = run("inspect", "clitestmods:res", "--format", fmt).output
    assert len(calls) == 1, f"mhc inspect captured the model {len(calls)} times"
    calls.clear()
    again = run("inspect", tmp_path / "o", "--format", fmt, "--trust-code").output
    assert len(calls) == 1, f"mhc inspect of a converted directory captured {len(calls)} times"
    if fmt == "dot":
        assert text.count("subgraph") == again.count("subgraph") >= 2  # before and after
