"""The ``converted`` source kind: an ``mhc convert`` output (a directory with ``mhc.json``, or a
``.pt2`` carrying ``mhc.json`` as an extra file), read back for ``mhc inspect``.

Read: a ``.pt2`` is loaded as is (the original graph is not in it); a directory is rebuilt and
converted again by the one pipeline (``io.rebuild``), keeping that conversion (report, original graph) on the
Source. An mhc output is not converted again: saving one as a directory, or rebuilding one, is
refused.
"""
from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from ..errors import MHCIOError, MHCUsageError
from ..format import MHC_JSON, read_mhc_json
from ..rebuild import convert_rebuilt, rebuild_original
from ..registry import ReadOptions, Source, SourceKind
from .pt2 import carries_mhc_json, export_inputs, load_pt2, pt2_members


def detect(src: str) -> bool:
    p = Path(src)
    if p.is_dir():
        return (p / MHC_JSON).is_file()
    return p.is_file() and p.suffix == ".pt2" and carries_mhc_json(pt2_members(src))


def _read_pt2(path: str) -> Source:
    extra = {MHC_JSON: ""}
    ep = load_pt2(path, extra)
    try:
        meta = json.loads(extra[MHC_JSON])
    except ValueError:
        raise MHCIOError(f"{path}: its mhc.json is not valid json") from None
    args, kwargs = export_inputs(ep, path)
    mod = ep.module()
    return Source("converted", path, mod, args, kwargs, meta.get("rebuild", {}), mhc=meta, converted=mod)


def read(path: str, options: ReadOptions) -> Source:
    p = Path(path)
    if p.is_file():
        return _read_pt2(path)
    meta = read_mhc_json(p)
    original, args, kwargs = rebuild_original(p, meta, options)
    conversion = convert_rebuilt(p, meta, original, args, kwargs, keep_graph=True)
    return Source("converted", path, original, args, kwargs, meta.get("rebuild", {}), mhc=meta,
                  converted=conversion.converted, conversion=conversion)


def save_extras(source: Source, directory: Path) -> None:
    raise MHCUsageError(f"{source.path}: is already an mhc output; convert the original model instead")


def rebuild(directory: Path, meta: dict, options: ReadOptions) -> nn.Module:
    raise MHCIOError(f"{directory / MHC_JSON}: an mhc output records the model it was converted from, "
                     "never 'converted'; re-run `mhc convert` on the original")


KIND = SourceKind(
    "converted", detect, read, save_extras, rebuild,
    description="an mhc convert output (a directory with mhc.json, or a .pt2 carrying it)",
)
