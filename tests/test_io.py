"""Tests of mhc_compile.io: save_converted / load round trips with trained (non-initial) mHC
parameters, tied weights, atomic writes, example inputs, and load's errors."""
from __future__ import annotations

import importlib
import json
import os
import sys
import tempfile
import textwrap

import pytest
import torch
from torch import nn

import mhc_compile
from mhc_compile import MHCConfig
from mhc_compile.io import (
    MHCIOError,
    Source,
    atomic_path,
    dedup_state_dict,
    hf_example_inputs,
    read_source,
    save_converted,
)
from mhc_compile.pipeline import convert_source
from tests._convert_checks import one_thread  # noqa: F401 (autouse fixture)

MODULE_SRC = textwrap.dedent(
    """
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(40, 16)
            self.blocks = nn.ModuleList(
                nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)) for _ in range(3))
            self.head = nn.Linear(16, 40, bias=False)
            self.head.weight = self.emb.weight  # tied, like GPT-2's lm_head

        def forward(self, idx):
            x = self.emb(idx)
            for b in self.blocks:
                x = x + b(x)
            return self.head(x)

    def net():
        torch.manual_seed(11)
        return Net()

    def example_inputs():
        return (torch.randint(0, 40, (2, 12), generator=torch.Generator().manual_seed(0)),)
    """
)


@pytest.fixture
def iomod(tmp_path, monkeypatch):
    (tmp_path / "iotestmods.py").write_text(MODULE_SRC)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("iotestmods", None)
    yield importlib.import_module("iotestmods")
    sys.modules.pop("iotestmods", None)


def _perturb_mhc(model: nn.Module) -> int:
    """Move every mHC parameter away from its initial value (as training would)."""
    g = torch.Generator().manual_seed(123)
    count = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".mhc" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
                count += 1
    return count


@pytest.mark.parametrize("suffix", ["", ".pt2"])
def test_roundtrip_trained_mhc_parameters(iomod, tmp_path, suffix):
    source = read_source("iotestmods:net")
    assert source.kind == "factory" and source.args[0].shape == (2, 12)
    config = MHCConfig(streams=3, sinkhorn_iters=8)
    converted = convert_source(source, config)
    assert _perturb_mhc(converted) == 3 * 5  # phi, alpha, b_pre, b_post, b_res per site
    x = iomod.example_inputs()[0]
    with torch.no_grad():
        want = converted(x)
        original = source.model(x)
    assert (want - original).abs().max() > 1e-3  # the perturbation changes the function

    dst = tmp_path / f"out{suffix}"
    save_converted(converted, str(dst), source, config, report=converted.mhc_report.to_dict())
    loaded = mhc_compile.load(dst, trust_code=True)  # a factory's directory: its module is imported
    with torch.no_grad():
        got = loaded(x)
    assert (got - want).abs().max() <= 1e-6
    sd_l, sd_c = loaded.state_dict(), converted.state_dict()
    assert set(sd_l) == set(sd_c)
    for k in sd_c:
        assert torch.equal(sd_l[k], sd_c[k]), k
    if not suffix:
        meta = json.loads((dst / "mhc.json").read_text())
        assert meta["mhc_config"] == config.to_dict()
        assert meta["tied"] == {"head.weight": "emb.weight"}
        assert meta["report"]["num_sites"] == 3
        # tied weights are still one tensor after loading, so training keeps them tied
        assert loaded.get_parameter("head.weight") is loaded.get_parameter("emb.weight")


def test_loaded_model_trains(iomod, tmp_path):
    source = read_source("iotestmods:net")
    config = MHCConfig(streams=2)
    save_converted(convert_source(source, config), str(tmp_path / "o"), source, config)
    model = mhc_compile.load(tmp_path / "o", trust_code=True)
    x = iomod.example_inputs()[0]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = nn.functional.cross_entropy(model(x).reshape(-1, 40), x.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    phi = dict(model.named_parameters())["blocks.0.mhc.phi"]
    assert phi.abs().max() > 0  # phi starts at 0 and has been trained


def test_dedup_state_dict_ties():
    a = nn.Linear(4, 4)
    b = nn.Linear(4, 4)
    b.weight = a.weight
    sd = {"a.weight": a.weight, "a.bias": a.bias, "b.weight": b.weight, "b.bias": b.bias,
          "view": a.weight[1:]}
    out, tied = dedup_state_dict(sd)
    assert tied == {"b.weight": "a.weight"}
    assert set(out) == {"a.weight", "a.bias", "b.bias", "view"}
    assert out["view"].data_ptr() != out["a.weight"].data_ptr()  # safetensors needs separate memory
    assert torch.equal(out["view"], a.weight[1:])


def test_atomic_path_failure_leaves_nothing(tmp_path):
    dst = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(dst, is_dir=True) as tmp:
            (tmp / "partial").write_text("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    # an existing output survives a failed overwrite untouched
    dst.mkdir()
    (dst / "mhc.json").write_text("{}")
    with pytest.raises(RuntimeError):
        with atomic_path(dst, is_dir=True) as tmp:
            raise RuntimeError("boom")
    assert (dst / "mhc.json").read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    f = tmp_path / "x.pt2"
    with atomic_path(f, is_dir=False) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".pt2"
        tmp.write_text("done")
    assert f.read_text() == "done"


def test_atomic_path_unwritable_parent_names_it(tmp_path, monkeypatch):
    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkdtemp", denied)
    monkeypatch.setattr(tempfile, "mkstemp", denied)
    for is_dir in (True, False):
        with pytest.raises(MHCIOError) as err:
            with atomic_path(tmp_path / "out", is_dir=is_dir):
                pass
        assert str(err.value) == f"{tmp_path / 'out'}: cannot write in {tmp_path}: Permission denied"


def test_load_errors(tmp_path):
    with pytest.raises(MHCIOError, match="no such file"):
        mhc_compile.load(tmp_path / "missing")
    (tmp_path / "d").mkdir()
    with pytest.raises(MHCIOError, match="mhc.json"):
        mhc_compile.load(tmp_path / "d")
    (tmp_path / "w.bin").write_bytes(b"1")
    with pytest.raises(MHCIOError, match="not an mhc output"):
        mhc_compile.load(tmp_path / "w.bin")
    (tmp_path / "d" / "mhc.json").write_text('{"hello": 1}')
    with pytest.raises(MHCIOError, match="missing 'source'"):
        mhc_compile.load(tmp_path / "d")


def test_hf_example_inputs():
    from types import SimpleNamespace as NS

    (px,), kw = hf_example_inputs(NS(image_size=24, num_channels=1), batch_size=3)
    assert px.shape == (3, 1, 24, 24) and px.dtype == torch.float32 and not kw
    (ids,), kw = hf_example_inputs(NS(vocab_size=7, max_position_embeddings=10), seq_len=16)
    assert ids.shape == (2, 10) and ids.max() < 7 and ids.dtype == torch.long
    (ids,), kw = hf_example_inputs(NS(vocab_size=7, is_encoder_decoder=True))
    assert kw["decoder_input_ids"].shape == (2, 16)
    with pytest.raises(MHCIOError, match="neither vocab_size"):
        hf_example_inputs(NS(model_type="weird"))


def test_encoder_decoder_roundtrip(tmp_path):
    """T5: decoder_input_ids is passed by keyword, as the model is called (no positions padded with None)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.T5Config(d_model=32, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=2, d_kv=16,
                                vocab_size=50, decoder_start_token_id=0)
    transformers.T5ForConditionalGeneration(cfg).save_pretrained(tmp_path / "t5")
    source = read_source(str(tmp_path / "t5"))
    assert len(source.args) == 1 and source.kwargs["decoder_input_ids"].shape == (2, 16)
    config = MHCConfig(streams=2)
    converted = convert_source(source, config)
    _perturb_mhc(converted)
    save_converted(converted, str(tmp_path / "o"), source, config)
    loaded = mhc_compile.load(tmp_path / "o")
    with torch.no_grad():
        want = converted(*source.args, **source.kwargs).logits
        got = loaded(*source.args, **source.kwargs).logits
        ref = source.model(*source.args, **source.kwargs).logits
    assert (got - want).abs().max() <= 1e-6
    assert (want - ref).abs().max() > 1e-4


def test_loaded_hf_directory_switches_train_eval_and_finetunes(tmp_path):
    """An HF output directory loads as a module with a working train/eval switch: eval mode is
    deterministic and matches the converted model, train mode turns GPT-2's dropout on, and
    fine-tuning in train mode lowers the loss."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64)  # dropout 0.1
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2")
    source = read_source(str(tmp_path / "gpt2"))
    config = MHCConfig(streams=2)
    converted = convert_source(source, config)
    save_converted(converted, str(tmp_path / "o"), source, config)
    model = mhc_compile.load(tmp_path / "o")
    x = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))

    assert model.eval() is model and not any(m.training for m in model.modules())
    with torch.no_grad():
        first = model(x).logits
        assert torch.equal(model(x).logits, first)
        assert (first - converted.eval()(x).logits).abs().max() <= 1e-6

    assert model.train() is model and all(m.training for m in model.modules())
    with torch.no_grad():
        assert (model(x).logits - model(x).logits).abs().max() > 1e-3  # dropout is on
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        logits = model(x).logits
        loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 100), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses

    model.eval()
    with torch.no_grad():
        after = model(x).logits
        assert torch.equal(model(x).logits, after)
    assert (after - first).abs().max() > 1e-2  # the fine-tuned weights are in use


# ------------------------------------------------------------------------------- the registry
def test_every_source_kind_has_all_four_entries():
    from mhc_compile.io import SourceKind, source_kinds

    kinds = source_kinds()
    assert [k.name for k in kinds] == ["converted", "hf", "export", "pickle", "factory"]
    for kind in kinds:
        assert isinstance(kind, SourceKind)
        for entry in ("detect", "read", "save_extras", "rebuild"):
            assert callable(getattr(kind, entry)), (kind.name, entry)
    assert {k.name for k in kinds if k.takes_state_dict} == {"factory", "pickle"}


def test_unknown_source_kind_is_a_clear_error(tmp_path):
    from mhc_compile.io import get_source_kind, register_source_kind

    with pytest.raises(MHCIOError, match=r"unknown source kind 'onnx' \(known: converted, hf, export, pickle, factory\)"):
        get_source_kind("onnx")
    with pytest.raises(ValueError, match="already registered"):
        register_source_kind(get_source_kind("hf"))
    # an output whose mhc.json names a kind this version does not know
    out = tmp_path / "o"
    out.mkdir()
    (out / "mhc.json").write_text(json.dumps({"source": "onnx", "mhc_config": {}, "format_version": 1}))
    with pytest.raises(MHCIOError, match=r"o/mhc.json: unknown source kind 'onnx'"):
        mhc_compile.load(out)


def test_detect_dispatches_through_the_registry(tmp_path, monkeypatch):
    from mhc_compile.io import SourceKind, detect_kind, register_source_kind, registry

    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.json").write_text("{}")
    (tmp_path / "out" / "mhc.json").write_text("{}")
    (tmp_path / "m.pt").write_bytes(b"x")
    assert detect_kind(str(tmp_path / "hf")) == "hf"
    assert detect_kind(str(tmp_path / "out")) == "converted"  # a converted hf directory
    assert detect_kind(str(tmp_path / "m.pt")) == "pickle"
    assert detect_kind("some.pkg:make") == "factory"
    with pytest.raises(MHCIOError, match="no such file"):
        detect_kind(str(tmp_path / "missing"))

    # a kind registered from outside is detected, read and saved through its entries
    monkeypatch.setattr(registry, "_KINDS", dict(registry._KINDS))
    seen = []
    model = nn.Sequential(nn.Linear(4, 4))

    def read(src, options):
        seen.append(("read", src, options.seq_len))
        return Source("toy", src, model, (torch.zeros(2, 4),))

    def save_extras(source, directory):
        seen.append(("save", source.path))
        (directory / "toy.txt").write_text("rebuild me")

    register_source_kind(SourceKind("toy", lambda src: src.startswith("toy://"), read, save_extras,
                                    lambda directory, meta, trust: model), before="factory")
    assert [k.name for k in registry.source_kinds()][-2:] == ["toy", "factory"]
    assert detect_kind("toy://a") == "toy"
    assert detect_kind("some.pkg:make") == "factory"
    source = read_source("toy://a", seq_len=5)
    assert seen == [("read", "toy://a", 5)] and source.kind == "toy"
    with pytest.raises(MHCIOError, match="--state-dict only applies"):
        read_source("toy://a", state_dict="w.pt")
    dst = tmp_path / "toy-out"
    save_converted(model, str(dst), source, MHCConfig(streams=2))
    assert seen[-1] == ("save", "toy://a") and (dst / "toy.txt").read_text() == "rebuild me"
    assert json.loads((dst / "mhc.json").read_text())["source"] == "toy"


def test_io_dispatches_no_kind_by_name():
    """Every place that differs by source kind goes through the registry: no module of
    mhc_compile.io compares a kind to a kind name."""
    import pathlib
    import re

    import mhc_compile.io as io_pkg

    names = "|".join(["hf", "export", "factory", "pickle", "converted"])
    pattern = re.compile(rf"""(kind|\["source"\]|\.get\("source"\))\s*(==|!=|in)\s*\(?["']({names})["']""")
    root = pathlib.Path(io_pkg.__file__).parent
    hits = [f"{p.relative_to(root)}:{i}: {line.strip()}" for p in root.rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line.split("#")[0])]
    assert not hits, hits


# ------------------------------------------------------------------------------ atomic writes
def test_atomic_write_text_crash_leaves_the_old_file(tmp_path):
    """An error mid-write leaves neither a partial file nor a temporary one, and the old file as it was."""
    from mhc_compile.io import atomic_write_text

    f = tmp_path / "report.json"
    atomic_write_text(f, "old")
    assert f.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["report.json"]
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_path(f, is_dir=False) as tmp:
            tmp.write_text("half of the new")
            raise RuntimeError("crash")
    assert f.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]
    atomic_write_text(f, "new")
    assert f.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_atomic_write_killed_process_leaves_the_old_file(tmp_path):
    """A process killed mid-write (no cleanup runs) leaves the destination untouched: the partial
    data is only ever in a hidden temporary file next to it."""
    import subprocess

    f = tmp_path / "out.txt"
    f.write_text("old")
    code = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from mhc_compile.io import atomic_path\n"
        f"with atomic_path(Path({str(f)!r}), is_dir=False) as tmp:\n"
        "    tmp.write_text('partial')\n"
        "    os._exit(9)\n"
    )
    root = os.path.dirname(os.path.dirname(mhc_compile.__file__))
    proc = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), env={**os.environ, "PYTHONPATH": root})
    assert proc.returncode == 9
    assert f.read_text() == "old"
    assert all(p.name.startswith(".out.txt.") for p in tmp_path.iterdir() if p != f)
