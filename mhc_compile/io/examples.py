"""Example inputs: the tensors a source's model is captured with.

:func:`hf_example_inputs` makes them from a transformers config, :func:`make_inputs` from
shapes and dtypes (``--input-shape`` / ``--input-dtype``), and :func:`normalize_inputs` reads what a
factory module's ``example_inputs()`` returns: always ``(args, kwargs)`` as the model is called,
which the conversion pipeline binds once (``mhc_compile.example_call.ExampleCall``) and saving
writes as they are (``format.flatten_inputs``).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import nn

from ..capture import inputs_error
from .errors import MHCIOError, MHCUsageError


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


def make_inputs(model: nn.Module, shapes: Sequence[tuple[int, ...]], dtypes: Sequence[torch.dtype]) -> tuple:
    """Inputs of the given shapes and dtypes: floats ~ N(0,1); integers uniform in [0, high).

    ``dtypes`` holds one dtype for all shapes or one per shape (none: float32). ``high`` is the
    smallest ``num_embeddings`` of the model's ``nn.Embedding`` layers (so token ids are always
    valid), or 2 when the model has none.
    """
    if not shapes:
        raise MHCUsageError(
            "the model needs example inputs: pass --input-shape (e.g. --input-shape 2x16 --input-dtype long) "
            "or give the factory module an example_inputs() function"
        )
    if dtypes and len(dtypes) not in (1, len(shapes)):
        raise MHCUsageError(f"give one --input-dtype, or one per --input-shape ({len(shapes)}), not {len(dtypes)}")
    dts = list(dtypes) or [torch.float32]
    if len(dts) == 1:
        dts = dts * len(shapes)
    emb = [m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)]
    high = min(emb) if emb else 2
    g = torch.Generator().manual_seed(0)
    args = []
    for shape, dt in zip(shapes, dts):
        shape = tuple(shape)
        if dt.is_floating_point:
            args.append(torch.randn(shape, generator=g).to(dt))
        elif dt == torch.bool:
            args.append(torch.randint(0, 2, shape, generator=g).bool())
        else:
            args.append(torch.randint(0, high, shape, generator=g).to(dt))
    return tuple(args)


def normalize_inputs(ex: Any, where: str) -> tuple[tuple, dict]:
    """``(args, kwargs)`` from what ``example_inputs()`` returned: a tensor, a tuple/list of
    tensors, a dict of keyword inputs, or an ``(args, kwargs)`` pair."""
    if isinstance(ex, torch.Tensor):
        return (ex,), {}
    if isinstance(ex, dict):
        return (), dict(ex)
    if isinstance(ex, (tuple, list)):
        if len(ex) == 2 and isinstance(ex[0], (tuple, list)) and isinstance(ex[1], dict):
            return tuple(ex[0]), dict(ex[1])
        return tuple(ex), {}
    raise MHCIOError(f"{where}: example_inputs() must return a tensor, a tuple of tensors or (args, kwargs)")


def make_checked_inputs(model: nn.Module, shapes: Sequence[tuple[int, ...]],
                        dtypes: Sequence[torch.dtype]) -> tuple:
    """:func:`make_inputs`, then one plain call of ``model`` on them (eval, no grad): a shape or
    dtype that forward does not take fails here, in a second, with advice about the inputs,
    before any capture work (and on torch 2.11, whose export takes float indices into an
    ``nn.Embedding``, at all)."""
    args = make_inputs(model, shapes, dtypes)
    wrong = inputs_error(model, args, {})
    if wrong is not None:
        raise wrong
    return args
