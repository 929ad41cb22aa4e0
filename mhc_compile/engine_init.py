"""How an engine's own weight init reaches the mHC parameters of a converted model.

Large runs build the model on the meta device, convert and parallelize it there, ``to_empty`` it
and then call the model's own init: torchtitan's ``init_weights``/``init_states``, Hugging Face's
``init_weights``/``initialize_weights`` (``post_init``), or a plain walk calling
``reset_parameters()`` on every module. Each of those must also restore the mHC parameters'
function-preserving init, or they keep whatever ``to_empty`` left (garbage, NaN losses).

The mHC parameters live in :class:`~mhc_compile.placement.MHCSiteParams` containers, whose
``reset_parameters()`` is that init (plain and DTensor parameters alike), so a plain walk reaches
them as it is. :func:`install` (called by ``convert`` on the converted model) makes the two engine
protocols reach them too, each the way that engine finds a module's init:

* **torchtitan**: ``init_states`` recurses into children that are its ``Module`` protocol and
  initialises each one's own parameters (``reset_parameters()`` when no ``param_init`` is set);
  ``verify_module_protocol`` refuses any other module. Every container of a torchtitan model
  becomes a :func:`titan_container_class` instance: the same container, also a torchtitan
  ``Module``. It also declares a ``sharding_config``, so torchtitan's ``Module.parallelize`` (every
  ``spmd_backend``) makes its parameters replicated on the tensor-parallel axis: the layout of the
  model's own norm weights (``R`` under SequenceParallel, ``I`` without; the mHC parameters are
  used per token, as norm weights are), or replicated on every axis when no norm declares one.
* **Hugging Face**: ``initialize_weights`` calls the nearest ``PreTrainedModel``'s
  ``_init_weights(module)`` on every module, which knows nothing of the containers. Each
  ``PreTrainedModel`` of the converted tree gets an ``_init_weights`` (on the instance) that resets a
  container and hands every other module to its class's own.

Only these init calls reset the mHC parameters; loading a checkpoint afterwards is untouched.
"""
from __future__ import annotations

import sys
import types
from typing import Any, Optional

from torch import nn

from .placement import MHCSiteParams

_TITAN_MODULE = "torchtitan.protocols.module"
_TITAN_CLASS: Optional[type] = None


def titan_container_class() -> type:
    """``MHCSiteParams`` that is also a torchtitan ``Module`` (made once; imports torchtitan)."""
    global _TITAN_CLASS
    if _TITAN_CLASS is None:
        from torchtitan.protocols.module import Module

        _TITAN_CLASS = type("TitanMHCSiteParams", (MHCSiteParams, Module), {
            "__module__": __name__,
            "__doc__": "An mHC parameter container in a torchtitan model: torchtitan's ``init_states`` "
                       "calls its ``reset_parameters()`` (no ``param_init``), and "
                       "``verify_module_protocol`` accepts it.",
        })
    return _TITAN_CLASS


def is_titan_container(module: nn.Module) -> bool:
    """Whether ``module`` is an mHC container of a torchtitan model (placed by torchtitan's parallelize)."""
    return _TITAN_CLASS is not None and isinstance(module, _TITAN_CLASS)


def __getattr__(name: str) -> Any:  # pickles name the torchtitan container class here
    if name == "TitanMHCSiteParams":
        return titan_container_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _is_titan(model: nn.Module) -> bool:
    titan = sys.modules.get(_TITAN_MODULE)
    return titan is not None and isinstance(model, titan.Module)


def _init_weights(self: nn.Module, module: nn.Module) -> None:
    """A ``PreTrainedModel._init_weights`` that also initialises the mHC containers."""
    if isinstance(module, MHCSiteParams):
        module.reset_parameters()
    else:
        type(self)._init_weights(self, module)


def _pretrained_models(model: nn.Module) -> list:
    transformers = sys.modules.get("transformers")
    base = getattr(transformers, "PreTrainedModel", None) if transformers is not None else None
    return [m for m in model.modules() if base is not None and isinstance(m, base)]


def _norm_weight_layout(model: nn.Module):
    """The layout torchtitan's sharding config gives the model's norm weights, or ``None``."""
    from torchtitan.protocols.module import Module

    for m in model.modules():
        if isinstance(m, (nn.RMSNorm, nn.LayerNorm)) and isinstance(m, Module) and m._sharding_config is not None:
            layout = m._sharding_config.state_shardings.get("weight")
            if layout is not None:
                return layout
    return None


def titan_sharding_config(model: nn.Module, container: MHCSiteParams):
    """A torchtitan ``ShardingConfig`` that replicates ``container``'s parameters (see module doc)."""
    import spmd_types as spmd
    from torchtitan.distributed.parallel_dims import MeshAxisName, SpmdLayout
    from torchtitan.protocols.sharding import ShardingConfig

    layout = _norm_weight_layout(model)
    if layout is None:
        layout = SpmdLayout({MeshAxisName.DP: spmd.R, MeshAxisName.CP: spmd.R, MeshAxisName.TP: spmd.R})
    return ShardingConfig(state_shardings={name: layout for name in container._parameters})


def install(model: nn.Module) -> None:
    """Make ``model``'s own init protocol (torchtitan, Hugging Face) reset its mHC containers."""
    containers = [m for m in model.modules() if isinstance(m, MHCSiteParams)]
    if not containers:
        return
    if _is_titan(model):
        cls = titan_container_class()
        for c in containers:
            if not isinstance(c, cls):
                c.__class__ = cls
            if c._sharding_config is None:
                c._sharding_config = titan_sharding_config(model, c)
    for m in _pretrained_models(model):
        m.__dict__["_init_weights"] = types.MethodType(_init_weights, m)
