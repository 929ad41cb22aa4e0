"""Where a residual site's mHC parameters live in a module tree, and how they are attached.

One helper for both entry points, so a site's parameters get the same names whichever path made
them and checkpoints move between the two: the ``convert`` path (``passes/rewrite``) attaches
them to the captured ``GraphModule``, the ``torch.compile`` backend to the user's own root module.

A site's name (from :func:`mhc_compile.graph_pipeline.assign_names`) is its parameter prefix, a
dotted module path such as ``blocks.0.attn.mhc`` or ``layer1.0.mhc_site3``. :func:`site_container`
walks that path, creating empty :class:`MHCSiteParams` containers where modules are missing, and
:func:`attach` registers the parameters on the container it returns.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
from torch import nn

CONTAINER_ATTR = "mhc"  # the container's name when a site's path is the root itself

# Containers user code iterates over: a parameter container added to one would be iterated too.
_ITERATED = (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)
_UNSAFE = re.compile(r"[^0-9A-Za-z_]")


class MHCPlacementError(RuntimeError):
    """A site's parameters cannot be attached at its path (an attribute that is not a module...)."""


@dataclass(frozen=True)
class InitRecipe:
    """How a container's parameters are initialised, so they can be again (``reset_parameters``):
    ``kind="site"`` is ``reference.init_site_params(n, channels, site_index, ...)``,
    ``kind="collapse"`` the learned collapse weight of a chain."""

    kind: str
    n: int
    channels: int = 0
    site_index: int = 0
    variant: str = "mhc"
    init: str = "preserve"
    dynamic: bool = True
    alpha_init: float = 0.01

    def values(self) -> dict[str, torch.Tensor]:
        from . import reference

        if self.kind == "collapse":
            return {"weight": reference.init_collapse_weight(self.n)}
        return reference.init_site_params(self.n, self.channels, self.site_index, variant=self.variant,
                                          init=self.init, dynamic=self.dynamic, alpha_init=self.alpha_init)


class SiteInit(dict):
    """The init values handed to a parameter provider, with the recipe that made them."""

    def __init__(self, values: Mapping[str, torch.Tensor], recipe: InitRecipe):
        super().__init__(values)
        self.recipe = recipe


class MHCSiteParams(nn.Module):
    """Holds one residual site's mHC parameters (``phi``, ``alpha``, ``b_pre``, ...).

    A plain container; ``forward`` returns its first input unchanged so that a container
    attached to an ``nn.Sequential`` does not change what the sequence computes.
    :meth:`reset_parameters` restores the function-preserving init (the meta-device flow:
    build on meta, convert, ``to_empty``, load the original weights, reset), on plain and
    DTensor (sharded, replicated) parameters alike, before or after ``fully_shard``.
    """

    init_recipe: Optional[InitRecipe] = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover - identity
        return args[0] if args else None

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Put this container's parameters back to their init, in place (device and dtype kept)."""
        if self.init_recipe is None:
            raise RuntimeError("this MHCSiteParams has no init recipe (made by an older mhc-compile); "
                               "convert the model again to get one")
        for key, value in self.init_recipe.values().items():
            p = self._parameters.get(safe_name(key))
            if p is not None:
                _write_init(p, value)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}: {tuple(p.shape)}" for k, p in self._parameters.items())


def _write_init(p: torch.Tensor, value: torch.Tensor) -> None:
    """Copy the full init ``value`` into ``p``: a plain tensor, or a DTensor of any mesh and
    placements (FSDP2's ``Shard(0)``, a TP ``Replicate()``, both), whose local part receives its
    own slice of ``value``. No collective: every rank computes the same value and keeps its part."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(p, DTensor):
        p.copy_(value.to(dtype=p.dtype, device=p.device))
        return
    local = p.to_local()
    if local.is_meta:  # sharded on the meta device, before to_empty: nothing to write yet
        return
    mesh = p.device_mesh
    full = value.to(dtype=p.dtype, device=mesh.device_type)
    part = distribute_tensor(full, mesh, p.placements, src_data_rank=None).to_local()
    local.copy_(part.to(local.device))


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


def attach(container: nn.Module, params: Mapping[str, torch.Tensor],
           recipe: Optional[InitRecipe] = None) -> dict[str, nn.Parameter]:
    """Register ``params`` on ``container`` under safe names, replacing what is there.

    Plain tensors become ``nn.Parameter``s; a parameter already registered under its key is kept
    as is. ``recipe`` (how they were initialised) is kept on an :class:`MHCSiteParams` container
    for its ``reset_parameters``. Returns ``{original key: registered parameter}``.
    """
    if recipe is not None and isinstance(container, MHCSiteParams):
        container.init_recipe = recipe
    out = {}
    for key, value in params.items():
        p = value if isinstance(value, nn.Parameter) else nn.Parameter(value)
        name = safe_name(key)
        if container._parameters.get(name) is not p:
            container._parameters.pop(name, None)
            container.register_parameter(name, p)
        out[key] = p
    return out
