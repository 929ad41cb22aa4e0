"""Saved Hugging Face models (issue #23): ``mhc inspect`` on every directory ``mhc convert`` and
``save_pretrained`` write, decoders with their default config (``use_cache=True``) included.
Tiny configs built in the test (random weights, nothing downloaded)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

transformers = pytest.importorskip("transformers")

import mhc_compile  # noqa: E402
from mhc_compile import MHCConfig  # noqa: E402
from mhc_compile.cli.main import cli  # noqa: E402
from tests._convert_checks import one_thread  # noqa: E402, F401 (autouse fixture)
from tests.models.hf import VOCAB, default_gpt2, default_llama  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")
DECODERS = {"gpt2": default_gpt2, "llama": default_llama}


def run(*args, ok=True):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, (result.output, result.exception)
    return result


@pytest.mark.parametrize("name", list(DECODERS))
def test_inspect_converted_decoder_directories_every_format(name, tmp_path):
    """`mhc convert hf -o out && mhc inspect out` (the README's flow) and `save_pretrained` of a
    converted model, then inspect (every format for the first; the second differs in how it was
    written, not in how it is inspected); the sites are the ones convert reported."""
    torch.manual_seed(0)
    model = DECODERS[name]().eval()
    assert model.config.use_cache is True  # the default config, as users have it
    model.save_pretrained(str(tmp_path / "hf"))
    run("convert", tmp_path / "hf", "-o", tmp_path / "cli-out", "--no-progress")
    cm = mhc_compile.convert(model, MHCConfig(streams=4), (torch.randint(3, VOCAB, (2, 7)),))
    cm.save_pretrained(str(tmp_path / "saved"))
    formats = ["text", "json", "dot", "html"] + (["svg"] if shutil.which("dot") else [])
    for out, fmts in (("cli-out", formats), ("saved", ["json"])):  # every format reads the same rebuild
        stored = json.loads((tmp_path / out / "mhc.json").read_text())["report"]
        for fmt in fmts:
            text = run("inspect", tmp_path / out, "--format", fmt).output
            if fmt == "json":
                view = json.loads(text)
                assert len(view["sites"]) == len(stored["sites"]) == 4, view["sites"]
                assert view["source"].endswith("(converted)")
            elif fmt == "dot":
                assert text.count("subgraph") >= 2  # before and after
            elif fmt == "text":
                assert "residual sites (4)" in text, text
