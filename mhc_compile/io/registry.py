"""The registry of source kinds: one :class:`SourceKind` entry per kind (``hf``, ``export``,
``factory``, ``pickle``, ``converted``) with the four things that differ between kinds:

``detect(src) -> bool``                 is ``src`` a source of this kind?
``read(src, options) -> Source``        read it into a :class:`Source`
``save_extras(source, directory)``      copy what a rebuild needs into a converted directory
``rebuild(directory, meta, options) -> nn.Module``
                                        the original (unconverted) model of a converted directory
                                        (``options``: a :class:`ReadOptions`; only its trust
                                        flags apply)

Everything that used to switch on the kind string (detection, reading, saving, rebuilding)
looks the kind up here instead. Kinds are registered by the modules of ``io.sources`` with
:func:`register_source_kind`; :func:`detect_kind` tries them in registration order (the first
whose ``detect`` says yes wins), and :func:`read_source` reads with the detected kind's
reader. Also defines the two types the entries exchange: :class:`Source` and :class:`ReadOptions`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import torch
from torch import nn

from .errors import MHCIOError, MHCUsageError

if TYPE_CHECKING:
    from ..pipeline import Conversion

__all__ = ["Source", "ReadOptions", "SourceKind", "register_source_kind", "get_source_kind", "source_kinds",
           "detect_kind", "read_source", "UNEXPECTED"]

# set by a kind's rebuild that loads the saved weights itself (hf: from_pretrained), read by the
# rebuild of a converted directory: the instance attribute holding the keys its loader did not take
UNEXPECTED = "_mhc_unexpected_keys"


@dataclass
class Source:
    """A model read from disk, ready to convert: the module, example inputs and how to rebuild it."""

    kind: str
    path: str
    model: nn.Module
    args: tuple
    kwargs: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)  # goes to mhc.json: what is needed to rebuild
    mhc: Optional[dict] = None  # for a converted source: the parsed mhc.json
    converted: Optional[nn.Module] = None  # for a converted source: the loaded converted module
    # for a converted directory: the conversion of the rebuilt original (its report and graph)
    conversion: Optional["Conversion"] = None


@dataclass(frozen=True)
class ReadOptions:
    """How to read a source (the options of ``mhc convert`` / ``mhc inspect``), already parsed."""

    state_dict: Optional[str] = None  # weights file for a factory or pickled module
    input_shapes: Sequence[tuple[int, ...]] = ()  # example input shapes (factory, pickle)
    input_dtypes: Sequence[torch.dtype] = ()  # one for all, or one per shape
    trust_pickle: bool = False  # unpickle a whole module (runs code from the file)
    trust_code: bool = False  # import the factory a converted directory's mhc.json names
    batch_size: int = 2  # Hugging Face example inputs
    seq_len: int = 16


@dataclass(frozen=True)
class SourceKind:
    """One kind of source and how to detect, read, save and rebuild it (module docstring)."""

    name: str
    detect: Callable[[str], bool]
    read: Callable[[str, ReadOptions], Source]
    save_extras: Callable[[Source, Path], None]
    rebuild: Callable[[Path, dict, ReadOptions], nn.Module]
    takes_state_dict: bool = False  # whether --state-dict applies to it
    # rebuild gives the original with its saved weights (hf: from_pretrained); load adds the rest
    rebuild_loads_weights: bool = False
    description: str = ""


_KINDS: dict[str, SourceKind] = {}


def register_source_kind(kind: SourceKind, *, before: Optional[str] = None) -> SourceKind:
    """Add ``kind`` to the registry: detected after the kinds registered before it, or just
    before the kind named ``before``. A name is registered once."""
    if kind.name in _KINDS:
        raise ValueError(f"source kind {kind.name!r} is already registered")
    if before is None:
        _KINDS[kind.name] = kind
        return kind
    get_source_kind(before)
    items = list(_KINDS.items())
    at = [name for name, _ in items].index(before)
    _KINDS.clear()
    _KINDS.update(items[:at] + [(kind.name, kind)] + items[at:])
    return kind


def source_kinds() -> tuple[SourceKind, ...]:
    """Every registered kind, in detection order."""
    return tuple(_KINDS.values())


def get_source_kind(name: str, where: str = "") -> SourceKind:
    """The kind registered as ``name``; an unknown name raises MHCIOError (naming ``where``)."""
    try:
        return _KINDS[name]
    except (KeyError, TypeError):
        prefix = f"{where}: " if where else ""
        raise MHCIOError(f"{prefix}unknown source kind {name!r} (known: {', '.join(_KINDS)})") from None


def _unrecognized(src: str) -> MHCIOError:
    """The error for a ``src`` that no kind accepts: say what it looks like and what to pass."""
    p = Path(src)
    if p.is_dir():
        return MHCIOError(
            f"{src}: directory has no config.json (not a Hugging Face model) and no mhc.json (not an mhc output)")
    if p.suffix == ".json":
        return MHCIOError(f"{src}: pass the model directory, not the json file inside it")
    if p.suffix == ".safetensors":
        return MHCIOError(
            f"{src}: holds weights only; pass the model directory it belongs to, or a factory with it: "
            f"mhc convert package.module:function --state-dict {src}"
        )
    if p.exists():
        return MHCIOError(f"{src}: not a model source (a directory, a .pt2 program, a pickled module or a factory)")
    return MHCUsageError(f"{src}: no such file or directory")


def detect_kind(src: str) -> str:
    """Which kind of source ``src`` is: the first registered kind whose ``detect`` accepts it."""
    p = Path(src)
    if p.is_file() and p.suffix in (".json", ".safetensors"):
        raise _unrecognized(src)  # a part of a model, not a model
    for kind in source_kinds():
        if kind.detect(src):
            return kind.name
    raise _unrecognized(src)


def read_source(
    src: str,
    *,
    state_dict: Optional[str] = None,
    input_shapes: Sequence[tuple[int, ...]] = (),
    input_dtypes: Sequence[torch.dtype] = (),
    trust_pickle: bool = False,
    trust_code: bool = False,
    batch_size: int = 2,
    seq_len: int = 16,
) -> Source:
    """Read ``src`` (any kind of :func:`detect_kind`) into a :class:`Source` with its kind's reader.

    ``input_shapes`` / ``input_dtypes`` are parsed already (``mhc_compile.cli.args`` parses the
    command-line text): tuples of ints and ``torch.dtype``s. ``trust_code`` lets the rebuild of a
    converted directory import the factory its mhc.json names (``trust_pickle``: unpickle).
    """
    kind = get_source_kind(detect_kind(src))
    if state_dict is not None and not kind.takes_state_dict:
        raise MHCUsageError(
            f"--state-dict only applies to a factory or pickled-module source, not to {kind.name} source {src}")
    options = ReadOptions(state_dict=state_dict, input_shapes=tuple(input_shapes), input_dtypes=tuple(input_dtypes),
                          trust_pickle=trust_pickle, trust_code=trust_code, batch_size=batch_size, seq_len=seq_len)
    return kind.read(src, options)
