"""Structural invariants of the original model that a converted model must keep at *trained* mHC
parameters (issue #22): equal-at-init proves nothing about the axis the streams mix over, so every
check here first moves the mHC parameters (:func:`perturb_mhc`, seeded N(0, 0.3)).

* :func:`causality_leak`: how much changing token ``t`` moves the outputs before ``t`` (0 for a decoder);
* :func:`locality_leak`: how much changing the input rows outside a window moves the window's
  output rows (0 for a model that is local there, e.g. SAM with window attention in every layer);
* :func:`runs_at`: the model runs at other sizes with the original's output shapes;
* :func:`generate_agrees`: ``generate`` runs and its greedy tokens with the KV cache equal those
  without it;
* :func:`forms_differ`: the stream-carrying blocks form against the whole-graph form of the same
  conversion, at the same (perturbed) parameters.

Each returns a number (or raises); the tests assert on it.
"""
from __future__ import annotations

import copy

import torch

import mhc_compile
from tests._convert_checks import main_output, mhc_params


def perturb_mhc(model, scale: float = 0.3, seed: int = 0):
    """Every mHC parameter += N(0, scale), seeded: parameters as training would leave them."""
    gen = torch.Generator().manual_seed(seed)
    params = mhc_params(model)
    assert params, "the model has no mHC parameters"
    with torch.no_grad():
        for _, p in sorted(params.items()):
            p.add_(scale * torch.randn(p.shape, generator=gen).to(p.dtype))
    return model


def _out(model, *args, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return main_output(model(*args, **kwargs)).double()


def causality_leak(model, ids: torch.Tensor, t: int, vocab: int) -> float:
    """max |out[:, :t] change| / max |out| when every sequence's token ``t`` (and later) changes."""
    other = ids.clone()
    other[:, t:] = (ids[:, t:] + 1 + torch.arange(ids.shape[1] - t)) % vocab
    a, b = _out(model, ids), _out(model, other)
    return ((a[:, :t] - b[:, :t]).abs().max() / a.abs().max()).item()


def locality_leak(model, pixels: torch.Tensor, out_rows: slice, in_rows: slice, row_dim: int) -> float:
    """max |change of the output rows ``out_rows`` (on dim ``row_dim``)| / max |out| when the input
    pixel rows ``in_rows`` change."""
    other = pixels.clone()
    other[:, :, in_rows] = torch.randn(other[:, :, in_rows].shape, generator=torch.Generator().manual_seed(3))
    a, b = _out(model, pixels), _out(model, other)
    diff = (a - b).narrow(row_dim, out_rows.start, out_rows.stop - out_rows.start)
    return (diff.abs().max() / a.abs().max()).item()


def runs_at(original, converted, inputs: tuple) -> tuple:
    """(converted output shape, original output shape) at ``inputs``; the output must be finite."""
    out = _out(converted, *inputs)
    assert torch.isfinite(out).all()
    return tuple(out.shape), tuple(_out(original, *inputs).shape)


def generate_agrees(model, ids: torch.Tensor, new: int = 4) -> bool:
    """``generate`` runs, and greedy with the KV cache gives the tokens of greedy without it."""
    kw = dict(max_new_tokens=new, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(ids, use_cache=True, **kw)
        plain = model.generate(ids, use_cache=False, **kw)
    assert cached.shape == (ids.shape[0], ids.shape[1] + new)
    return torch.equal(cached, plain)


def forms_differ(model, config, args: tuple, kwargs: dict | None = None, carried=None) -> float:
    """max |blocks - whole graph| / max |out| at perturbed mHC parameters (the blocks form's,
    loaded into the whole-graph form). ``carried``: the blocks conversion when already made."""
    kwargs = kwargs or {}
    blocks = carried if carried is not None else mhc_compile.convert(model, config, args, example_kwargs=kwargs)
    assert blocks.mhc_report.form == "blocks", blocks.mhc_report.form_reason
    whole = mhc_compile.convert(model, config, args, example_kwargs=kwargs, form="whole-graph")
    blocks = copy.deepcopy(blocks)
    perturb_mhc(blocks)
    whole.load_state_dict(blocks.state_dict())
    a, b = _out(blocks, *args, **kwargs), _out(whole, *args, **kwargs)
    return ((a - b).abs().max() / a.abs().max()).item()
