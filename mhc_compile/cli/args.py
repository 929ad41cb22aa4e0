"""Parsing the command line's text into typed values: ``--input-shape`` (:func:`parse_shape`),
``--input-dtype`` (:func:`parse_dtype`, the names in :data:`DTYPES`), ``--streams`` /
``--config-option`` (:func:`parse_config`), and the options convert and inspect share for
reading a source (:func:`source_options`). Bad text raises ``MHCUsageError`` (exit code 2)."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import click

from ..config import MHCConfig

# dtype names -> torch dtype attribute names (torch is imported when a dtype is parsed, so that
# `mhc --help` does not import it)
DTYPES = {
    "float32": "float32", "float": "float32", "fp32": "float32",
    "float64": "float64", "double": "float64", "fp64": "float64",
    "float16": "float16", "half": "float16", "fp16": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "int64": "int64", "long": "int64",
    "int32": "int32", "int": "int32",
    "bool": "bool",
}


def _usage_error(msg: str):
    from ..io import MHCUsageError

    return MHCUsageError(msg)


def parse_dtype(text: str):
    """``long`` -> ``torch.int64`` (any name of :data:`DTYPES`, any case)."""
    import torch

    try:
        return getattr(torch, DTYPES[text.strip().lower()])
    except KeyError:
        raise _usage_error(f"unknown dtype {text!r}; use one of {', '.join(sorted(DTYPES))}") from None


def parse_shape(text: str) -> tuple[int, ...]:
    """``2x16`` (or ``2,16``) -> ``(2, 16)``; every size must be positive."""
    try:
        shape = tuple(int(p) for p in text.lower().replace(",", "x").split("x") if p.strip())
    except ValueError:
        shape = ()
    if not shape or any(s <= 0 for s in shape):
        raise _usage_error(f"bad input shape {text!r}; write it like 2x16 or 2x3x32x32")
    return shape


def parse_inputs(shapes: Sequence[str], dtypes: Sequence[str]) -> tuple[tuple, tuple]:
    """The ``--input-shape`` and ``--input-dtype`` texts, parsed."""
    return tuple(parse_shape(s) for s in shapes), tuple(parse_dtype(d) for d in dtypes)


def parse_config(streams: Optional[int], options: Sequence[str], base: Optional[dict] = None) -> MHCConfig:
    """The MHCConfig of ``--streams`` and the ``--config-option key=value`` items, over ``base``."""
    opts: dict[str, Any] = dict(base or {})
    for item in options:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise _usage_error(f"--config-option {item!r}: write it as key=value (e.g. sinkhorn_iters=10)")
        opts[key.strip()] = value
    if streams is not None:
        opts["streams"] = streams
    return MHCConfig.from_options(opts)


def source_options(fn):
    """Options shared by convert and inspect for reading a source."""
    decorators = [
        click.option("--state-dict", "state_dict", type=click.Path(dir_okay=False), default=None,
                     help="Weights for a factory (or pickled module): a torch.save'd state_dict (read with "
                          "weights_only=True) or a .safetensors file."),
        click.option("--input-shape", "input_shapes", multiple=True, metavar="SHAPE",
                     help="Shape of an example input, like 2x16; repeat for each positional input "
                          "(factory and pickled sources)."),
        click.option("--input-dtype", "input_dtypes", multiple=True, metavar="DTYPE",
                     help="dtype of the example inputs (float32, long, ...): once for all, or once per "
                          "--input-shape. Default float32. Floats are N(0,1); integers uniform in "
                          "[0, smallest nn.Embedding size) (or [0, 2) without embeddings)."),
        click.option("--trust-pickle", is_flag=True,
                     help="Allow reading a whole pickled nn.Module (.pt). Unpickling runs code from the "
                          "file: use only for files you trust."),
        click.option("--trust-code", is_flag=True,
                     help="Allow rebuilding an mhc output converted from a factory: its mhc.json names "
                          "package.module:function, which is imported and called. Use only for directories "
                          "you trust."),
        click.option("--batch-size", default=2, show_default=True, type=click.IntRange(min=1), help="Batch of the example inputs of Hugging Face models."),
        click.option("--seq-len", default=16, show_default=True, type=click.IntRange(min=1), help="Sequence length of the example inputs of Hugging Face text models."),
    ]
    for d in reversed(decorators):
        fn = d(fn)
    return fn
