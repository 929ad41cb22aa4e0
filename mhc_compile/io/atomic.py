"""Atomic writes: every output of mhc-compile (converted directories and ``.pt2`` files, the
``mhc inspect`` reports) is written to a temporary path next to its destination and moved in
place with ``os.replace``, so a crash or an error mid-write leaves no partial output and an
older output at the same path intact.

:func:`atomic_path` yields the temporary path (a file or a directory) to write into;
:func:`atomic_files` the same for files that join a directory that may hold others (a
``save_pretrained`` into a Trainer checkpoint), each moved in atomically, the marker last;
:func:`atomic_write_text` writes one text file; :func:`check_destination` makes the same checks
up front (and tries a file next to the destination), so a command can refuse before any work.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Optional

from .errors import MHCIOError, first_line
from .format import MHC_JSON

__all__ = ["atomic_path", "atomic_files", "atomic_write_text", "check_destination"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _check_destination(dst: Path, parent: Path, is_dir: bool, marker: Optional[str]) -> None:
    if not parent.exists():
        raise MHCIOError(f"{dst}: cannot write: the directory {parent} does not exist")
    if not parent.is_dir():
        raise MHCIOError(f"{dst}: cannot write: {parent} is not a directory")
    if dst.exists():
        if dst.is_dir() != is_dir:
            raise MHCIOError(f"{dst}: exists and is a {'directory' if dst.is_dir() else 'file'}; refusing to replace it")
        if is_dir and marker and any(dst.iterdir()) and not (dst / marker).exists():
            raise MHCIOError(f"{dst}: exists, is not empty and is not an mhc output; refusing to overwrite it")


def _make_temporary(dst: Path, parent: Path, is_dir: bool) -> Path:
    try:
        if is_dir:
            return Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=parent))
        fd, name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=f".tmp{dst.suffix}", dir=parent)
        os.close(fd)
        return Path(name)
    except OSError as exc:  # the temporary path next to dst could not be made: say where
        raise MHCIOError(f"{dst}: cannot write in {parent}: {exc.strerror or first_line(exc)}") from None


def _move_into_place(tmp: Path, dst: Path, parent: Path, is_dir: bool) -> None:
    if not is_dir:
        os.replace(tmp, dst)
        return
    for f in tmp.iterdir():  # some writers (safetensors) create private files
        if f.is_file():
            os.chmod(f, 0o666 & ~_umask())
    if dst.exists():  # a directory cannot be replaced in one step: move the old one aside first
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".old", dir=parent))
        os.replace(dst, old / "x")
        os.replace(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dst)


def check_destination(dst: str | os.PathLike, is_dir: bool, *, marker: Optional[str] = MHC_JSON) -> None:
    """Raise :class:`MHCIOError` unless :func:`atomic_path` can write ``dst``: the same refusals, and
    a temporary file is created (and removed) next to it, so an unwritable place is found before
    any work rather than after it."""
    dst = Path(dst)
    parent = dst.parent if str(dst.parent) else Path(".")
    _check_destination(dst, parent, is_dir, marker)
    probe = _make_temporary(dst, parent, is_dir=False)
    probe.unlink()


@contextlib.contextmanager
def atomic_path(dst: Path, is_dir: bool, *, marker: Optional[str] = MHC_JSON) -> Iterator[Path]:
    """Yield a temporary path next to ``dst`` (a directory when ``is_dir``); when the block
    finishes without an error, move it onto ``dst`` with ``os.replace``. On an error the
    temporary path is removed and ``dst`` is left as it was.

    An existing ``dst`` of the other type (file vs directory) is never replaced, nor a non-empty
    directory that does not hold ``marker`` (default ``mhc.json``: only an older mhc output is
    overwritten; ``marker=None`` allows any directory). OS errors become :class:`MHCIOError`
    naming ``dst``.
    """
    dst = Path(dst)
    parent = dst.parent if str(dst.parent) else Path(".")
    _check_destination(dst, parent, is_dir, marker)
    tmp = _make_temporary(dst, parent, is_dir)
    try:
        os.chmod(tmp, (0o777 if is_dir else 0o666) & ~_umask())  # mkstemp/mkdtemp make them private
        yield tmp
        _move_into_place(tmp, dst, parent, is_dir)
    except OSError as exc:
        raise MHCIOError(f"{dst}: cannot write: {exc.strerror or first_line(exc)}") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to the file ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(Path(path), is_dir=False) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def atomic_files(dst: str | os.PathLike, *, marker: str = MHC_JSON, stale: tuple = ()) -> Iterator[Path]:
    """Yield a temporary directory next to the directory ``dst`` (made when missing); when the
    block finishes without an error, move each file written there into ``dst`` with
    ``os.replace``: ``dst/marker`` is removed first and moved in last, so a crash leaves either
    the old output or a directory without ``marker``, never a mix. Files of ``dst`` whose name
    starts with one of ``stale`` and that this write does not replace are removed; other files
    of ``dst`` are kept. OS errors become :class:`MHCIOError` naming ``dst``; the temporary
    directory is always removed."""
    dst = Path(dst)
    try:
        dst.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MHCIOError(f"{dst}: cannot write: {exc.strerror or first_line(exc)}") from None
    tmp = _make_temporary(dst, dst.parent, is_dir=True)
    try:
        yield tmp
        new = {f.name for f in tmp.iterdir()}
        (dst / marker).unlink(missing_ok=True)
        for f in dst.iterdir():  # files of an older write that this one does not overwrite
            if f.is_file() and f.name not in new and stale and f.name.startswith(stale):
                f.unlink()
        for name in new:
            os.chmod(tmp / name, 0o666 & ~_umask())  # some writers (safetensors) create private files
        for name in sorted(new - {marker}) + ([marker] if marker in new else []):
            os.replace(tmp / name, dst / name)
    except OSError as exc:
        raise MHCIOError(f"{dst}: cannot write: {exc.strerror or first_line(exc)}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
