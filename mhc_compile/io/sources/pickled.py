"""The ``pickle`` source kind: a whole pickled ``nn.Module`` (``.pt``). Unpickling runs code from
the file, so reading (and rebuilding) it needs ``trust_pickle=True`` (``--trust-pickle``); a
file that ``weights_only=True`` can read (a state_dict, a tensor) is refused with advice instead.

A converted directory keeps the original pickled module as ``module.pt``; rebuilding unpickles it.
"""
from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import torch
from torch import nn

from ..errors import MHCIOError, first_line
from ..examples import make_checked_inputs
from ..registry import ReadOptions, Source, SourceKind
from .common import apply_state_dict, eval_mode

PICKLED = "module.pt"  # the original pickled module, in a converted directory


def _refuse_untrusted(path: str, safe_error: Exception) -> None:
    if isinstance(safe_error, (zipfile.BadZipFile, EOFError)) or "pickle" not in str(safe_error).lower() and "weights_only" not in str(safe_error):
        raise MHCIOError(f"{path}: not a readable torch file: {first_line(safe_error)}")
    raise MHCIOError(
        f"{path}: is a pickled object; loading it runs arbitrary code from the file, "
        "so it needs --trust-pickle (only for files you trust)"
    )


def detect(src: str) -> bool:
    p = Path(src)
    return p.is_file() and p.suffix not in (".pt2", ".json", ".safetensors")


def read(path: str, options: ReadOptions) -> Source:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        safe_error = exc
    else:
        if isinstance(obj, dict):
            raise MHCIOError(
                f"{path}: is a state_dict, not a model; pass a factory with it: "
                f"mhc convert package.module:function --state-dict {path} ..."
            )
        raise MHCIOError(f"{path}: holds a {type(obj).__name__}, not an nn.Module")
    if not options.trust_pickle:
        _refuse_untrusted(path, safe_error)
    try:
        model = torch.load(path, map_location="cpu", weights_only=False)  # trusted: --trust-pickle
    except Exception as exc:
        raise MHCIOError(f"{path}: cannot unpickle: {type(exc).__name__}: {first_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise MHCIOError(f"{path}: holds a {type(model).__name__}, not an nn.Module")
    if options.state_dict is not None:
        apply_state_dict(model, options.state_dict)
    eval_mode(model)
    args = make_checked_inputs(model, options.input_shapes, options.input_dtypes)
    return Source("pickle", path, model, args, {}, {})


def save_extras(source: Source, directory: Path) -> None:
    shutil.copy2(source.path, directory / PICKLED)


def rebuild(directory: Path, meta: dict, options: ReadOptions) -> nn.Module:
    if not options.trust_pickle:
        raise MHCIOError(
            f"{directory}: was converted from a pickled module ({PICKLED}); rebuilding it runs code from "
            "that file, so it needs trust_pickle=True (--trust-pickle)"
        )
    try:
        return torch.load(str(directory / PICKLED), map_location="cpu", weights_only=False)  # trusted
    except Exception as exc:
        raise MHCIOError(f"{directory / PICKLED}: cannot unpickle: {first_line(exc)}") from None


KIND = SourceKind(
    "pickle", detect, read, save_extras, rebuild, takes_state_dict=True,
    description="a whole pickled nn.Module (.pt); needs trust_pickle=True",
)
