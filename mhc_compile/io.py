"""Reading model sources, saving converted models atomically, and :func:`load` to get them back.

This module owns the on-disk format of a converted model and the sources ``mhc convert`` /
``mhc inspect`` accept (see docs/cli.md):

=================  =====================================================================
source kind        what it is
=================  =====================================================================
``hf``             a Hugging Face model directory (``config.json`` + safetensors weights,
                   as ``save_pretrained`` writes it)
``export``         a ``torch.export`` program saved with ``torch.export.save`` (``.pt2``)
``factory``        ``package.module:function`` returning an ``nn.Module``, plus an optional
                   state_dict file and example inputs
``pickle``         a whole pickled ``nn.Module`` (``.pt``); loading it runs code, so it needs
                   ``trust_pickle=True``
``converted``      an ``mhc convert`` output (a directory with ``mhc.json``, or a ``.pt2``
                   carrying ``mhc.json`` as an extra file)
=================  =====================================================================

A converted *directory* holds ``mhc.json`` (format version, the MHCConfig, the source kind,
what is needed to rebuild: architecture / factory, example input shapes and dtypes, the
residual report), ``model.safetensors`` (the converted state_dict: original names plus the mHC
parameters such as ``blocks.3.attn.mhc.phi``; tied tensors are stored once and listed under
``"tied"``), ``example_inputs.safetensors`` (the exact tensors used to capture the graph),
and for ``hf`` sources the original ``config.json``; for ``pickle`` sources ``module.pt``, the
original (unconverted) pickled module; for ``export`` sources ``source.pt2``, the original program.

:func:`load` rebuilds the original model, re-runs :func:`mhc_compile.convert` with the saved
config and example inputs, then loads the saved state_dict *strictly*. A converted ``.pt2``
is loaded with ``torch.export.load`` and returned as ``ExportedProgram.module()``.

All writes are atomic: files go to a temporary path next to the destination and are moved in
place with ``os.replace`` (directories: written into a temporary directory, then renamed).

Public API::

    load(path, *, trust_pickle=False) -> nn.Module
    read_source(src, *, state_dict=None, input_shapes=(), input_dtypes=(), trust_pickle=False,
                batch_size=2, seq_len=16) -> Source
    save_converted(converted, dst, source, config, report=None) -> str
    MHCIOError                    one-line error that names the file and what is wrong
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from .config import MHCConfig

__all__ = ["MHCIOError", "Source", "load", "read_source", "save_converted", "detect_kind", "FORMAT_VERSION"]

FORMAT_VERSION = 1
MHC_JSON = "mhc.json"
WEIGHTS = "model.safetensors"
INPUTS = "example_inputs.safetensors"
PICKLED = "module.pt"
SOURCE_PT2 = "source.pt2"

DTYPES = {
    "float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
    "float64": torch.float64, "double": torch.float64, "fp64": torch.float64,
    "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "int64": torch.int64, "long": torch.int64,
    "int32": torch.int32, "int": torch.int32,
    "bool": torch.bool,
}


class MHCIOError(RuntimeError):
    """A source or destination could not be read or written; the message is one line naming the file."""


class MHCUsageError(MHCIOError):
    """The arguments do not make sense together (the CLI exits with code 2)."""


@dataclass
class Source:
    """A model read from disk, ready to convert: the module, example inputs and how to rebuild it."""

    kind: str
    path: str
    model: nn.Module
    args: tuple
    kwargs: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)  # goes to mhc.json: what is needed to rebuild
    mhc: Optional[dict] = None  # for kind == "converted": the parsed mhc.json
    converted: Optional[nn.Module] = None  # for kind == "converted": the loaded converted module


# ----------------------------------------------------------------------------------- helpers
def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def parse_dtype(text: str) -> torch.dtype:
    try:
        return DTYPES[text.strip().lower()]
    except KeyError:
        raise MHCUsageError(f"unknown dtype {text!r}; use one of {', '.join(sorted(DTYPES))}") from None


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(p) for p in text.lower().replace(",", "x").split("x") if p.strip())
    except ValueError:
        shape = ()
    if not shape or any(s <= 0 for s in shape):
        raise MHCUsageError(f"bad input shape {text!r}; write it like 2x16 or 2x3x32x32")
    return shape


def _eval(model: nn.Module) -> nn.Module:
    """Eval mode for capture (dropout off); exported GraphModules refuse .eval() and are left as is."""
    try:
        model.eval()
    except NotImplementedError:
        pass
    return model


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' info logging and its weight-loading progress bars."""
    try:
        from transformers.utils import logging as hf_logging
    except Exception:  # pragma: no cover - transformers missing
        yield
        return
    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover
        pass
    try:
        yield
    finally:
        hf_logging.set_verbosity(old)
        try:
            hf_logging.enable_progress_bar()
        except Exception:  # pragma: no cover
            pass


def _require_transformers(path: str):
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise MHCIOError(f"{path}: reading Hugging Face models needs `pip install transformers`") from None
    return transformers


def _flatten_inputs(args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
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


def _unflatten_inputs(tensors: dict[str, torch.Tensor], num_args: Optional[int] = None) -> tuple[tuple, dict]:
    pos = {int(k.split(".", 1)[1]): v for k, v in tensors.items() if k.startswith("arg.")}
    count = num_args if num_args is not None else (max(pos) + 1 if pos else 0)
    kwargs = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("kwarg.")}
    return tuple(pos.get(i) for i in range(count)), kwargs


def input_specs(args: tuple, kwargs: dict) -> list[dict]:
    """Shapes and dtypes of the example inputs, as written to mhc.json."""
    specs = [{"name": f"arg{i}", "shape": list(a.shape), "dtype": _dtype_name(a.dtype)} if a is not None
             else {"name": f"arg{i}", "none": True} for i, a in enumerate(args)]
    specs += [{"name": k, "shape": list(v.shape), "dtype": _dtype_name(v.dtype)} for k, v in kwargs.items()]
    return specs



# --------------------------------------------------------------------------- source detection
def detect_kind(src: str) -> str:
    """Which kind of source ``src`` is: hf, export, factory, pickle or converted (see module doc)."""
    p = Path(src)
    if p.is_dir():
        if (p / MHC_JSON).is_file():
            return "converted"
        if (p / "config.json").is_file():
            return "hf"
        raise MHCIOError(
            f"{src}: directory has no config.json (not a Hugging Face model) and no mhc.json (not an mhc output)"
        )
    if p.is_file():
        if p.suffix == ".pt2":
            try:
                with zipfile.ZipFile(p) as zf:
                    names = zf.namelist()
            except (zipfile.BadZipFile, OSError) as exc:
                raise MHCIOError(f"{src}: not a torch.export program (.pt2 zip archive): {_first_line(exc)}") from None
            if any(n.endswith("extra/" + MHC_JSON) or n.endswith("/" + MHC_JSON) for n in names):
                return "converted"
            return "export"
        if p.suffix in (".json",):
            raise MHCIOError(f"{src}: pass the model directory, not the json file inside it")
        if p.suffix == ".safetensors":
            raise MHCIOError(
                f"{src}: holds weights only; pass the model directory it belongs to, or a factory with it: "
                f"mhc convert package.module:function --state-dict {src}"
            )
        return "pickle"
    if ":" in src and not os.sep in src.split(":", 1)[0]:
        return "factory"
    raise MHCUsageError(f"{src}: no such file or directory")


def read_source(
    src: str,
    *,
    state_dict: Optional[str] = None,
    input_shapes: Sequence[str] = (),
    input_dtypes: Sequence[str] = (),
    trust_pickle: bool = False,
    batch_size: int = 2,
    seq_len: int = 16,
) -> Source:
    """Read ``src`` (any kind of :func:`detect_kind`) into a :class:`Source`."""
    kind = detect_kind(src)
    if state_dict is not None and kind not in ("factory", "pickle"):
        raise MHCUsageError(f"--state-dict only applies to a factory or pickled-module source, not to {kind} source {src}")
    if kind == "hf":
        return _read_hf(src, batch_size=batch_size, seq_len=seq_len)
    if kind == "export":
        return _read_export(src)
    if kind == "factory":
        return _read_factory(src, state_dict, input_shapes, input_dtypes)
    if kind == "pickle":
        return _read_pickle(src, state_dict, input_shapes, input_dtypes, trust_pickle)
    return _read_converted(src, trust_pickle=trust_pickle)


# ---- Hugging Face
def _hf_class(transformers, config, path: str):
    archs = list(getattr(config, "architectures", None) or [])
    for arch in archs:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls, arch
    if archs:
        raise MHCIOError(f"{path}: architecture {archs[0]!r} from config.json is not in transformers {transformers.__version__}")
    return transformers.AutoModel, "AutoModel"


def _hf_config(path: str):
    transformers = _require_transformers(path)
    try:
        with _quiet_transformers():
            config = transformers.AutoConfig.from_pretrained(path)
    except Exception as exc:
        raise MHCIOError(f"{path}/config.json: cannot read the model config: {_first_line(exc)}") from None
    if hasattr(config, "use_cache"):
        config.use_cache = False  # a KV cache in the outputs cannot be captured by torch.export
    return transformers, config


def _check_hf_weight_files(path: str) -> None:
    """Open every safetensors file of an HF directory, so a corrupt one is named in the error
    (transformers' own message names neither the file nor what is wrong with it)."""
    from safetensors import safe_open

    for f in sorted(Path(path).glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as handle:
                handle.keys()
        except Exception as exc:
            raise MHCIOError(f"{f}: not a readable safetensors file: {_first_line(exc)}") from None


def _hf_build(transformers, config, path: str, weights: bool) -> tuple[nn.Module, str]:
    cls, arch = _hf_class(transformers, config, path)
    if weights:
        _check_hf_weight_files(path)
    try:
        with _quiet_transformers():
            if weights:
                model = cls.from_pretrained(path, config=config)
            elif cls is transformers.AutoModel:
                model = cls.from_config(config)
            else:
                model = cls(config)
    except Exception as exc:
        raise MHCIOError(f"{path}: cannot build {arch} from config.json and its weights: {_first_line(exc)}") from None
    return model.eval(), arch


def hf_example_inputs(config, batch_size: int = 2, seq_len: int = 16, generator: Optional[torch.Generator] = None):
    """Example inputs for a transformers model, from its config.

    Vision models (config has ``image_size`` and ``num_channels``): ``pixel_values`` of shape
    (batch, num_channels, image_size, image_size), standard normal. Text models (``vocab_size``):
    ``input_ids`` of shape (batch, seq_len) uniform in [0, vocab_size), seq_len capped at
    ``max_position_embeddings``; encoder-decoder models also get ``decoder_input_ids``.
    """
    g = generator or torch.Generator().manual_seed(0)
    image_size = getattr(config, "image_size", None)
    channels = getattr(config, "num_channels", None)
    if image_size is not None and channels is not None:
        hw = tuple(image_size) if isinstance(image_size, (list, tuple)) else (image_size, image_size)
        return (torch.randn(batch_size, channels, *hw, generator=g),), {}
    vocab = getattr(config, "vocab_size", None)
    if vocab:
        for attr in ("max_position_embeddings", "n_positions", "n_ctx"):
            limit = getattr(config, attr, None)
            if isinstance(limit, int) and limit > 0:
                seq_len = min(seq_len, limit)
                break
        ids = torch.randint(0, vocab, (batch_size, seq_len), generator=g)
        if getattr(config, "is_encoder_decoder", False):
            return (ids,), {"decoder_input_ids": torch.randint(0, vocab, (batch_size, seq_len), generator=g)}

        return (ids,), {}
    raise MHCIOError(
        f"cannot make example inputs for model type {getattr(config, 'model_type', '?')!r}: "
        "its config has neither vocab_size (text) nor image_size/num_channels (vision)"
    )


def _read_hf(path: str, batch_size: int, seq_len: int) -> Source:
    transformers, config = _hf_config(path)
    model, arch = _hf_build(transformers, config, path, weights=True)
    try:
        args, kwargs = hf_example_inputs(config, batch_size, seq_len)
        args, kwargs = positional_inputs(model, args, kwargs), {}
    except MHCIOError as exc:
        raise MHCIOError(f"{path}: {exc}") from None
    meta = {"architecture": arch, "model_type": getattr(config, "model_type", None), "config_overrides": {"use_cache": False}}
    return Source("hf", path, model, args, kwargs, meta)


# ---- torch.export
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


def _register_output_types(meta: Optional[dict]) -> None:
    """Import the transformers model class a converted program came from: its ModelOutput
    classes register their pytree serialisation names on import, which deserialising needs.
    Only a class of the installed ``transformers`` package, by name, is imported."""
    if not meta or meta.get("source") != "hf":
        return
    arch = (meta.get("rebuild") or {}).get("architecture")
    try:
        import transformers
        import transformers.modeling_outputs  # noqa: F401

        if isinstance(arch, str) and arch.isidentifier():
            getattr(transformers, arch, None)
    except Exception:  # best effort; the load below reports what is missing
        pass


def _load_pt2(path: str, extra: Optional[dict] = None):
    from . import ops  # noqa: F401  (registers the mhc:: ops a converted program refers to)

    _register_output_types(_peek_mhc_json(path))
    try:
        return torch.export.load(path, extra_files=extra)
    except Exception as exc:
        raise MHCIOError(f"{path}: cannot load the torch.export program: {_first_line(exc)}") from None


def _export_inputs(ep, path: str) -> tuple[tuple, dict]:
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


def _read_export(path: str) -> Source:
    ep = _load_pt2(path)
    args, kwargs = _export_inputs(ep, path)
    return Source("export", path, ep.module(), args, kwargs, {})


# ---- factory
def _cwd_on_path() -> None:
    """Like ``python -m``: modules in the current directory can be imported (factories, pickles)."""
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())


def _import_factory(spec: str):
    mod_name, _, fn_name = spec.partition(":")
    if not mod_name or not fn_name:
        raise MHCUsageError(f"{spec}: a factory is written package.module:function")
    _cwd_on_path()
    try:
        module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise MHCIOError(f"{spec}: cannot import module {mod_name!r}: {_first_line(exc)}") from None
    obj = module
    for part in fn_name.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise MHCIOError(f"{spec}: module {mod_name!r} has no attribute {fn_name!r}")
    if not callable(obj):
        raise MHCIOError(f"{spec}: {fn_name!r} is not callable")
    return module, obj


def _call_factory(spec: str) -> tuple[Any, nn.Module]:
    module, fn = _import_factory(spec)
    try:
        model = fn()
    except Exception as exc:
        raise MHCIOError(f"{spec}: calling the factory failed: {type(exc).__name__}: {_first_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise MHCIOError(f"{spec}: the factory returned a {type(model).__name__}, not an nn.Module")
    return module, model


def _load_state_dict_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise MHCUsageError(f"{path}: no such file")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(p))
        else:
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise MHCIOError(f"{path}: cannot read the state_dict: {_first_line(exc)}") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise MHCIOError(f"{path}: is not a state_dict (a dict of name -> tensor)")
    return sd


def _apply_state_dict(model: nn.Module, sd: dict, path: str) -> None:
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        msg = " ".join(str(exc).split())
        raise MHCIOError(f"{path}: does not fit the model: {msg[:300]}") from None


def _make_inputs(model: nn.Module, shapes: Sequence[str], dtypes: Sequence[str]) -> tuple[tuple, list[dict]]:
    """Inputs from --input-shape/--input-dtype: floats ~ N(0,1); integers uniform in [0, high).

    ``high`` is the smallest ``num_embeddings`` of the model's ``nn.Embedding`` layers (so token
    ids are always valid), or 2 when the model has none.
    """
    if not shapes:
        raise MHCUsageError(
            "the model needs example inputs: pass --input-shape (e.g. --input-shape 2x16 --input-dtype long) "
            "or give the factory module an example_inputs() function"
        )
    if dtypes and len(dtypes) not in (1, len(shapes)):
        raise MHCUsageError(f"give one --input-dtype, or one per --input-shape ({len(shapes)}), not {len(dtypes)}")
    dts = [parse_dtype(d) for d in dtypes] or [torch.float32]
    if len(dts) == 1:
        dts = dts * len(shapes)
    emb = [m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)]
    high = min(emb) if emb else 2
    g = torch.Generator().manual_seed(0)
    args = []
    for s, dt in zip(shapes, dts):
        shape = parse_shape(s)
        if dt.is_floating_point:
            args.append(torch.randn(shape, generator=g).to(dt))
        elif dt == torch.bool:
            args.append(torch.randint(0, 2, shape, generator=g).bool())
        else:
            args.append(torch.randint(0, high, shape, generator=g).to(dt))
    return tuple(args), input_specs(tuple(args), {})


def _normalize_inputs(ex: Any, where: str) -> tuple[tuple, dict]:
    if isinstance(ex, torch.Tensor):
        return (ex,), {}
    if isinstance(ex, dict):
        return (), dict(ex)
    if isinstance(ex, (tuple, list)):
        if len(ex) == 2 and isinstance(ex[0], (tuple, list)) and isinstance(ex[1], dict):
            return tuple(ex[0]), dict(ex[1])
        return tuple(ex), {}
    raise MHCIOError(f"{where}: example_inputs() must return a tensor, a tuple of tensors or (args, kwargs)")


def _read_factory(spec: str, state_dict: Optional[str], shapes, dtypes) -> Source:
    module, model = _call_factory(spec)
    if state_dict is not None:
        _apply_state_dict(model, _load_state_dict_file(state_dict), state_dict)
    _eval(model)
    if shapes:
        args, _ = _make_inputs(model, shapes, dtypes)
        kwargs = {}
    elif callable(getattr(module, "example_inputs", None)):
        args, kwargs = _normalize_inputs(module.example_inputs(), f"{spec.partition(':')[0]}.example_inputs")
    else:
        args, _ = _make_inputs(model, shapes, dtypes)  # raises the usage error
        kwargs = {}
    return Source("factory", spec, model, args, kwargs, {"factory": spec})


# ---- pickled module
def _read_pickle(path: str, state_dict, shapes, dtypes, trust: bool) -> Source:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        safe_error = exc
        obj = None
    else:
        safe_error = None
    if safe_error is None:
        if isinstance(obj, dict):
            raise MHCIOError(
                f"{path}: is a state_dict, not a model; pass a factory with it: "
                f"mhc convert package.module:function --state-dict {path} ..."
            )
        raise MHCIOError(f"{path}: holds a {type(obj).__name__}, not an nn.Module")
    if not trust:
        if isinstance(safe_error, (zipfile.BadZipFile, EOFError)) or "pickle" not in str(safe_error).lower() and "weights_only" not in str(safe_error):
            raise MHCIOError(f"{path}: not a readable torch file: {_first_line(safe_error)}")
        raise MHCIOError(
            f"{path}: is a pickled object; loading it runs arbitrary code from the file, "
            "so it needs --trust-pickle (only for files you trust)"
        )
    _cwd_on_path()
    try:
        model = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise MHCIOError(f"{path}: cannot unpickle: {type(exc).__name__}: {_first_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise MHCIOError(f"{path}: holds a {type(model).__name__}, not an nn.Module")
    if state_dict is not None:
        _apply_state_dict(model, _load_state_dict_file(state_dict), state_dict)
    _eval(model)
    args, _ = _make_inputs(model, shapes, dtypes)
    return Source("pickle", path, model, args, {}, {})


# ---- converted
def _read_mhc_json(path: Path) -> dict:
    try:
        meta = json.loads((path / MHC_JSON).read_text())
    except (OSError, ValueError) as exc:
        raise MHCIOError(f"{path / MHC_JSON}: unreadable: {_first_line(exc)}") from None
    if not isinstance(meta, dict) or "source" not in meta or "mhc_config" not in meta:
        raise MHCIOError(f"{path / MHC_JSON}: not an mhc-compile output (missing 'source' or 'mhc_config')")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise MHCIOError(f"{path / MHC_JSON}: written by a newer mhc-compile (format {meta['format_version']})")
    return meta


def _read_converted(path: str, trust_pickle: bool = False) -> Source:
    p = Path(path)
    if p.is_file():  # converted .pt2
        extra = {MHC_JSON: ""}
        ep = _load_pt2(path, extra)
        try:
            meta = json.loads(extra[MHC_JSON])
        except ValueError:
            raise MHCIOError(f"{path}: its mhc.json is not valid json") from None
        args, kwargs = _export_inputs(ep, path)
        mod = ep.module()
        return Source("converted", path, mod, args, kwargs, meta.get("rebuild", {}), mhc=meta, converted=mod)
    meta = _read_mhc_json(p)
    original, args, kwargs = _rebuild_original(p, meta, trust_pickle)
    converted = _convert_rebuilt(p, meta, original, args, kwargs)
    return Source("converted", path, original, args, kwargs, meta.get("rebuild", {}), mhc=meta, converted=converted)


# ------------------------------------------------------------------------------ conversion glue
def positional_inputs(model: nn.Module, args: tuple, kwargs: dict) -> tuple:
    """``args`` plus ``kwargs`` as one tuple of positional arguments of ``model.forward``, with
    None for the parameters skipped in between (``mhc_compile.convert`` takes positional inputs)."""
    if not kwargs:
        return tuple(args)
    import inspect

    names = [p.name for p in inspect.signature(model.forward).parameters.values()
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    out = list(args)
    for key, val in kwargs.items():
        if key not in names:
            raise MHCIOError(f"example input {key!r} is not a positional parameter of {type(model).__name__}.forward")
        i = names.index(key)
        if i < len(args):
            raise MHCIOError(f"example input {key!r} is given twice (positionally and by name)")
        out += [None] * (i + 1 - len(out))
        out[i] = val
    return tuple(out)


def convert_source(source: Source, config: MHCConfig) -> nn.Module:
    """``mhc_compile.convert`` on a source's model with its example inputs (in the source's mode)."""
    from .convert import convert

    return convert(source.model, config, positional_inputs(source.model, source.args, source.kwargs))


def find_source_residuals(source: Source, config: Optional[MHCConfig] = None):
    """``mhc_compile.find_residuals`` on a source's model with its example inputs."""
    from .convert import find_residuals

    return find_residuals(source.model, positional_inputs(source.model, source.args, source.kwargs), config)


# ------------------------------------------------------------------------------------- saving
def _dedup_state_dict(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors stored once: a key whose tensor is the same view of the same storage as an earlier
    key's becomes an entry of ``tied`` (name -> name it is tied to)."""
    out, tied, seen = {}, {}, {}
    for k, v in sd.items():
        v = v.detach()
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()), v.dtype) if v.numel() else None
        if key is not None and key in seen:
            tied[k] = seen[key]
            continue
        if key is not None:
            seen[key] = k
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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _atomic_path(dst: Path, is_dir: bool):
    """Yield a temporary path next to ``dst``; on success move it onto ``dst`` (os.replace)."""
    parent = dst.parent if str(dst.parent) else Path(".")
    if not parent.is_dir():
        raise MHCIOError(f"{dst}: cannot write: {parent} is not a directory")
    if dst.exists():
        if dst.is_dir() != is_dir:
            raise MHCIOError(f"{dst}: exists and is a {'directory' if dst.is_dir() else 'file'}; refusing to replace it")
        if is_dir and any(dst.iterdir()) and not (dst / MHC_JSON).exists():
            raise MHCIOError(f"{dst}: exists, is not empty and is not an mhc output; refusing to overwrite it")
    try:
        if is_dir:
            tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=parent))
        else:
            fd, name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=f".tmp{dst.suffix}", dir=parent)
            os.close(fd)
            tmp = Path(name)
    except OSError as exc:  # the temporary path next to dst could not be made: say where
        raise MHCIOError(f"{dst}: cannot write in {parent}: {exc.strerror or _first_line(exc)}") from None
    try:
        os.chmod(tmp, (0o777 if is_dir else 0o666) & ~_umask())  # mkstemp/mkdtemp make them private
        yield tmp
        if is_dir:
            for f in tmp.iterdir():  # some writers (safetensors) create private files
                if f.is_file():
                    os.chmod(f, 0o666 & ~_umask())
            if dst.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".old", dir=parent))
                os.replace(dst, old / "x")
                os.replace(tmp, dst)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, dst)
        else:
            os.replace(tmp, dst)
    except OSError as exc:
        raise MHCIOError(f"{dst}: cannot write: {exc.strerror or _first_line(exc)}") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink()


def _json_safe(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: repr(o)))


def _mhc_meta(source: Source, config: MHCConfig, report: Any) -> dict:
    from . import __version__

    return {
        "format_version": FORMAT_VERSION,
        "versions": {"mhc_compile": __version__, "torch": torch.__version__},
        "mhc_config": config.to_dict(),
        "source": source.kind,
        "source_path": str(source.path),
        "rebuild": source.meta,
        "example_inputs": input_specs(source.args, source.kwargs),
        "report": _json_safe(report) if report is not None else None,
    }


def save_converted(converted: nn.Module, dst: str, source: Source, config: MHCConfig, report: Any = None) -> str:
    """Write a converted model atomically to ``dst``: a ``.pt2`` file or a directory (module doc).

    ``report`` is a JSON-able dict (the residual report), stored in mhc.json for ``mhc inspect``.
    Returns the path written.
    """
    d = Path(dst)
    meta = _mhc_meta(source, config, report)
    if d.suffix == ".pt2":
        return _save_pt2(converted, d, source, meta)
    if source.kind == "converted":
        raise MHCUsageError(f"{source.path}: is already an mhc output; convert the original model instead")
    from safetensors.torch import save_file

    sd, tied = _dedup_state_dict(converted.state_dict())
    meta["tied"] = tied
    with _atomic_path(d, is_dir=True) as tmp:
        try:
            save_file(sd, str(tmp / WEIGHTS), metadata={"format": "pt", "mhc_compile": "1"})
            save_file(_flatten_inputs(source.args, source.kwargs), str(tmp / INPUTS))
            if source.kind == "hf":
                for name in ("config.json", "generation_config.json"):
                    if (Path(source.path) / name).is_file():
                        shutil.copy2(Path(source.path) / name, tmp / name)
            elif source.kind == "pickle":
                shutil.copy2(source.path, tmp / PICKLED)
            elif source.kind == "export":
                shutil.copy2(source.path, tmp / SOURCE_PT2)
            (tmp / MHC_JSON).write_text(json.dumps(meta, indent=2) + "\n")
        except OSError as exc:
            raise MHCIOError(f"{dst}: cannot write: {exc.strerror or _first_line(exc)}") from None
    return str(d)


def _save_pt2(converted: nn.Module, dst: Path, source: Source, meta: dict) -> str:
    try:
        ep = torch.export.export(converted, source.args, source.kwargs or None)
    except Exception as exc:
        raise MHCIOError(f"{dst}: cannot re-export the converted model: {type(exc).__name__}: {_first_line(exc)}") from None
    with _atomic_path(dst, is_dir=False) as tmp:
        try:
            torch.export.save(ep, str(tmp), extra_files={MHC_JSON: json.dumps(meta, indent=2)})
        except OSError as exc:
            raise MHCIOError(f"{dst}: cannot write: {exc.strerror or _first_line(exc)}") from None
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
            f"{dst}: the re-exported program cannot be loaded back ({type(exc).__name__}: {_first_line(exc)}); "
            "write a directory output instead"
        ) from None
    finally:
        logger.setLevel(level)


# ------------------------------------------------------------------------------------ loading
def _rebuild_original(path: Path, meta: dict, trust_pickle: bool) -> tuple[nn.Module, tuple, dict]:
    """The unconverted model (fresh weights) and the saved example inputs of a converted directory."""
    kind = meta["source"]
    rebuild = meta.get("rebuild", {})
    if kind == "hf":
        transformers, config = _hf_config(str(path))
        for k, v in (rebuild.get("config_overrides") or {}).items():
            setattr(config, k, v)
        model, _ = _hf_build(transformers, config, str(path), weights=False)
    elif kind == "factory":
        _, model = _call_factory(rebuild["factory"])
    elif kind == "pickle":
        if not trust_pickle:
            raise MHCIOError(
                f"{path}: was converted from a pickled module ({PICKLED}); rebuilding it runs code from "
                "that file, so it needs trust_pickle=True (--trust-pickle)"
            )
        _cwd_on_path()
        try:
            model = torch.load(str(path / PICKLED), map_location="cpu", weights_only=False)
        except Exception as exc:
            raise MHCIOError(f"{path / PICKLED}: cannot unpickle: {_first_line(exc)}") from None
    elif kind == "export":
        model = _load_pt2(str(path / SOURCE_PT2)).module()
    else:
        raise MHCIOError(f"{path / MHC_JSON}: unknown source kind {kind!r}")
    _eval(model)
    from safetensors.torch import load_file

    try:
        num_args = len([s for s in meta.get("example_inputs", []) if str(s.get("name", "")).startswith("arg")])
        args, kwargs = _unflatten_inputs(load_file(str(path / INPUTS)), num_args)
    except Exception as exc:
        raise MHCIOError(f"{path / INPUTS}: unreadable: {_first_line(exc)}") from None
    return model, args, kwargs


def _convert_rebuilt(path: Path, meta: dict, original: nn.Module, args, kwargs) -> nn.Module:
    from safetensors.torch import load_file

    config = MHCConfig.from_dict(meta["mhc_config"])
    src = Source(meta["source"], str(path), original, args, kwargs)
    converted = convert_source(src, config)
    try:
        sd = load_file(str(path / WEIGHTS))
    except Exception as exc:
        raise MHCIOError(f"{path / WEIGHTS}: unreadable: {_first_line(exc)}") from None
    for name, target in (meta.get("tied") or {}).items():
        if target in sd:
            sd[name] = sd[target]
    try:
        converted.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        msg = " ".join(str(exc).split())
        raise MHCIOError(f"{path / WEIGHTS}: does not match the rebuilt model: {msg[:300]}") from None
    return converted


def load(path: str | os.PathLike, *, trust_pickle: bool = False) -> nn.Module:
    """Load a model written by ``mhc convert`` (or :func:`save_converted`) as a trainable module.

    Directory outputs are rebuilt (original model from its config / factory / pickled module,
    then :func:`mhc_compile.convert` with the saved MHCConfig and example inputs) and the saved
    weights are loaded strictly, so outputs match the converted model exactly. ``.pt2`` outputs
    come back as ``torch.export.load(path).module()``. Sources converted from a pickled module
    need ``trust_pickle=True``.
    """
    p = Path(path)
    if not p.exists():
        raise MHCIOError(f"{p}: no such file or directory")
    if p.is_file():
        if p.suffix != ".pt2":
            raise MHCIOError(f"{p}: not an mhc output (expected a directory with mhc.json or a .pt2 file)")
        return _load_pt2(str(p)).module()
    if not (p / MHC_JSON).is_file():
        raise MHCIOError(f"{p}: directory has no mhc.json; not an mhc convert output")
    meta = _read_mhc_json(p)
    original, args, kwargs = _rebuild_original(p, meta, trust_pickle)
    return _convert_rebuilt(p, meta, original, args, kwargs)
