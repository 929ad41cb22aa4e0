"""Fused CPU kernels for the mHC ops: a small C++ extension built at first use, and its launchers.

``coeffs.cpp``, ``mix.cpp``, ``fused.cpp``, ``post_norm.cpp`` and ``grad_mm.cpp`` (next to this file,
helpers in ``common.h``, ``gates.h``, ``gemm_tile.h``, ``mix_tokens.h``) hold one-pass kernels, parallel
over tokens with torch's intra-op threads: the gate activations with the whole Sinkhorn loop and their
backward (the 20 iterations replayed per token in registers-sized buffers), ``pre`` and ``post_res``
with their backward, the skinny phi projection GEMM (``proj_mm``, register-tiled; 1.6x faster than
MKL's at these shapes), the boundary forward in one pass per token block (post_res, projection, gates,
pre while the block is in cache); ``post_norm.cpp`` the end of a post-LN site (post_res, then a
LayerNorm on each stream) for eval; and the backward's X-gradient GEMM dh_r . phi^T with its epilogue
(``coeffs_gx``: the RMS term, and at a boundary the pre and next-stream gradients, applied before the
rows are written), and its phi gradient (``phi_grad_mm``: flat^T . dh_r in phi's layout). :mod:`.launch` composes them into the ``mhc::``
ops' implementations; :mod:`.fakes` registers the forward kernels' fake implementations once they are
loaded, so a compiled eval forward can call them directly (``ops/cpu_paths.py``).

The extension is compiled once per machine with ``torch.utils.cpp_extension.load`` (about 10 s,
cached under torch's extension directory, ``TORCH_EXTENSIONS_DIR``, in a folder per Python and torch
version: :func:`build_directory`) the first time a CPU tensor reaches an ``mhc::`` op under
``kernels="auto"``. Processes that start together build it once: the builder holds an OS file lock
(:func:`_build_lock`), which dies with its process, so a build killed midway (Ctrl-C) leaves nothing
that makes the next process wait: torch's own ``lock`` file, which it would wait on forever, is
removed when its builder is gone. A build (not a load of a library built before) says on stderr that it
starts and how long it took. Where it cannot be built (no C++ compiler or
ninja), :func:`available` is False, a warning says so once, and ``mhc_compile.ops`` runs the plain-torch
reference instead: same numbers, slower. ``MHC_CPU_KERNELS=0`` skips the build.

The kernels' large outputs (stream-sized tensors) come from a cache of freed buffers (``pool.h``),
so a model's next call reuses mapped memory instead of page-faulting fresh pages: at most
``MHC_CPU_POOL_MB`` megabytes (default 1024; 0 turns it off) are kept, :func:`release_cached_memory`
returns them to the system, :func:`output_cache_stats` says how much it holds.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

_DIR = Path(__file__).parent
_SOURCES = (_DIR / "coeffs.cpp", _DIR / "mix.cpp", _DIR / "fused.cpp", _DIR / "post_norm.cpp", _DIR / "grad_mm.cpp",
            _DIR / "ends.cpp")
_HEADERS = (_DIR / "common.h", _DIR / "gates.h", _DIR / "gemm_tile.h", _DIR / "mix_tokens.h", _DIR / "pool.h")
_lock = threading.Lock()
_state: dict = {}  # "ok": bool once the build was tried, "error": str when it failed


def _arch_flags() -> list[str]:
    """Vector ISA flags for the host, from torch's own CPU capability probe (never -march=native)."""
    try:
        cap = torch.backends.cpu.get_cpu_capability()
    except Exception:  # pragma: no cover - very old or unusual builds
        return []
    if cap.startswith("AVX512"):
        return ["-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]
    if cap == "AVX2":
        return ["-mavx2", "-mfma"]
    return []


def available() -> bool:
    """Whether the fused CPU kernels are loaded (building them on the first call)."""
    ok = _state.get("ok")
    if ok is not None:
        return ok
    with _lock:
        if "ok" in _state:
            return _state["ok"]
        if os.environ.get("MHC_CPU_KERNELS", "1") == "0":
            _state.update(ok=False, error="MHC_CPU_KERNELS=0")
            return False
        _check_pool_env()
        try:
            from torch.utils.cpp_extension import load

            flags = _flags()
            name = _extension_name(flags)
            folder = build_directory(name)
            with _build_lock(folder), _announced(folder, name):
                load(name, sources=[str(f) for f in _SOURCES], extra_cflags=flags, is_python_module=False,
                     build_directory=str(folder), verbose=False)
            from . import fakes

            fakes.register()
            _state["ok"] = True
        except Exception as e:  # no compiler / ninja / headers: the reference runs instead
            _state.update(ok=False, error=f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}")
            warnings.warn(
                "mhc-compile: the fused CPU kernels could not be built "
                f"({_state['error']}); CPU mHC ops run the plain-torch reference (same numbers, slower). "
                "Install a C++ compiler and ninja to build them, or set MHC_CPU_KERNELS=0 to skip the attempt.",
                RuntimeWarning,
                stacklevel=2,
            )
        return _state["ok"]


def _flags() -> list[str]:
    """The compiler flags of the build (part of the extension's name)."""
    return ["-O3", *_arch_flags()]


def _extension_name(flags: list[str]) -> str:
    blob = b"".join(f.read_bytes() for f in (*_SOURCES, *_HEADERS)) + " ".join(flags).encode()
    return f"mhc_cpu_{hashlib.sha256(blob).hexdigest()[:12]}"  # a new name whenever the sources or flags change


def build_directory(name: str | None = None) -> Path:
    """Where the extension ``name`` (default: this checkout's sources for this machine) is built:
    ``TORCH_EXTENSIONS_DIR`` (else torch's default root) / ``mhc_py<X.Y>_torch<version>`` / name. One
    folder per Python and torch version, so two environments sharing a cache never rebuild each
    other's library."""
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    version = "".join(ch if ch.isalnum() or ch == "." else "_" for ch in torch.__version__)
    name = name or _extension_name(_flags())
    return root / f"mhc_py{sys.version_info.major}{sys.version_info.minor}_torch{version}" / name


@contextlib.contextmanager
def _build_lock(folder: Path):
    """Held around ``load``: an OS lock (``flock``) on ``<folder>.build-lock``, released by the kernel when
    its holder exits however it exits. Whoever holds it is the only process building ``folder``, so a
    torch ``lock`` file found there then is a dead build's (torch would wait for it to vanish, forever)
    and is removed. Without ``fcntl`` (Windows) it does nothing: torch's own lock applies."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(folder.parent / f"{folder.name}.build-lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # another process building: wait for it (it dies, the lock goes)
        try:
            (folder / "lock").unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _announced(folder: Path, name: str):
    """Says on stderr that the build starts and how long it took, when ``folder`` has no library ``name``
    yet (the first use on a machine, or new sources): it takes 10-60 s of compiling, silent otherwise.
    A library already built loads without a word."""
    if (folder / f"{name}.so").exists():
        yield
        return
    print(f"mhc-compile: building the fused CPU kernels in {folder} (once per machine and torch version; "
          "10-60 s)...", file=sys.stderr, flush=True)
    start = time.monotonic()
    yield
    print(f"mhc-compile: CPU kernels built in {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)


def loaded() -> bool:
    """Whether the kernels are built and loaded already (never builds: safe to trace under Dynamo)."""
    return _state.get("ok") is True


def build_error() -> str | None:
    """Why the kernels are not available (None when they are, or the build was not tried yet)."""
    return _state.get("error")


def _check_pool_env() -> None:
    """``MHC_CPU_POOL_MB``, when set, is a whole number of megabytes >= 0 (the C++ side reads it)."""
    raw = os.environ.get("MHC_CPU_POOL_MB", "").strip()
    if raw and not (raw.isdigit()):
        raise ValueError(
            f"MHC_CPU_POOL_MB={raw!r}: expected a whole number of megabytes >= 0 for the CPU kernels' output "
            "cache (default 1024; 0 turns the cache off)"
        )


def output_cache_stats() -> dict:
    """The CPU kernels' output cache: bytes cached now, the budget in bytes, and how many large outputs
    were served from it (``hits``) or newly allocated (``misses``). Zeros when the kernels are not loaded."""
    if not _state.get("ok"):
        return {"cached_bytes": 0, "budget_bytes": 0, "hits": 0, "misses": 0}
    cached, budget, hits, misses = torch.ops.mhc_cpu.pool_stats()
    return {"cached_bytes": cached, "budget_bytes": budget, "hits": hits, "misses": misses}


def set_output_cache_limit(megabytes: int) -> int:
    """Sets how many megabytes of freed outputs the CPU kernels keep (0: none, every output is a fresh
    allocation); returns the previous limit in megabytes. Buffers kept already stay until
    :func:`release_cached_memory` or their next use."""
    if isinstance(megabytes, bool) or not isinstance(megabytes, int) or megabytes < 0:
        raise ValueError(f"set_output_cache_limit: expected a whole number of megabytes >= 0, got {megabytes!r}")
    if not available():
        return 0
    return torch.ops.mhc_cpu.pool_set_budget(megabytes << 20) >> 20


def release_cached_memory() -> int:
    """Returns every buffer the CPU kernels' output cache holds to the system; the number of bytes freed."""
    if not _state.get("ok"):
        return 0
    return torch.ops.mhc_cpu.pool_release()
