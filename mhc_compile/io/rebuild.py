"""Rebuilding a converted directory: the original model (fresh weights, eval mode) from what its
source kind saved (the registry's ``rebuild`` entry) and the saved example inputs, the conversion
pipeline run on it with the saved MHCConfig (``pipeline.run``: the model's own class), then the
saved state_dict loaded *strictly* (tied tensors tied again), so outputs match the converted model
exactly. Used by :func:`io.load.load` and by the ``converted`` source kind (``mhc inspect``);
it imports no source reader, so a reader may import it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from torch import nn

from ..config import MHCConfig
from ..mode_switch import set_training
from ..pipeline import Conversion, rewrite_whole, run
from .errors import MHCIOError, first_line
from .format import INPUTS, MHC_JSON, MHC_WEIGHTS, WEIGHTS, num_positional, restore_tied, tied_names, unflatten_inputs
from .pretrained import bind_save_pretrained, is_pretrained
from .registry import UNEXPECTED, ReadOptions, get_source_kind


def rebuild_original(path: Path, meta: dict, options: ReadOptions) -> tuple[nn.Module, tuple, dict]:
    """The unconverted model (fresh weights, eval mode) and the saved example inputs of a converted
    directory (``options``: the trust flags)."""
    kind = get_source_kind(meta["source"], where=str(path / MHC_JSON))
    model = set_training(kind.rebuild(path, meta, options), False)  # eval mode for the capture
    from safetensors.torch import load_file

    try:
        args, kwargs = unflatten_inputs(load_file(str(path / INPUTS)), num_positional(meta))
    except Exception as exc:
        raise MHCIOError(f"{path / INPUTS}: unreadable: {first_line(exc)}") from None
    return model, args, kwargs


def read_weights(path: Path) -> dict:
    """The saved state_dict of a converted directory: ``model.safetensors``, or the shards listed in
    ``model.safetensors.index.json`` (a large ``save_pretrained``), and ``mhc.safetensors``."""
    import json

    from safetensors.torch import load_file

    files = [path / WEIGHTS]
    index = path / (WEIGHTS + ".index.json")
    if not files[0].is_file() and index.is_file():
        try:
            files = [path / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        except Exception as exc:
            raise MHCIOError(f"{index}: unreadable: {first_line(exc)}") from None
    if (path / MHC_WEIGHTS).is_file():  # save_pretrained: the mHC parameters in a file of their own
        files.append(path / MHC_WEIGHTS)
    sd: dict = {}
    for f in files:
        try:
            sd.update(load_file(str(f)))
        except Exception as exc:
            raise MHCIOError(f"{f}: unreadable: {first_line(exc)}") from None
    return sd


def _tie_missing(sd: dict, model: nn.Module) -> dict:
    """Fill the names a writer left out because their tensor is another name's (``lm_head.weight``
    tied to the embedding: ``save_pretrained`` stores it once) from the model's own ties."""
    for name, target in tied_names(model.state_dict()).items():
        if name not in sd and target in sd:
            sd[name] = sd[target]
        elif target not in sd and name in sd:
            sd[target] = sd[name]
    return sd


def convert_rebuilt(path: Path, meta: dict, original: nn.Module, args: tuple, kwargs: dict,
                    *, keep_graph: bool = False) -> Conversion:
    """Convert the rebuilt ``original`` with the saved config (the one pipeline) and load the saved
    weights into it: the model's own class, or with ``keep_graph`` the rewritten whole graph and
    the graph before the rewrite (for ``mhc inspect``)."""
    config = MHCConfig.from_dict(meta["mhc_config"])
    preloaded = _preloaded(original, meta, path)
    if keep_graph:
        conversion = rewrite_whole(original, config, args, kwargs, keep_graph=True)
    else:
        conversion = run(original, config, args, kwargs, inplace=True)
        if not conversion.rewritten:
            raise MHCIOError(f"{path}: the rebuilt model has no residual site to convert; mhc.json does not match it")
        if is_pretrained(conversion.converted):
            bind_save_pretrained(conversion.converted, conversion.call)
    sd = _tie_missing(restore_tied(read_weights(path), meta.get("tied")), conversion.converted)
    if preloaded is not None:
        sd = _added_weights(sd, conversion.converted, preloaded, path)
    try:
        conversion.converted.load_state_dict(sd, strict=preloaded is None)
    except RuntimeError as exc:
        msg = " ".join(str(exc).split())
        raise MHCIOError(f"{path / WEIGHTS}: does not match the rebuilt model: {msg[:300]}") from None
    return conversion


def _preloaded(original: nn.Module, meta: dict, path: Path) -> Optional[tuple[set, set]]:
    """For a kind whose rebuild loaded the saved weights itself (hf: ``from_pretrained`` with
    transformers' key mapping): (the original's state-dict keys, the saved keys its loader did not
    take); None when ``load_state_dict`` loads everything strictly."""
    if not get_source_kind(meta["source"], where=str(path / MHC_JSON)).rebuild_loads_weights:
        return None
    return set(original.state_dict()), set(original.__dict__.pop(UNEXPECTED, ()))


def _added_weights(sd: dict, converted: nn.Module, preloaded: tuple[set, set], path: Path) -> dict:
    """The saved tensors of the parameters the conversion added (the original's came through its
    own loader): every added key must be saved, and every saved key the loader left must be one."""
    original_keys, untaken = preloaded
    added = [k for k in converted.state_dict() if k not in original_keys]
    missing = [k for k in added if k not in sd]
    stray = sorted(untaken - set(added))
    if missing or stray:
        what = (f"missing the mHC weights {', '.join(missing[:5])}" if missing
                else f"holds weights the model has no place for: {', '.join(stray[:5])}")
        raise MHCIOError(f"{path / WEIGHTS}: does not match the rebuilt model: {what}")
    return {k: sd[k] for k in added}
