"""The ``export`` source kind: a ``torch.export`` program saved with ``torch.export.save``
(``.pt2``), and loading ``.pt2`` programs in general (:func:`load_pt2`, also used for converted
``.pt2`` outputs).

Read: the program's ``module()`` with the program's example inputs (or, for older programs,
inputs made from the fake values of its placeholders). A converted directory keeps the original
program as ``source.pt2``; rebuilding loads it.
"""
from __future__ import annotations

import contextlib
import json
import logging
import shutil
import zipfile
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..errors import MHCIOError, first_line
from ..format import MHC_JSON
from ..registry import ReadOptions, Source, SourceKind
from .hf import register_output_types

SOURCE_PT2 = "source.pt2"  # the original program, in a converted directory


def pt2_members(path: str) -> list[str]:
    """The names in the ``.pt2`` zip archive ``path``; an unreadable archive raises MHCIOError."""
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise MHCIOError(f"{path}: not a torch.export program (.pt2 zip archive): {first_line(exc)}") from None


def carries_mhc_json(names: list[str]) -> bool:
    """Whether a ``.pt2`` archive with these member names carries mhc.json (an mhc output)."""
    return any(n.endswith("extra/" + MHC_JSON) or n.endswith("/" + MHC_JSON) for n in names)


def _peek_mhc_json(path: str) -> Optional[dict]:
    """The mhc.json carried by a converted .pt2 (read from the zip, before deserialising)."""
    try:
        with zipfile.ZipFile(path) as zf:
            for name in zf.namelist():
                if name.endswith("extra/" + MHC_JSON):
                    return json.loads(zf.read(name))
    except (OSError, zipfile.BadZipFile, ValueError):
        return None
    return None


def load_pt2(path: str, extra: Optional[dict] = None):
    """``torch.export.load(path)``, after registering what deserialising a converted program needs
    (the mhc:: ops, the transformers output types); ``extra`` receives the extra files."""
    from ... import ops  # noqa: F401  (registers the mhc:: ops a converted program refers to)

    pt2_members(path)  # not a zip archive: say so, before torch logs a traceback about it
    meta = _peek_mhc_json(path)
    if isinstance(meta, dict):
        register_output_types(meta)
    with _export_log() as logged:
        try:
            return torch.export.load(path, extra_files=extra)
        except Exception as exc:
            cause = next((f"{type(e).__name__}: {first_line(e)}" for e in reversed(logged) if e is not None),
                         first_line(exc))
            raise MHCIOError(f"{path}: cannot load the torch.export program: {cause}") from None


@contextlib.contextmanager
def _export_log():
    """Keep what ``torch.export.load`` logs (a whole traceback, as a warning, before it raises "check
    the warnings above") out of the user's terminal; yields the logged exceptions, for the one-line
    error that quotes the cause instead."""
    logger = logging.getLogger("torch.export")
    logged: list = []

    class _Keep(logging.Handler):
        def emit(self, record):
            logged.append(record.exc_info[1] if record.exc_info else None)

    handlers, propagate = logger.handlers, logger.propagate  # torch attaches its own handler here
    logger.handlers, logger.propagate = [_Keep()], False
    try:
        yield logged
    finally:
        logger.handlers, logger.propagate = handlers, propagate


def export_inputs(ep, path: str) -> tuple[tuple, dict]:
    """The example inputs of the program ``ep`` (made from its placeholders when it has none)."""
    ex = getattr(ep, "example_inputs", None)
    if ex is not None:
        args, kwargs = ex
        return tuple(args), dict(kwargs)
    # Older programs: make inputs from the fake values of the user-input placeholders.
    from torch.export.graph_signature import InputKind

    specs = [s for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    nodes = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    args = []
    for s in specs:
        val = nodes[s.arg.name].meta.get("val")
        if not isinstance(val, torch.Tensor):
            raise MHCIOError(f"{path}: program has no example inputs and input {s.arg.name} is not a tensor")
        shape = [int(d) if isinstance(d, int) else 2 for d in val.shape]
        if val.dtype.is_floating_point:
            args.append(torch.randn(shape, dtype=val.dtype))
        else:
            args.append(torch.zeros(shape, dtype=val.dtype))
    return tuple(args), {}


def detect(src: str) -> bool:
    p = Path(src)
    return p.is_file() and p.suffix == ".pt2" and not carries_mhc_json(pt2_members(src))


def read(path: str, options: ReadOptions) -> Source:
    ep = load_pt2(path)
    args, kwargs = export_inputs(ep, path)
    return Source("export", path, ep.module(), args, kwargs, {})


def save_extras(source: Source, directory: Path) -> None:
    shutil.copy2(source.path, directory / SOURCE_PT2)


def rebuild(directory: Path, meta: dict, options: ReadOptions) -> nn.Module:
    return load_pt2(str(directory / SOURCE_PT2)).module()


KIND = SourceKind(
    "export", detect, read, save_extras, rebuild,
    description="a torch.export program saved with torch.export.save (.pt2)",
)
