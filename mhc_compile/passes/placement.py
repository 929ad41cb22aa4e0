"""Where a residual site's mHC parameters live in a module tree, and how they are attached.

One helper for both entry points, so a site's parameters get the same names whichever path made
them and checkpoints move between the two: the ``convert`` path (``passes/rewrite``) attaches
them to the captured ``GraphModule``, the ``torch.compile`` backend to the user's own root module.

A site's name (from :func:`mhc_compile.passes.rewrite.assign_names`) is its parameter prefix, a
dotted module path such as ``blocks.0.attn.mhc`` or ``layer1.0.mhc_site3``. :func:`site_container`
walks that path, creating empty :class:`MHCSiteParams` containers where modules are missing, and
:func:`attach` registers the parameters on the container it returns.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import torch
from torch import nn

CONTAINER_ATTR = "mhc"  # the container's name when a site's path is the root itself

# Containers user code iterates over: a parameter container added to one would be iterated too.
_ITERATED = (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)
_UNSAFE = re.compile(r"[^0-9A-Za-z_]")


class MHCPlacementError(RuntimeError):
    """A site's parameters cannot be attached at its path (an attribute that is not a module...)."""


class MHCSiteParams(nn.Module):
    """Holds one residual site's mHC parameters (``phi``, ``alpha``, ``b_pre``, ...).

    A plain container; ``forward`` returns its first input unchanged so that a container
    attached to an ``nn.Sequential`` does not change what the sequence computes.
    """

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover - identity
        return args[0] if args else None

    def extra_repr(self) -> str:
        return ", ".join(f"{k}: {tuple(p.shape)}" for k, p in self._parameters.items())


def safe_name(part: str) -> str:
    """One path component as an ASCII identifier (``blocks`` stays, ``a-b`` becomes ``a_b``)."""
    return _UNSAFE.sub("_", str(part)) or "_"


def safe_path(path: str) -> str:
    """A dotted path with every component made a safe name (empty components dropped)."""
    return ".".join(safe_name(p) for p in str(path).split(".") if p)


def site_container(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    """The module at ``path`` in ``root`` that holds a site's parameters, and its dotted name.

    Existing modules along the path are walked; missing ones are created as empty
    :class:`MHCSiteParams`. An empty path means the root, whose container is named
    ``CONTAINER_ATTR``. A container is never added to a ``ModuleList``/``ModuleDict`` (user code
    iterates them): such a path is flattened under the nearest other module
    (``blocks.extra`` -> ``blocks_extra`` on the parent).
    """
    parts = [safe_name(p) for p in path.split(".") if p] if path else []
    if not parts:
        parts = [CONTAINER_ATTR]
    mod, i = root, 0
    while i < len(parts) - 1 and isinstance(mod._modules.get(parts[i]), nn.Module):
        mod = mod._modules[parts[i]]
        i += 1
    rest, prefix = parts[i:], parts[:i]
    while prefix and isinstance(mod, _ITERATED):
        rest = [prefix.pop() + "_" + rest[0]] + rest[1:]
        mod = root.get_submodule(".".join(prefix)) if prefix else root
    for part in rest:
        child = mod._modules.get(part)
        if child is None:
            if hasattr(mod, part):
                raise MHCPlacementError(f"cannot attach mHC parameters at {path!r}: {part!r} is an attribute "
                                        f"of {type(mod).__name__} that is not a module")
            child = MHCSiteParams()
            mod.add_module(part, child)
        mod = child
        prefix.append(part)
    return mod, ".".join(prefix)


def attach(container: nn.Module, params: Mapping[str, torch.Tensor]) -> dict[str, nn.Parameter]:
    """Register ``params`` on ``container`` under safe names, replacing what is there.

    Plain tensors become ``nn.Parameter``s; a parameter already registered under its key is kept
    as is. Returns ``{original key: registered parameter}``.
    """
    out = {}
    for key, value in params.items():
        p = value if isinstance(value, nn.Parameter) else nn.Parameter(value)
        name = safe_name(key)
        if container._parameters.get(name) is not p:
            container._parameters.pop(name, None)
            container.register_parameter(name, p)
        out[key] = p
    return out
