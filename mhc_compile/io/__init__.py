"""Reading model sources, saving converted models atomically, and :func:`load` to get them back.

The sources ``mhc convert`` / ``mhc inspect`` accept (see docs/cli.md), one registry entry each
(``registry.py``; the readers are in ``sources/``):

=================  =====================================================================
source kind        what it is
=================  =====================================================================
``hf``             a Hugging Face model directory (``config.json`` + safetensors weights,
                   as ``save_pretrained`` writes it)
``export``         a ``torch.export`` program saved with ``torch.export.save`` (``.pt2``)
``factory``        ``package.module:function`` returning an ``nn.Module``, plus an optional
                   state_dict file and example inputs; rebuilding a converted directory
                   imports it again, so it needs ``trust_code=True``
``pickle``         a whole pickled ``nn.Module`` (``.pt``); loading it runs code, so it needs
                   ``trust_pickle=True``
``converted``      an ``mhc convert`` output (a directory with ``mhc.json``, or a ``.pt2``
                   carrying ``mhc.json`` as an extra file)
=================  =====================================================================

A converted *directory* holds ``mhc.json``, ``model.safetensors`` (tied tensors stored once),
``example_inputs.safetensors`` (``format.py``), and what its source kind needs to rebuild:
for ``hf`` the original ``config.json``, for ``pickle`` ``module.pt`` (the original pickled
module), for ``export`` ``source.pt2`` (the original program). :func:`load` rebuilds the
original model, runs the conversion pipeline (``mhc_compile.pipeline``, the one ``mhc_compile.convert``
runs) with the saved config and example inputs, then loads the saved state_dict strictly
(``rebuild.py``). A converted ``.pt2`` is loaded with
``torch.export.load`` and returned as ``ExportedProgram.module()``. All writes are atomic
(``atomic.py``).

Modules: ``errors`` (MHCIOError, MHCUsageError), ``format`` (on-disk format), ``atomic``
(atomic writes), ``examples`` (example inputs), ``hub`` (the mark in an HF output's
config.json), ``registry`` (source kinds, detection, :func:`read_source`), ``sources/`` (one
reader per kind), ``save`` (:func:`save_converted`), ``pretrained`` (``save_pretrained`` of a
converted HF model), ``rebuild`` (a converted directory rebuilt and converted again), ``load``
(:func:`load`). Persistence only: converting is ``mhc_compile.pipeline``'s, which imports
nothing from here.

Public API::

    load(path, *, trust_pickle=False, trust_code=False) -> nn.Module
    read_source(src, *, state_dict=None, input_shapes=(), input_dtypes=(), trust_pickle=False,
                trust_code=False, batch_size=2, seq_len=16) -> Source
    save_converted(converted, dst, source, config, report=None) -> str
    atomic_path(dst, is_dir) / atomic_write_text(path, text)     atomic writes
    check_destination(dst, is_dir)  the refusals of atomic_path, before any work
    register_source_kind(SourceKind(...)) / get_source_kind(name) / detect_kind(src)
    MHCIOError                    one-line error that names the file and what is wrong
"""
from __future__ import annotations

from .sources import BUILTIN_KINDS  # importing sources registers the built-in kinds
from .atomic import atomic_path, atomic_write_text, check_destination
from .errors import MHCIOError, MHCUsageError, first_line
from .examples import hf_example_inputs, make_inputs, normalize_inputs
from .format import FORMAT_VERSION, MHC_JSON, dedup_state_dict, input_specs, read_mhc_json
from .load import load
from .registry import (
    ReadOptions,
    Source,
    SourceKind,
    detect_kind,
    get_source_kind,
    read_source,
    register_source_kind,
    source_kinds,
)
from .save import save_converted

__all__ = [
    "MHCIOError", "MHCUsageError", "Source", "load", "read_source", "save_converted", "detect_kind",
    "FORMAT_VERSION", "MHC_JSON", "atomic_path", "atomic_write_text", "check_destination", "first_line",
    "hf_example_inputs", "make_inputs", "normalize_inputs", "dedup_state_dict",
    "input_specs", "read_mhc_json", "ReadOptions", "SourceKind", "get_source_kind",
    "register_source_kind", "source_kinds", "BUILTIN_KINDS",
]
