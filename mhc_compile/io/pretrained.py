"""``save_pretrained`` of a converted Hugging Face model: an HF directory that ``mhc_compile.load``
turns back into the same class.

:func:`mhc_compile.convert` binds :func:`save_pretrained` on a ``transformers.PreTrainedModel``
it converts (an instance attribute; the class is untouched). It runs the class's own
``save_pretrained`` (``config.json``, ``generation_config.json``, safetensors weights in
transformers' checkpoint key names, sharded when large; its keyword arguments pass through) and
adds what the converted-directory format of ``io.format`` needs: ``mhc.safetensors`` (the mHC
parameters under their own names: transformers renames checkpoint keys on save for some
families, ours too; the class's weights file holds them as well, for ``Trainer`` resume),
``mhc.json`` (source kind ``hf``, MHCConfig, report) and ``example_inputs.safetensors``.
``mhc convert`` on an HF directory writes the same kind of directory.

Writes are atomic per file (``atomic.atomic_files``): everything goes to a temporary directory next
to the destination first; then the old ``mhc.json`` is removed, each file is moved in with
``os.replace`` (stale weight shards of an older save are removed), and ``mhc.json`` comes last, so a crash leaves
either the old output or a directory without ``mhc.json`` that :func:`mhc_compile.load`
refuses, never a mix. Files the directory already holds (a Trainer checkpoint's optimizer
state) are kept.

``config.json`` is marked (``io.hub``) so that plain ``transformers`` (``AutoModel``, the class's
``from_pretrained``, ``SentenceTransformer``) refuses the directory with a message naming
:func:`mhc_compile.load`, instead of building the unconverted model, a different function.
"""
from __future__ import annotations

import os
import sys
import types
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from ..forms.state import set_state, state_of
from .atomic import atomic_files
from .errors import MHCIOError
from .format import INPUTS, MHC_JSON, MHC_WEIGHTS, dumps, flatten_inputs, mhc_meta, tied_names
from .hub import mark_config
from .registry import Source

if TYPE_CHECKING:
    from ..example_call import ExampleCall

_WEIGHT_PREFIXES = ("model.safetensors", "model-", "pytorch_model")


def is_pretrained(model: nn.Module) -> bool:
    """True for a ``transformers.PreTrainedModel`` (without importing transformers)."""
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(model, getattr(transformers, "PreTrainedModel", ()))


def bind_save_pretrained(model: nn.Module, call: "ExampleCall") -> None:
    """Make ``model.save_pretrained`` write a converted HF directory (``call``: the example call of
    the conversion, kept in the model's state, whose inputs are saved so :func:`mhc_compile.load`
    converts the same way)."""
    set_state(model, replace(state_of(model), example=call))
    model.save_pretrained = types.MethodType(save_pretrained, model)


def save_pretrained(self: nn.Module, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
    """The class's ``save_pretrained`` plus ``mhc.json`` and the example inputs (see the module)."""
    if kwargs.get("push_to_hub"):
        raise MHCIOError("save_pretrained(push_to_hub=True) of an mhc-converted model: save to a directory, "
                         "then upload that directory (it holds mhc.json, which the hub upload would miss)")
    dst = Path(save_directory)
    if not kwargs.get("is_main_process", True):
        return type(self).save_pretrained(self, str(dst), *args, **kwargs)
    mhc = state_of(self)
    ex_args = tuple(mhc.example.args)
    ex_kwargs = {k: v for k, v in mhc.example.kwargs.items() if v is not None and hasattr(v, "shape")}
    config = self.config
    source = Source("hf", str(dst), self, ex_args, ex_kwargs,
                    {"architecture": type(self).__name__, "model_type": getattr(config, "model_type", None)})
    meta = mhc_meta(source, mhc.config, mhc.report.to_dict())
    meta["tied"] = tied_names(self.state_dict())
    with atomic_files(dst, stale=_WEIGHT_PREFIXES) as tmp:
        from safetensors.torch import save_file

        state = kwargs.pop("state_dict", None)
        state = dict(self.state_dict() if state is None else state)
        # the mHC parameters go to the class's weights too (Trainer's resume_from_checkpoint reads
        # those by name), and to mhc.safetensors under their own names, which load reads
        added = {k: state[k] for k in mhc.report.param_names if k in state}
        type(self).save_pretrained(self, str(tmp), *args, state_dict=state, **kwargs)
        if (tmp / "config.json").is_file():
            mark_config(tmp / "config.json")  # plain transformers refuses it, naming mhc_compile.load
        save_file({k: v.detach().contiguous() for k, v in added.items()}, str(tmp / MHC_WEIGHTS),
                  metadata={"format": "pt", "mhc_compile": "1"})
        save_file(flatten_inputs(ex_args, ex_kwargs), str(tmp / INPUTS))
        (tmp / MHC_JSON).write_text(dumps(meta) + "\n")
