"""Safety of loading and inspecting directories from elsewhere, and the checks the CLI makes before
any work: a converted directory whose mhc.json names a factory runs that code only with
``trust_code=True`` / ``--trust-code``; the CLI does not put the current directory in front of
``sys.path``; ``-o`` destinations are checked before the model is read or captured."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

import mhc_compile
from mhc_compile.cli.main import cli
from mhc_compile.io import MHCIOError
from tests._convert_checks import one_thread  # noqa: F401 (autouse fixture)

ROOT = Path(__file__).resolve().parents[1]

GOOD_SRC = textwrap.dedent(
    """
    import torch
    from torch import nn

    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 8)
            self.a = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8))
            self.head = nn.Linear(8, 5)

        def forward(self, idx):
            x = self.emb(idx)
            x = x + self.a(x)
            return self.head(x)

    def res():
        return Res()

    def example_inputs():
        return (torch.randint(0, 20, (2, 6)),)
    """
)

PAYLOAD_SRC = textwrap.dedent(
    """
    import pathlib
    pathlib.Path({marker!r}).write_text("payload ran")

    def make():
        import torch
        return torch.nn.Identity()
    """
)


def run(*args, ok=True):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, (result.output, result.exception)
    return result


@pytest.fixture
def untrusted(tmp_path, monkeypatch):
    """A converted directory whose mhc.json was edited to name ``payload:make``, with payload.py
    beside it: importing payload writes ``marker``. Returns (directory, marker)."""
    good = tmp_path / "pkg"
    good.mkdir()
    (good / "safetymods.py").write_text(GOOD_SRC)
    monkeypatch.setattr(sys, "path", [str(good)] + list(sys.path))
    for name in ("safetymods", "payload"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    d = tmp_path / "downloaded"
    run("convert", "safetymods:res", "-o", d, "--no-progress")
    marker = tmp_path / "marker.txt"
    (d / "payload.py").write_text(PAYLOAD_SRC.format(marker=str(marker)))
    meta = json.loads((d / "mhc.json").read_text())
    meta["rebuild"]["factory"] = "payload:make"
    (d / "mhc.json").write_text(json.dumps(meta))
    yield d, marker
    sys.modules.pop("payload", None)


def test_load_runs_no_code_the_directory_names(untrusted, monkeypatch):
    d, marker = untrusted
    monkeypatch.chdir(d)
    monkeypatch.syspath_prepend(str(d))  # even where payload.py is importable, it is not imported
    with pytest.raises(MHCIOError, match=r"names the factory 'payload:make'.*trust_code=True.*--trust-code"):
        mhc_compile.load(d)
    assert not marker.exists() and "payload" not in sys.modules
    with pytest.raises(MHCIOError):  # trusted: the code runs (and its Identity has no residual site)
        mhc_compile.load(d, trust_code=True)
    assert marker.read_text() == "payload ran"


def test_cli_inspect_runs_no_code_the_directory_names(untrusted, monkeypatch):
    d, marker = untrusted
    monkeypatch.chdir(d)
    for fmt in ("text", "json"):
        res = run("inspect", ".", "--format", fmt, ok=False)
        assert res.exit_code == 1, res.output
        assert "--trust-code" in res.output and "payload:make" in res.output, res.output
        assert len(res.output.strip().splitlines()) == 1, res.output
    assert not marker.exists() and "payload" not in sys.modules
    assert str(d) not in sys.path  # the CLI did not make the directory importable
    run("inspect", ".", "--trust-code", ok=False)  # trusted: the payload runs ...
    assert marker.read_text() == "payload ran"
    assert sys.path.index(str(d)) == len(sys.path) - 1  # ... imported from the end of sys.path


def test_real_cli_process_runs_no_code_from_the_current_directory(untrusted):
    """As a shell user runs it: ``cd DIR && mhc inspect .`` in a fresh process (``-P``: Python
    itself adds no directory either, as for the installed ``mhc`` script)."""
    d, marker = untrusted
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    code = "import sys; from mhc_compile.cli.main import cli; sys.exit(cli())"
    proc = subprocess.run([sys.executable, "-P", "-c", code, "inspect", "."], cwd=d, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "--trust-code" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not marker.exists()


# --------------------------------------------------------------- -o checked before any work
@pytest.fixture
def no_work(tmp_path, monkeypatch):
    """The factory ``safetymods:res`` importable, and reading or capturing a model fails the test:
    whatever is checked with this fixture is checked before any work on the model."""
    import importlib

    import mhc_compile.io as io_mod

    convert_mod = importlib.import_module("mhc_compile.pipeline")  # the one pipeline: its capture
    (tmp_path / "safetymods.py").write_text(GOOD_SRC)
    monkeypatch.setattr(sys, "path", [str(tmp_path)] + list(sys.path))
    monkeypatch.delitem(sys.modules, "safetymods", raising=False)

    def forbidden(*args, **kwargs):
        raise AssertionError("the model was read or captured before the output was checked")

    monkeypatch.setattr(io_mod, "read_source", forbidden)
    monkeypatch.setattr(convert_mod, "capture", forbidden)


def _one_error(res, code, *words):
    assert res.exit_code == code, (res.exit_code, res.output, res.exception)
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mhc: error: "), res.output
    assert "AssertionError" not in res.output
    for w in words:
        assert w in res.output, (w, res.output)


def test_convert_output_checked_before_any_work(no_work, tmp_path):
    missing_parent = tmp_path / "no" / "such" / "out"
    _one_error(run("convert", "safetymods:res", "-o", missing_parent, ok=False), 1, str(missing_parent),
               "does not exist")
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    _one_error(run("convert", "safetymods:res", "-o", blocker / "out", ok=False), 1, "is not a directory")
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "keep.txt").write_text("keep")
    _one_error(run("convert", "safetymods:res", "-o", precious, ok=False), 1, "not an mhc output", "refusing")
    assert (precious / "keep.txt").read_text() == "keep"
    _one_error(run("convert", "safetymods:res", "-o", precious / "keep.txt", ok=False), 1, "is a file")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no probe left behind


def test_convert_pt2_output_that_is_a_directory(no_work, tmp_path):
    (tmp_path / "m.pt2").mkdir()
    _one_error(run("convert", "safetymods:res", "-o", tmp_path / "m.pt2", ok=False), 1, "is a directory")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only directories")
def test_convert_read_only_destination(no_work, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        _one_error(run("convert", "safetymods:res", "-o", ro / "out", ok=False), 1, str(ro / "out"), "cannot write")
    finally:
        ro.chmod(0o755)


def test_convert_unwritable_destination_probe(no_work, tmp_path, monkeypatch):
    """Where the directory exists but no file can be made there (read-only for a non-root user, a
    read-only mount), the probe file fails before any work (simulated: root writes anywhere)."""
    import tempfile as tempfile_mod

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile_mod, "mkstemp", refuse)
    _one_error(run("convert", "safetymods:res", "-o", tmp_path / "out", ok=False), 1, "Permission denied",
               str(tmp_path / "out"))


def test_inspect_output_exists_needs_force(tmp_path, monkeypatch):
    (tmp_path / "safetymods.py").write_text(GOOD_SRC)
    monkeypatch.setattr(sys, "path", [str(tmp_path)] + list(sys.path))
    monkeypatch.delitem(sys.modules, "safetymods", raising=False)
    report = tmp_path / "report.json"
    report.write_text("precious")
    import importlib

    convert_mod = importlib.import_module("mhc_compile.pipeline")
    real = convert_mod.capture
    calls = []
    monkeypatch.setattr(convert_mod, "capture", lambda *a, **k: calls.append(1) or real(*a, **k))
    _one_error(run("inspect", "safetymods:res", "-o", report, ok=False), 1, str(report), "--force")
    assert report.read_text() == "precious" and not calls  # refused before the capture
    _one_error(run("inspect", "safetymods:res", "-o", tmp_path, ok=False), 1, "is a directory")
    _one_error(run("inspect", "safetymods:res", "-o", tmp_path / "nodir" / "r.json", ok=False), 1, "does not exist")
    assert not calls
    run("inspect", "safetymods:res", "-o", report, "--force")
    assert json.loads(report.read_text())["sites"] and calls
