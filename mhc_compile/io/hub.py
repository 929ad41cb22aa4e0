"""The ``config.json`` of a converted Hugging Face directory, marked so that plain ``transformers``
(4.x and 5.x) refuses it with a message that names :func:`mhc_compile.load`, instead of building
the unconverted model silently (``AutoModel.from_pretrained``, the class's ``from_pretrained``,
``AutoConfig``, ``SentenceTransformer(dir)``).

The mark (:func:`mark_config`) uses transformers' own versioned configuration files: every
``from_pretrained`` of a config (``PretrainedConfig.get_config_dict``, 4.x and 5.x alike) reads
``config.json`` and, when it lists ``configuration_files``, re-reads the one for its version
instead. ``config.json`` keeps the model's true values and lists :data:`MARKED`
(``config.4.0.0.json``: chosen by every transformers >= 4.0); that file is the same config with
``dtype`` and ``torch_dtype`` set to :data:`LOAD_HINT`. Both major versions turn a string dtype
into ``getattr(torch, dtype)`` in the base config class, so every config class fails with
``AttributeError: module 'torch' has no attribute 'an mhc-compile converted model: load it with
mhc_compile.load(path) ...'``. Readers of ``config.json`` itself are not refused:
``Trainer(resume_from_checkpoint=...)`` (``PretrainedConfig.from_json_file``) and
:func:`original_config`, which ``mhc_compile.load`` uses. The refusal is checked with the
installed transformers before it is written. Why not the custom-code mechanism, a distinct
``model_type`` or a weight-file variant: docs/huggingface.md.
"""
from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

MARK = "mhc_compile"
MARKED = "config.4.0.0.json"  # transformers >= 4.0 reads this one instead of config.json
LOAD_HINT = "an mhc-compile converted model: load it with mhc_compile.load(path), not from_pretrained"
_REFUSED_FIELDS = ("dtype", "torch_dtype")  # 5.x reads dtype, 4.x torch_dtype (and dtype from 4.56)


def _refused(config: dict) -> bool:
    """Whether the installed transformers refuses ``config`` with a message naming mhc_compile.load
    (True when transformers is not installed: nothing can load it plainly here)."""
    try:
        from transformers import CONFIG_MAPPING, PretrainedConfig
    except ImportError:
        return True
    cls = CONFIG_MAPPING[config["model_type"]] if config.get("model_type") in CONFIG_MAPPING else PretrainedConfig
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cls.from_dict(dict(config))
    except Exception as exc:  # noqa: BLE001 - any refusal that quotes the hint will do
        return "mhc_compile.load" in str(exc)
    finally:
        logging.disable(previous)
    return False


def _dump(path: Path, config: dict) -> None:
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def mark_config(path: Path) -> bool:
    """Mark the ``config.json`` at ``path`` (see the module): write :data:`MARKED` beside it and
    point ``config.json`` to it. False (with a warning) when the installed transformers would not
    refuse the marked file; the directory is still a correct converted model."""
    path = Path(path)
    original = original_config(path)
    marked = {**original, **{f: LOAD_HINT for f in _REFUSED_FIELDS}}
    _dump(path.parent / MARKED, marked)
    note = {"load": "mhc_compile.load(path)", "marked": MARKED}
    if "configuration_files" in original:
        note["configuration_files"] = original["configuration_files"]
    _dump(path, {**original, "configuration_files": [MARKED], MARK: note})
    if _refused(marked):
        return True
    warnings.warn(f"mhc_compile: {path.parent}: this transformers version does not refuse {MARKED}, so its "
                  "from_pretrained may load the directory without the mHC weights; use mhc_compile.load")
    return False


def original_config(path: Path) -> dict:
    """The ``config.json`` at ``path`` as the original model had it (the mark undone)."""
    config = json.loads(Path(path).read_text())
    mark = config.pop(MARK, None)
    if not isinstance(mark, dict):
        return config
    if mark.get("field") in config:  # the mark of earlier versions: one int field held the hint
        config[mark["field"]] = mark["value"]
    if config.get("configuration_files") == [mark.get("marked")]:
        config.pop("configuration_files")
    if "configuration_files" in mark:
        config["configuration_files"] = mark["configuration_files"]
    return config
