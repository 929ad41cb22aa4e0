"""Loading a converted model: :func:`load`. A directory is rebuilt and converted again
(``rebuild.py``); a converted ``.pt2`` is loaded with ``torch.export.load`` and returned as
``ExportedProgram.module()``.
"""
from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from .errors import MHCIOError
from .format import MHC_JSON, read_mhc_json
from .rebuild import convert_rebuilt, rebuild_original
from .registry import ReadOptions
from .sources.pt2 import load_pt2


def load(path: str | os.PathLike, *, trust_pickle: bool = False, trust_code: bool = False) -> nn.Module:
    """Load a model written by ``mhc convert`` (or :func:`save_converted`) as a trainable module.

    Directory outputs (``mhc convert``, or ``save_pretrained`` of a converted Hugging Face model)
    are rebuilt (original model from its config / factory / pickled module, then
    :func:`mhc_compile.convert` with the saved MHCConfig and example inputs: the model's own
    class) and the saved weights are loaded strictly, so outputs match the converted model
    exactly. ``.pt2`` outputs
    come back as ``torch.export.load(path).module()``. Loading runs no code that the directory
    names unless asked: sources converted from a pickled module need ``trust_pickle=True``, and
    from a factory (``mhc.json`` names ``module:function``, which is imported and called)
    ``trust_code=True``.
    """
    p = Path(path)
    if not p.exists():
        raise MHCIOError(f"{p}: no such file or directory")
    if p.is_file():
        if p.suffix != ".pt2":
            raise MHCIOError(f"{p}: not an mhc output (expected a directory with mhc.json or a .pt2 file)")
        return load_pt2(str(p)).module()
    if not (p / MHC_JSON).is_file():
        raise MHCIOError(f"{p}: directory has no mhc.json; not an mhc convert output")
    meta = read_mhc_json(p)
    original, args, kwargs = rebuild_original(p, meta, ReadOptions(trust_pickle=trust_pickle, trust_code=trust_code))
    return convert_rebuilt(p, meta, original, args, kwargs).converted
