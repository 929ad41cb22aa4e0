"""The ``config.json`` of a converted Hugging Face directory, marked so that plain ``transformers``
refuses it with a message that names :func:`mhc_compile.load`, instead of building the
unconverted model silently (``AutoModel.from_pretrained``, the class's ``from_pretrained``,
``SentenceTransformer(dir)``: all parse ``config.json`` with the model's own config class).

The mark (:func:`mark_config`): one integer field of the model's config (``hidden_size``, ...)
holds :data:`LOAD_HINT` instead of its value, and ``config.json["mhc_compile"]`` keeps the
field's name and value. transformers 5 validates config fields by type, so every parse of the
marked file fails with ``Field 'hidden_size' expected int, got str (value: '... load it with
mhc_compile.load(path)')``. The field is chosen by trying: it must be one the config class
checks (the mark is verified before it is written); where none is (an older transformers that
does not validate), the file is left unmarked. The base ``PretrainedConfig`` does not know the
field, so ``Trainer(resume_from_checkpoint=...)``, which reads ``config.json`` with it, still
works. :func:`original_config` undoes the mark for ``mhc_compile.load``. Why not transformers'
custom-code mechanism or a weight-file variant: docs/huggingface.md.
"""
from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Optional

MARK = "mhc_compile"
LOAD_HINT = "an mhc-compile converted model: load it with mhc_compile.load(path), not from_pretrained"
_FIRST = ("hidden_size", "d_model", "n_embd", "num_hidden_layers", "num_layers", "vocab_size", "num_channels")


def _config_class(model_type):
    try:
        from transformers import CONFIG_MAPPING

        return CONFIG_MAPPING[model_type]
    except Exception:  # transformers missing or an unknown model type: nothing to verify against
        return None


def _refuses(cls, config: dict, field: str) -> bool:
    """Whether ``cls`` refuses ``config`` with ``field`` set to the hint, naming mhc_compile.load."""
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cls.from_dict({**config, field: LOAD_HINT})
    except Exception as exc:  # noqa: BLE001 - any refusal that quotes the hint will do
        return "mhc_compile.load" in str(exc)
    finally:
        logging.disable(previous)
    return False


def _pick_field(config: dict) -> Optional[str]:
    cls = _config_class(config.get("model_type"))
    if cls is None:
        return None
    ints = [k for k, v in config.items() if type(v) is int]
    for field in [k for k in _FIRST if k in ints] + [k for k in ints if k not in _FIRST]:
        if _refuses(cls, config, field):
            return field
    return None


def mark_config(path: Path) -> bool:
    """Mark the ``config.json`` at ``path`` (see the module); False when no field of its config
    class is validated, so the file stays as it was."""
    config = json.loads(Path(path).read_text())
    if MARK in config:
        return True
    field = _pick_field(config)
    if field is None:
        return False
    config[MARK] = {"field": field, "value": config[field], "load": "mhc_compile.load(path)"}
    config[field] = LOAD_HINT
    Path(path).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return True


def original_config(path: Path) -> dict:
    """The ``config.json`` at ``path`` as the original model had it (the mark undone)."""
    config = json.loads(Path(path).read_text())
    mark = config.pop(MARK, None)
    if isinstance(mark, dict) and mark.get("field") in config:
        config[mark["field"]] = mark["value"]
    return config
