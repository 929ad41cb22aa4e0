"""Saving a converted model: :func:`save_converted` writes a directory (the format of
``io.format`` plus what the source kind's ``save_extras`` copies) or a re-exported ``.pt2``
carrying ``mhc.json``, always atomically (``io.atomic``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import MHCConfig
from .atomic import atomic_path
from .errors import MHCIOError, first_line
from .format import INPUTS, MHC_JSON, WEIGHTS, dedup_state_dict, dumps, flatten_inputs, mhc_meta
from .registry import Source, get_source_kind


def save_converted(converted: nn.Module, dst: str, source: Source, config: MHCConfig, report: Any = None) -> str:
    """Write a converted model atomically to ``dst``: a ``.pt2`` file or a directory (see ``io``).

    ``report`` is a JSON-able dict (the residual report), stored in mhc.json for ``mhc inspect``.
    Returns the path written.
    """
    d = Path(dst)
    meta = mhc_meta(source, config, report)
    if d.suffix == ".pt2":
        return _save_pt2(converted, d, source, meta)
    kind = get_source_kind(source.kind, where=str(source.path))
    from safetensors.torch import save_file

    sd, tied = dedup_state_dict(converted.state_dict())
    meta["tied"] = tied
    with atomic_path(d, is_dir=True) as tmp:
        try:
            kind.save_extras(source, tmp)  # first: a kind that cannot be saved refuses before any write
            save_file(sd, str(tmp / WEIGHTS), metadata={"format": "pt", "mhc_compile": "1"})
            save_file(flatten_inputs(source.args, source.kwargs), str(tmp / INPUTS))
            (tmp / MHC_JSON).write_text(dumps(meta) + "\n")
        except OSError as exc:
            raise MHCIOError(f"{dst}: cannot write: {exc.strerror or first_line(exc)}") from None
    return str(d)


def _save_pt2(converted: nn.Module, dst: Path, source: Source, meta: dict) -> str:
    try:
        ep = torch.export.export(converted, source.args, source.kwargs or None)
    except Exception as exc:
        raise MHCIOError(f"{dst}: cannot re-export the converted model: {type(exc).__name__}: {first_line(exc)}") from None
    with atomic_path(dst, is_dir=False) as tmp:
        try:
            torch.export.save(ep, str(tmp), extra_files={MHC_JSON: dumps(meta)})
        except OSError as exc:
            raise MHCIOError(f"{dst}: cannot write: {exc.strerror or first_line(exc)}") from None
        _check_pt2_loads(tmp, dst)
    return str(dst)


def _check_pt2_loads(tmp: Path, dst: Path) -> None:
    """Load a just-written program back before it replaces ``dst``: some outputs (for example
    pytree classes registered without a serialized name) save fine but cannot be loaded."""
    import logging

    logger = logging.getLogger("torch.export")
    level = logger.level
    logger.setLevel(logging.ERROR)  # torch logs the whole deserialization traceback as a warning
    try:
        torch.export.load(str(tmp))
    except Exception as exc:
        raise MHCIOError(
            f"{dst}: the re-exported program cannot be loaded back ({type(exc).__name__}: {first_line(exc)}); "
            "write a directory output instead"
        ) from None
    finally:
        logger.setLevel(level)

