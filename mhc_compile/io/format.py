"""The on-disk format of a converted directory: its file names, ``mhc.json`` (format version,
MHCConfig, source kind, what is needed to rebuild, example input specs, the residual report),
the example inputs file, and the deduplication of tied tensors in the weights file.

A converted directory holds:

``mhc.json``                    the metadata above (:func:`mhc_meta`, :func:`read_mhc_json`)
``model.safetensors``           the converted state_dict; tied tensors stored once and listed
                                under ``"tied"`` in mhc.json (:func:`dedup_state_dict`,
                                :func:`restore_tied`)
``example_inputs.safetensors``  the exact tensors used to capture the graph
                                (:func:`flatten_inputs` / :func:`unflatten_inputs`)
``mhc.safetensors``             (``save_pretrained`` of a converted HF model) the mHC parameters
                                under their own names; ``model.safetensors`` then holds the
                                weights as the class's ``save_pretrained`` writes them
                                (transformers' checkpoint key names, the mHC ones too)

plus what the source kind needs to rebuild the original model (see ``sources/``). A converted
``.pt2`` carries the same ``mhc.json`` as an extra file.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch

from .errors import MHCIOError, first_line

if TYPE_CHECKING:
    from ..config import MHCConfig
    from .registry import Source

FORMAT_VERSION = 1
MHC_JSON = "mhc.json"
WEIGHTS = "model.safetensors"
MHC_WEIGHTS = "mhc.safetensors"  # save_pretrained: the mHC parameters, apart from the class's weights
INPUTS = "example_inputs.safetensors"


def dtype_name(dt: torch.dtype) -> str:
    """``float32`` for ``torch.float32``: how mhc.json writes dtypes."""
    return str(dt).replace("torch.", "")


def input_specs(args: tuple, kwargs: dict) -> list[dict]:
    """Shapes and dtypes of the example inputs, as written to mhc.json."""
    specs = [{"name": f"arg{i}", "shape": list(a.shape), "dtype": dtype_name(a.dtype)} if a is not None
             else {"name": f"arg{i}", "none": True} for i, a in enumerate(args)]
    specs += [{"name": k, "shape": list(v.shape), "dtype": dtype_name(v.dtype)} for k, v in kwargs.items()]
    return specs


def num_positional(meta: dict) -> int:
    """How many positional example inputs mhc.json lists (skipped ones included)."""
    return len([s for s in meta.get("example_inputs", []) if str(s.get("name", "")).startswith("arg")])


def flatten_inputs(args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
    """Example inputs as a flat ``name -> tensor`` dict for safetensors (``arg.0``, ``kwarg.mask``)."""
    out = {}
    for i, a in enumerate(args):
        if a is None:
            continue  # a skipped positional parameter; restored as None from "num_args"
        if not isinstance(a, torch.Tensor):
            raise MHCIOError(f"example input {i} is a {type(a).__name__}; only tensors are supported")
        out[f"arg.{i}"] = a.detach().contiguous()
    for k, v in kwargs.items():
        if not isinstance(v, torch.Tensor):
            raise MHCIOError(f"example input {k!r} is a {type(v).__name__}; only tensors are supported")
        out[f"kwarg.{k}"] = v.detach().contiguous()
    return out


def unflatten_inputs(tensors: dict[str, torch.Tensor], num_args: Optional[int] = None) -> tuple[tuple, dict]:
    """The inverse of :func:`flatten_inputs`; positions up to ``num_args`` missing from it are None."""
    pos = {int(k.split(".", 1)[1]): v for k, v in tensors.items() if k.startswith("arg.")}
    count = num_args if num_args is not None else (max(pos) + 1 if pos else 0)
    kwargs = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("kwarg.")}
    return tuple(pos.get(i) for i in range(count)), kwargs


def tied_names(sd: dict[str, torch.Tensor]) -> dict[str, str]:
    """``name -> earlier name`` for every key whose tensor is the same view of the same storage
    as an earlier key's (tied weights); nothing is copied."""
    tied, seen = {}, {}
    for k, v in sd.items():
        if not v.numel():
            continue
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()), v.dtype)
        if key in seen:
            tied[k] = seen[key]
        else:
            seen[key] = k
    return tied


def dedup_state_dict(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors stored once: a key whose tensor is the same view of the same storage as an earlier
    key's becomes an entry of ``tied`` (name -> name it is tied to, :func:`tied_names`)."""
    tied = tied_names(sd)
    out = {}
    for k, v in sd.items():
        if k in tied:
            continue
        v = v.detach()
        out[k] = v.contiguous().clone() if not v.is_contiguous() else v
    # safetensors refuses tensors that share memory even when they are different views
    ptrs: dict[int, str] = {}
    for k, v in list(out.items()):
        if v.numel() == 0:
            continue
        ptr = v.untyped_storage().data_ptr()
        if ptr in ptrs:
            out[k] = v.clone()
        else:
            ptrs[ptr] = k
    return out, tied


def restore_tied(sd: dict[str, torch.Tensor], tied: Optional[dict]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`dedup_state_dict`: every tied name points at its target's tensor again."""
    for name, target in (tied or {}).items():
        if target in sd:
            sd[name] = sd[target]
    return sd


def json_safe(obj: Any) -> Any:
    """``obj`` as plain JSON values (anything JSON cannot hold becomes its repr)."""
    return json.loads(json.dumps(obj, default=lambda o: repr(o)))


def mhc_meta(source: "Source", config: "MHCConfig", report: Any = None) -> dict:
    """The content of mhc.json for ``source`` converted with ``config`` (without ``"tied"``, which
    the directory writer adds); ``report`` is the residual report as a JSON-able dict."""
    from .. import __version__

    return {
        "format_version": FORMAT_VERSION,
        "versions": {"mhc_compile": __version__, "torch": torch.__version__},
        "mhc_config": config.to_dict(),
        "source": source.kind,
        "source_path": str(source.path),
        "rebuild": source.meta,
        "example_inputs": input_specs(source.args, source.kwargs),
        "report": json_safe(report) if report is not None else None,
    }


def dumps(meta: dict) -> str:
    """mhc.json's text."""
    return json.dumps(meta, indent=2)


def read_mhc_json(path: Path) -> dict:
    """The parsed mhc.json of the converted directory ``path``, checked to be one this version reads."""
    try:
        meta = json.loads((path / MHC_JSON).read_text())
    except (OSError, ValueError) as exc:
        raise MHCIOError(f"{path / MHC_JSON}: unreadable: {first_line(exc)}") from None
    if not isinstance(meta, dict) or "source" not in meta or "mhc_config" not in meta:
        raise MHCIOError(f"{path / MHC_JSON}: not an mhc-compile output (missing 'source' or 'mhc_config')")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise MHCIOError(f"{path / MHC_JSON}: written by a newer mhc-compile (format {meta['format_version']})")
    return meta
