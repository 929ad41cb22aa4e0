"""The CPU extension's build folder and lock: a build killed midway never makes a later process wait.

torch's ``cpp_extension.load`` (2.11-2.14) marks a build with a ``lock`` file and makes any other process
wait, forever, until that file is gone; a build killed by Ctrl-C leaves it behind (torch 2.15 takes an OS
lock instead). ``kernels_cpu`` builds under an OS lock
that dies with its holder and removes such a file when it holds that lock."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch.utils import cpp_extension

from mhc_compile import kernels_cpu

pytestmark = pytest.mark.skipif(not kernels_cpu.available(), reason=f"CPU kernels not built: {kernels_cpu.build_error()}")

_LOAD = "from mhc_compile import kernels_cpu; print('loaded', kernels_cpu.available(), kernels_cpu.build_error())"


def _run(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)


def test_the_build_folder_is_per_python_and_torch_version_under_the_extensions_root(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(torch, "__version__", "2.13.0+cpu")
    folder = kernels_cpu.build_directory("mhc_cpu_x")
    py = f"{sys.version_info.major}{sys.version_info.minor}"
    assert folder == tmp_path / f"mhc_py{py}_torch2.13.0_cpu" / "mhc_cpu_x"


def test_a_lock_file_left_by_a_killed_build_does_not_block_the_next_process():
    folder = kernels_cpu.build_directory()
    assert (folder / f"{folder.name}.so").exists()  # built by this process (the skipif above)
    (folder / "lock").touch()  # what torch leaves when its builder is killed midway
    try:
        proc = _run(_LOAD)  # torch alone would wait for the file forever: the timeout would fire
    finally:
        leftover = (folder / "lock").exists()
        (folder / "lock").unlink(missing_ok=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "loaded True None" in proc.stdout
    # torch <= 2.14 marks a build with the file itself, which must then be gone; torch 2.15 holds an OS
    # lock on it (FileLock) and leaves the file in place, where it blocks nobody
    if not hasattr(cpp_extension, "FileLock"):
        assert not leftover


def test_a_builder_that_dies_holding_the_lock_lets_the_waiting_process_build():
    # process A takes the build lock, leaves torch's lock file as a build in progress would, then dies
    # without releasing anything; process B, started while A holds the lock, waits for it and then loads
    folder = kernels_cpu.build_directory()
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import os, sys, time\n"
         "from mhc_compile import kernels_cpu\n"
         "folder = kernels_cpu.build_directory()\n"
         "cm = kernels_cpu._build_lock(folder); cm.__enter__()\n"
         "(folder / 'lock').touch()\n"
         "print('held', flush=True); time.sleep(3); os._exit(1)\n"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = _run(_LOAD)
    finally:
        holder.wait(timeout=60)
        (folder / "lock").unlink(missing_ok=True)
    assert holder.returncode == 1
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "loaded True None" in proc.stdout


def test_a_fresh_build_says_so_on_stderr_and_a_built_library_loads_silently(tmp_path, capsys):
    with kernels_cpu._announced(tmp_path, "mhc_cpu_x"):
        (tmp_path / "mhc_cpu_x.so").touch()  # what the build leaves
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[0].startswith(f"mhc-compile: building the fused CPU kernels in {tmp_path}")
    assert err[1].startswith("mhc-compile: CPU kernels built in ") and err[1].endswith(" s")
    with kernels_cpu._announced(tmp_path, "mhc_cpu_x"):
        pass
    assert capsys.readouterr().err == ""
