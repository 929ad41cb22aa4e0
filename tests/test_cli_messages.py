"""What the CLI and ``mhc_compile.load`` say when something goes wrong (issue #23 item 7): advice
that fits the cause of a capture error, messages shortened at a word boundary, one-line ``load``
errors without a torch traceback, exit code 130 on Ctrl-C, and a progress bar that moves while
the model is captured."""
from __future__ import annotations

import importlib
import sys
import textwrap
import threading
import time

import pytest
from click.testing import CliRunner

import mhc_compile
from mhc_compile.cli.main import cli
from mhc_compile.io import MHCIOError
from tests._convert_checks import one_thread  # noqa: F401 (autouse fixture)

SRC = textwrap.dedent(
    """
    import torch
    from torch import nn

    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 8)
            self.a = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8))

        def forward(self, idx):
            x = self.emb(idx)
            return x + self.a(x)

    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8))

        def forward(self, x):
            return x + self.a(x)

    class Wordy(Mlp):
        def forward(self, x):
            raise ValueError("a very long complaint " * 60)

    def res():
        return Res()

    def mlp():
        return Mlp()

    def wordy():
        return Wordy()
    """
)


@pytest.fixture
def mods(tmp_path, monkeypatch):
    (tmp_path / "msgmods.py").write_text(SRC)
    monkeypatch.setattr(sys, "path", [str(tmp_path)] + list(sys.path))
    monkeypatch.delitem(sys.modules, "msgmods", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _line(res):
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mhc: error: "), res.output
    return lines[0]


def test_shape_and_dtype_mistakes_get_input_advice(mods):
    """Wrong --input-shape / --input-dtype: forward fails without torch.export too, so the advice
    is about the inputs, not about making forward traceable."""
    for args, cause in ((["msgmods:mlp", "--input-shape", "2x5"], "normalized_shape=[8]"),
                        (["msgmods:res", "--input-shape", "2x6", "--input-dtype", "float32"], "Long")):
        res = run("convert", *args, "-o", mods / "o", "--no-progress")
        assert res.exit_code == 1, res.output
        line = _line(res)
        assert cause in line and "--input-shape/--input-dtype" in line, line
        assert "traceable" not in line and "torch.cond" not in line, line
    res = run("convert", "msgmods:mlp", "--input-shape", "2x8", "-o", mods / "o", "--no-progress")
    assert res.exit_code == 0, res.output  # the right shape converts


def test_long_messages_are_cut_at_a_word_and_keep_the_advice(mods):
    line = _line(run("convert", "msgmods:wordy", "--input-shape", "2x8", "-o", mods / "o", "--no-progress"))
    head, _, advice = line.partition(" What to try: ")
    assert head.endswith("complaint ...") or head.endswith("long ...") or head.endswith("very ...") \
        or head.endswith("a ..."), head[-40:]
    assert "--input-shape/--input-dtype)." in advice, advice
    assert len(line) < 900


def test_load_of_a_broken_pt2_is_one_line_without_a_traceback(tmp_path, capfd):
    import zipfile

    bad = tmp_path / "bad.pt2"
    bad.write_bytes(b"this is not a zip archive")
    with pytest.raises(MHCIOError, match=r"bad.pt2: not a torch.export program"):
        mhc_compile.load(bad)
    odd = tmp_path / "odd.pt2"
    with zipfile.ZipFile(odd, "w") as zf:
        zf.writestr("odd/data.txt", "no program here")
    with pytest.raises(MHCIOError, match=r"odd.pt2: cannot load the torch.export program: \w+Error: "):
        mhc_compile.load(odd)
    err = capfd.readouterr().err
    assert "Traceback" not in err and "deserializing" not in err, err


def test_ctrl_c_exits_130_and_leaves_nothing(mods, monkeypatch):
    convert_mod = importlib.import_module("mhc_compile.pipeline")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_mod, "capture", interrupted)
    res = run("convert", "msgmods:mlp", "--input-shape", "2x8", "-o", mods / "out", "--no-progress")
    assert res.exit_code == 130, (res.exit_code, res.output)
    assert res.output.strip() == "mhc: interrupted"
    assert not (mods / "out").exists() and not [p for p in mods.iterdir() if p.name.startswith(".")]


# A real SIGINT delivered while click parses: the group's options ("group") or the command's
# ("command"), before any command body runs; the process must exit 130 like Ctrl-C inside a command.
_SIGINT_WHILE_PARSING = textwrap.dedent(
    """
    import os, signal, sys, time
    import click
    from mhc_compile.cli.main import cli

    # a parent started in the background (nohup, `cmd &` without job control) hands down SIGINT
    # ignored, and Python then installs no handler: restore Ctrl-C's default Python behaviour
    signal.signal(signal.SIGINT, signal.default_int_handler)

    target = cli if sys.argv[1] == "group" else cli.commands["convert"]
    real = type(target).parse_args

    def parse_args(self, ctx, args):
        if self is target:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the KeyboardInterrupt arrives here
        return real(self, ctx, args)

    type(target).parse_args = parse_args
    cli.main(["convert", "m.py:f", "-o", "out"], prog_name="mhc")
    """
)


@pytest.mark.parametrize("where", ["group", "command"])
def test_ctrl_c_while_parsing_exits_130(tmp_path, where):
    import os
    import subprocess

    script = tmp_path / "sigint_parse.py"
    script.write_text(_SIGINT_WHILE_PARSING)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(mhc_compile.__path__[0].rsplit(os.sep, 1)[0]),
                                                       os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(script), where], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 130, (proc.returncode, proc.stderr)
    assert proc.stderr.strip().splitlines()[-1] == "mhc: interrupted", proc.stderr  # (warnings may precede it)
    assert "Aborted" not in proc.stderr + proc.stdout and "Traceback" not in proc.stderr, proc.stderr


def test_progress_moves_during_the_capture(mods, monkeypatch):
    """The bar is redrawn while a stage runs (its elapsed time moves): the fake capture returns
    only after the bar was redrawn three times during it."""
    import tqdm

    from mhc_compile.cli import main as cli_main

    convert_mod = importlib.import_module("mhc_compile.pipeline")
    real_capture, real_refresh = convert_mod.capture, tqdm.tqdm.refresh
    redraws = []

    def counting_refresh(self, *args, **kwargs):
        redraws.append(threading.current_thread().name)
        return real_refresh(self, *args, **kwargs)

    def slow_capture(*args, **kwargs):
        start = len(redraws)
        deadline = time.monotonic() + 30
        while len(redraws) < start + 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        return real_capture(*args, **kwargs)

    monkeypatch.setattr(tqdm.tqdm, "refresh", counting_refresh)
    monkeypatch.setattr(convert_mod, "capture", slow_capture)
    monkeypatch.setattr(cli_main._Progress.__init__, "__defaults__", (0.02,))
    res = CliRunner().invoke(cli, ["convert", "msgmods:mlp", "--input-shape", "2x8", "-o", str(mods / "o"),
                                   "--progress"])
    assert res.exit_code == 0, res.output
    assert len([t for t in redraws if t != "MainThread"]) >= 3, redraws


def test_help_imports_no_torch_and_the_package_stays_the_same():
    """`mhc --help` in a fresh process imports no torch (the package's names load on first use);
    mhc_compile.convert is the function also after the submodule was imported by name."""
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = ("import sys; from mhc_compile.cli.main import cli\n"
            "for args in (['--help'], ['convert', '--help'], ['inspect', '--help'], ['--version']):\n"
            "    try: cli(args)\n"
            "    except SystemExit as e: assert e.code == 0, (args, e.code)\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n"
            "import importlib, mhc_compile, types\n"
            "module = importlib.import_module('mhc_compile.convert')\n"
            "assert callable(mhc_compile.convert) and not isinstance(mhc_compile.convert, types.ModuleType)\n"
            "assert mhc_compile.convert is module.convert and mhc_compile.load.__module__ == 'mhc_compile.io.load'\n"
            "from mhc_compile import ops, MHCConfig, ResidualReport, materialize, diagnostics\n")
    env = dict(os.environ, PYTHONPATH=str(root))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "mhc convert SRC -o DST" in proc.stdout
