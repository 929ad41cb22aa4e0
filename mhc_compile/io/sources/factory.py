"""The ``factory`` source kind: ``package.module:function`` returning an ``nn.Module``, plus an
optional state_dict file (``--state-dict``) and example inputs (``--input-shape`` /
``--input-dtype``, else the module's ``example_inputs()`` function).

A converted directory records the factory spec in mhc.json; rebuilding imports and calls it
again, which runs code that the directory names: refused unless the caller trusts it
(``trust_code=True``, ``--trust-code``). This package never changes ``sys.path``; the CLI makes
the current directory importable (``cwd_on_path``) only for code the user named or trusted.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import MHCIOError, MHCUsageError, first_line
from ..examples import make_checked_inputs, normalize_inputs
from ..format import MHC_JSON
from ..registry import ReadOptions, Source, SourceKind
from .common import apply_state_dict, eval_mode


def _import_factory(spec: str):
    mod_name, _, fn_name = spec.partition(":")
    if not mod_name or not fn_name:
        raise MHCUsageError(f"{spec}: a factory is written package.module:function")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise MHCIOError(f"{spec}: cannot import module {mod_name!r}: {first_line(exc)}") from None
    obj = module
    for part in fn_name.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise MHCIOError(f"{spec}: module {mod_name!r} has no attribute {fn_name!r}")
    if not callable(obj):
        raise MHCIOError(f"{spec}: {fn_name!r} is not callable")
    return module, obj


def call_factory(spec: str) -> tuple[Any, nn.Module]:
    """Import and call the factory ``spec``: (its module, the model it returned)."""
    module, fn = _import_factory(spec)
    try:
        model = fn()
    except Exception as exc:
        raise MHCIOError(f"{spec}: calling the factory failed: {type(exc).__name__}: {first_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise MHCIOError(f"{spec}: the factory returned a {type(model).__name__}, not an nn.Module")
    return module, model


def detect(src: str) -> bool:
    return ":" in src and os.sep not in src.split(":", 1)[0] and not Path(src).exists()


def read(spec: str, options: ReadOptions) -> Source:
    module, model = call_factory(spec)
    if options.state_dict is not None:
        apply_state_dict(model, options.state_dict)
    eval_mode(model)
    if not options.input_shapes and callable(getattr(module, "example_inputs", None)):
        args, kwargs = normalize_inputs(module.example_inputs(), f"{spec.partition(':')[0]}.example_inputs")
    else:  # without shapes this raises the usage error that asks for them
        args, kwargs = make_checked_inputs(model, options.input_shapes, options.input_dtypes), {}
    return Source("factory", spec, model, args, kwargs, {"factory": spec})


def save_extras(source: Source, directory: Path) -> None:
    pass  # the factory spec in mhc.json is all a rebuild needs


def rebuild(directory: Path, meta: dict, options: ReadOptions) -> nn.Module:
    spec = (meta.get("rebuild") or {}).get("factory")
    if not isinstance(spec, str):
        raise MHCIOError(f"{directory / MHC_JSON}: names no factory to rebuild the model with")
    if not options.trust_code:
        raise MHCIOError(
            f"{directory / MHC_JSON}: names the factory {spec!r}; rebuilding the model imports and runs that code, "
            "so it needs trust_code=True (mhc: --trust-code), only for directories you trust")
    _, model = call_factory(spec)
    return model


KIND = SourceKind(
    "factory", detect, read, save_extras, rebuild, takes_state_dict=True,
    description="package.module:function returning an nn.Module (weights from --state-dict)",
)
