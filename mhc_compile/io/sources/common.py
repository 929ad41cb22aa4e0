"""Helpers the source readers share: eval mode for capture, the current directory on
``sys.path`` (only the CLI calls it, for code the user named or trusted), and reading /
applying a state_dict file."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from torch import nn

from ...mode_switch import set_training
from ..errors import MHCIOError, MHCUsageError, first_line


def eval_mode(model: nn.Module) -> nn.Module:
    """Eval mode for capture (dropout off); exported GraphModules refuse .eval() and are left as is."""
    return set_training(model, False)


def cwd_on_path() -> None:
    """Modules in the current directory can be imported (a factory named on the command line, or a
    pickle/factory the user trusts). Appended, not prepended: a file in the current directory never
    shadows an installed module (``transformers.py`` in a downloaded directory stays inert)."""
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())


def load_state_dict_file(path: str) -> dict:
    """A state_dict from a ``torch.save`` file (read with ``weights_only=True``) or a ``.safetensors`` file."""
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
        raise MHCIOError(f"{path}: cannot read the state_dict: {first_line(exc)}") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise MHCIOError(f"{path}: is not a state_dict (a dict of name -> tensor)")
    return sd


def apply_state_dict(model: nn.Module, path: str) -> None:
    """Load the state_dict file ``path`` into ``model`` strictly; a mismatch names the file."""
    sd = load_state_dict_file(path)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        msg = " ".join(str(exc).split())
        raise MHCIOError(f"{path}: does not fit the model: {msg[:300]}") from None
