"""The ``torch.compile`` backend ``"mhc"``: rewrite every Dynamo graph into mHC streams, then compile it.

    compiled = torch.compile(model, backend="mhc", options={"streams": 4})
    mhc_compile.materialize(compiled, example_batch)   # creates the mHC parameters on `model`
    opt = torch.optim.AdamW(model.parameters())         # build the optimizer AFTER that

The backend is registered through the ``torch_dynamo_backends`` entry point, so the string
``"mhc"`` works without importing this package. For each graph Dynamo hands over it

1. parses ``options`` with ``MHCConfig.from_options`` (unknown keys are errors);
2. runs the shared passes (``mhc_compile.graph_pipeline.rewrite_graph``) with a parameter
   provider that creates each site's parameters ONCE, attaches them to the user's original
   module (so ``model.parameters()``, ``state_dict()``, ``.to()`` and checkpoints see them) and
   hands the same objects back on every recompile (new batch size, dynamic shapes, grad mode);
3. warns when a graph break cuts the residual stream (each graph then gets its own chains),
   and handles DistributedDataParallel (see ``docs/backend.md``);
4. passes the rewritten graph to the inner backend (``config.inner``: inductor, aot_eager, eager)
   inside ``passes.recompute.recompute_context``, which tags the joint graph so the partitioner
   keeps X only at the start of each block of L_r sites (``config.recompute``).
   The new parameters are ``get_attr`` nodes of the graph module, which AOTAutograd lifts into
   graph inputs, so they receive gradients like the user's own parameters.

Where the parameters live: the passes name each site by its parameter prefix, e.g.
``blocks.3.attn.mhc``; the backend adds an ``MHCSiteParams`` module at exactly that path of the
user's module, so the parameters are ``blocks.3.attn.mhc.phi`` etc., the same names as on the
``convert`` path (checkpoints move between the two).

All private torch API use is in ``mhc_compile._torch_internals``.
"""
from __future__ import annotations

import contextvars
import dataclasses
import warnings
import weakref
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import nn

from . import _torch_internals as _ti
from .backend_safety import (MHCBackendError, guard_instance, refuse_checkpointed_sites, refuse_child_root,
                             refuse_fully_sharded)
from .config import MHCConfig
from .passes.nodes import normalize_path
from .placement import MHCPlacementError, MHCSiteParams, SiteInit, attach, safe_name, site_container

__all__ = [
    "mhc_backend",
    "materialize",
    "MHCBackendError",
    "MHCGraphBreakWarning",
    "MHCDDPWarning",
    "MHCNoResidualWarning",
    "MHCSiteParams",
    "GraphRecord",
    "records",
    "mhc_parameters",
]

class MHCGraphBreakWarning(UserWarning):
    """A graph break cuts a residual stream: the graphs on either side get separate chains."""


class MHCNoResidualWarning(UserWarning):
    """A graph has no residual site: it is compiled unchanged."""


class MHCDDPWarning(UserWarning):
    """DDPOptimizer splits the compiled graph at gradient-bucket boundaries, which cuts chains."""


# ----------------------------------------------------------------------------- bookkeeping
@dataclasses.dataclass
class GraphRecord:
    """What the backend did with one Dynamo graph (see :func:`records`)."""

    code: str                      # the compiled function (a resume function after a graph break)
    config: MHCConfig
    report: Any                    # the ResidualReport of the passes
    num_sites: int
    new_parameters: list[str]      # names (in the root module) created for this graph
    reused_parameters: list[str]   # names handed back from an earlier compile
    break_before: Optional[str]    # the graph starts after a graph break (resumed function)
    break_after: Optional[str]     # the graph ends at a graph break (reason, file:line)
    ddp: bool                      # compiled inside DistributedDataParallel


_RECORDS: list[GraphRecord] = []
_MAX_RECORDS = 256

# root module -> its mHC parameters (weak both ways: never keeps a model alive)
_CREATED: "weakref.WeakKeyDictionary[nn.Module, weakref.WeakSet]" = weakref.WeakKeyDictionary()
_CREATED_VERSION = [0]
_EXPLICIT_ROOT: contextvars.ContextVar[Optional[nn.Module]] = contextvars.ContextVar("mhc_root", default=None)
_WARNED: set = set()


def records() -> list[GraphRecord]:
    """Records of the graphs the backend compiled in this process, oldest first (last 256)."""
    return list(_RECORDS)


def clear_records() -> None:
    _RECORDS.clear()
    _WARNED.clear()


def mhc_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The mHC parameters attached to ``model`` (compiled or not), by their names in ``model``."""
    root, _ = _ti.unwrap_module(model)
    out = {}
    for mname, mod in root.named_modules():
        if isinstance(mod, MHCSiteParams):
            for pname, p in mod.named_parameters(recurse=False):
                out[f"{mname}.{pname}" if mname else pname] = p
    return out


def _rewrite_fn() -> Callable:
    try:
        from .graph_pipeline import rewrite_graph
    except ImportError as e:  # the passes are a separate piece of the project
        raise MHCBackendError(f"mhc_compile.graph_pipeline is not available: {e}") from e
    return rewrite_graph


# ----------------------------------------------------------------------------- the backend
def mhc_backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], options: Optional[Mapping[str, Any]] = None,
                mode: Optional[str] = None, **unused: Any) -> Callable:
    """torch.compile backend ``"mhc"``: mHC rewrite of the Dynamo graph, then ``config.inner``."""
    config = MHCConfig.from_options(options)
    scope = _ti.current_frame_scope()
    code = scope[2] if scope else ""
    ddp = _ti.active_ddp_module()
    if ddp is not None and _ti.is_ddp_optimizer_piece(gm):
        raise MHCBackendError(
            "mhc: DDPOptimizer (torch._dynamo.config.optimize_ddp, on by default) split this DDP model's graph "
            "at gradient-bucket boundaries before the mhc backend saw it. A residual stream cannot cross a "
            "split, so the rewritten model would depend on bucket_cap_mb and some mHC parameters would go "
            "unused. Set torch._dynamo.config.optimize_ddp = False before the first call (DDP then all-reduces "
            "after the whole backward instead of overlapping buckets with it)."
        )
    if ddp is not None and _ti.ddp_optimizer_enabled():
        _warn_once(
            ("ddp", id(ddp)),
            "mhc: torch._dynamo.config.optimize_ddp is on. This graph fit in one DDP gradient bucket and was "
            "not split, but a larger model (or smaller bucket_cap_mb) would be split by DDPOptimizer, which "
            "the mhc backend refuses because streams cannot cross a split. Set "
            "torch._dynamo.config.optimize_ddp = False before the first call.",
            MHCDDPWarning,
        )
    provider = _ParamProvider(gm, example_inputs, scope, ddp)
    refuse_checkpointed_sites(gm)
    report = _rewrite_fn()(gm, config, provider)
    gm.recompile()
    provider.register_sources()

    num_sites = report.num_sites
    if num_sites and provider._root is not None:
        refuse_fully_sharded(provider._root[0])
        refuse_child_root(provider._root[0])
    break_after = _ti.graph_break_after(gm)
    break_before = _ti.resumed_after_break(code)
    if num_sites and (break_after or break_before):
        where = "; ".join(
            s for s in (f"graph ends at a graph break: {break_after}" if break_after else "",
                        f"graph resumes after a graph break in {break_before}" if break_before else "") if s
        )
        message = (
            f"mhc: {where}. Residual streams never cross a graph break: the {num_sites} site(s) of this graph "
            "would form their own chain(s), expanded at its start and collapsed at its end, so the rewritten "
            "model would differ from the one a single graph gives (per-block compile and FSDP2 units cut "
            "graphs the same way). Remove the break (find it with torch.compile(..., fullgraph=True), which "
            "makes any graph break an error), or use mhc_compile.convert, whose blocks carry the streams")
        if config.graph_breaks == "error":
            raise MHCBackendError(message + "; options={'graph_breaks': 'split'} accepts separate chains per graph.")
        _warn_once(("break", code, break_after), message + ".", MHCGraphBreakWarning)
    elif not num_sites and not (break_after or break_before) and not _ti.is_ddp_optimizer_piece(gm):
        reasons = "; ".join(f"{t.node}: {t.reason}" for t in report.not_taken[:3])
        _warn_once(
            ("none", code, id(type(report))),
            f"mhc: no residual site found in the graph of {code or 'this function'}"
            + (f" (adds not taken: {reasons})" if reasons else " (it has no add of x + f(x))")
            + f"; it is compiled unchanged by {config.inner!r}.",
            MHCNoResidualWarning,
        )
    _RECORDS.append(GraphRecord(code, config, report, num_sites, provider.created, provider.reused,
                                break_before, break_after, ddp is not None))
    del _RECORDS[:-_MAX_RECORDS]
    from .passes.recompute import recompute_context  # tags the joint graph for block recomputation

    with recompute_context(config, report):
        compiled = _ti.inner_compiler(config.inner, mode)(gm, example_inputs)
    if provider._root is None:
        return compiled
    return guard_instance(compiled, provider._root[0], example_inputs, num_sites)


def _warn_once(key: Any, message: str, category: type) -> None:
    if key in _WARNED:
        return
    _WARNED.add(key)
    warnings.warn(message, category, stacklevel=2)


# ----------------------------------------------------------------------------- parameters
class _ParamProvider:
    """``param_provider(site_name, init) -> {key: nn.Parameter}`` for one Dynamo graph."""

    def __init__(self, gm, example_inputs, scope, ddp):
        self.gm = gm
        self.example_inputs = example_inputs
        self.scope = scope
        self.ddp = ddp
        self._root: Optional[tuple[nn.Module, str, Any]] = None
        self.paths: dict[int, str] = {}  # id(param) -> its path from the root's Dynamo source
        self.created: list[str] = []
        self.reused: list[str] = []
        self._seen_sites: set[str] = set()

    # --- the root module the user compiled
    def root(self) -> tuple[nn.Module, str, Any]:
        if self._root is None:
            self._root = _find_root(self.gm, self.example_inputs, self.scope, self.ddp)
        return self._root

    def __call__(self, site_name: str, init: Mapping[str, torch.Tensor]) -> dict[str, nn.Parameter]:
        if site_name in self._seen_sites:
            raise MHCBackendError(f"mhc: site name {site_name!r} requested twice in one graph; site names must be unique")
        self._seen_sites.add(site_name)
        root, stripped, _ = self.root()
        path = normalize_path(site_name)
        if stripped and (path == stripped or path.startswith(stripped + ".")):
            path = path[len(stripped):].lstrip(".")
        container, cname = _container_for(root, path)
        if isinstance(init, SiteInit) and container.init_recipe is None:
            container.init_recipe = init.recipe  # for reset_parameters
        existing = dict(container.named_parameters(recurse=False))
        keys = [safe_name(k) for k in init]
        if existing:
            missing = [k for k in keys if k not in existing]
            bad = [k for k, v in zip(keys, init.values()) if k in existing and tuple(existing[k].shape) != tuple(v.shape)]
            if missing or bad:
                raise MHCBackendError(
                    f"mhc: site {site_name!r} already has parameters {sorted(existing)} at {cname!r} that do not "
                    f"match this rewrite (missing {missing}, shape mismatch {bad}); was the model compiled with "
                    "different mhc options? Use a fresh model, or the same options."
                )
            self.reused += [f"{cname}.{k}" for k in keys]
            for k in keys:
                self.paths[id(existing[k])] = ".".join(s for s in (stripped, cname, k) if s)
            return {orig: existing[k] for orig, k in zip(init, keys)}
        if self.ddp is not None:
            raise MHCBackendError(
                "mhc: the model is wrapped in DistributedDataParallel but its mHC parameters do not exist yet; "
                "parameters created now would not be registered with DDP's reducer (gradients not all-reduced, "
                "replicas diverge). Create them before wrapping: compiled = torch.compile(model, backend='mhc', "
                "options=...); mhc_compile.materialize(compiled, batch); then DDP(model) (see docs/backend.md)."
            )
        device = _module_device(root, path)
        out = {}
        for orig, k in zip(init, keys):
            value = init[orig]
            if _ti._is_fake(value):
                raise MHCBackendError(f"mhc: init value {orig!r} of site {site_name!r} is a fake/meta tensor")
            value = value.detach().clone()
            if device is not None:
                value = value.to(device)
            p = attach(container, {k: nn.Parameter(value, requires_grad=True)})[k]
            out[orig] = p
            self.created.append(f"{cname}.{k}")
            self.paths[id(p)] = ".".join(s for s in (stripped, cname, k) if s)
            _CREATED.setdefault(root, weakref.WeakSet()).add(p)
        _CREATED_VERSION[0] += 1
        _install_optimizer_guard()
        return out

    def register_sources(self) -> None:
        """Give AOTAutograd a Dynamo source for every parameter the rewrite added to the graph module."""
        root_source = self._root[2] if self._root is not None else None
        sources = {}
        for name, tensor in _ti.graph_param_names_without_source(self.gm):
            path = self.paths.get(id(tensor))
            if path is not None and root_source is not None:
                sources[name] = _ti.attr_source(root_source, path)
            else:
                sources[name] = _ti.synthetic_source(name)
        if sources:
            _ti.register_param_sources(self.gm, sources)


def _container_for(root: nn.Module, path: str) -> tuple[MHCSiteParams, str]:
    """The MHCSiteParams at ``path`` in ``root`` (created empty if absent) and its dotted name."""
    try:
        mod, name = site_container(root, path)
    except MHCPlacementError as exc:
        raise MHCBackendError(f"mhc: {exc}") from exc
    if not isinstance(mod, MHCSiteParams):
        raise MHCBackendError(f"mhc: cannot attach parameters at {path!r}: it is a {type(mod).__name__}")
    return mod, name


def _module_device(root: nn.Module, path: str) -> Optional[torch.device]:
    mod = root
    best = next(iter(root.parameters()), None)
    for part in [p for p in path.split(".") if p]:
        mod = mod._modules.get(part) if isinstance(mod, nn.Module) else None
        if mod is None:
            break
        p = next(iter(mod.parameters()), None)
        if p is not None:
            best = p
    return best.device if best is not None else None


def _find_root(gm, example_inputs, scope, ddp) -> tuple[nn.Module, str, Any]:
    """The user's module that owns this graph, unwrapped from DDP / OptimizedModule.

    Rule: the outermost nn.Module on the access path (Dynamo source) of the graph's parameters,
    read from the frame being compiled; else the module ``materialize`` is running; else the
    active DDP module. Two unrelated roots in one graph are an error. Returns (module, the
    attribute prefix stripped when unwrapping, the Dynamo source of the wrapped module or None).
    """
    explicit = _EXPLICIT_ROOT.get()
    candidates: dict[int, tuple[nn.Module, Any]] = {}
    if scope is not None:
        f_locals, f_globals, _ = scope
        for tensor, source in _ti.graph_tensor_sources(gm, example_inputs):
            found = _ti.resolve_root_module(source, f_locals, f_globals)
            if found is not None:
                candidates.setdefault(id(found[0]), found)
    roots = [m for m, _ in candidates.values()]
    if explicit is not None:
        inner_explicit, _ = _ti.unwrap_module(explicit)
        if not roots or all(_contains(explicit, r) or _contains(inner_explicit, r) for r in roots):
            roots = [explicit]
    if not roots and ddp is not None:
        roots = [ddp]
    if len(roots) > 1:
        top = [r for r in roots if all(_contains(r, o) for o in roots)]
        if not top:
            names = ", ".join(_ti.source_name(src) for _, src in candidates.values())
            raise MHCBackendError(
                f"mhc: this graph reads parameters of several unrelated modules ({names}); the backend cannot "
                "tell which one should own the new mHC parameters. Compile one module (torch.compile(model, "
                "backend='mhc')) or create them first with mhc_compile.materialize(compiled_model, batch)."
            )
        roots = top[:1]
    if not roots:
        raise MHCBackendError(
            "mhc: cannot find the nn.Module this graph belongs to (no parameter of the graph resolves to a module "
            "of the compiled frame), so the new mHC parameters would belong to no module and no optimizer would "
            "hold them. Compile the module itself (torch.compile(model, backend='mhc')), call "
            "mhc_compile.materialize(compiled_model, batch), or use mhc_compile.convert."
        )
    chosen = roots[0]
    source = candidates[id(chosen)][1] if id(chosen) in candidates else None
    inner, stripped = _ti.unwrap_module(chosen)
    return inner, stripped, source


def _contains(outer: nn.Module, inner: nn.Module) -> bool:
    return outer is inner or any(m is inner for m in outer.modules())


# ----------------------------------------------------------------------------- optimizer guard
_GUARD_HANDLE: list = []
_CHECKED: "weakref.WeakKeyDictionary[torch.optim.Optimizer, tuple]" = weakref.WeakKeyDictionary()


def _install_optimizer_guard() -> None:
    if not _GUARD_HANDLE:
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        _GUARD_HANDLE.append(register_optimizer_step_pre_hook(_optimizer_guard))


def _optimizer_guard(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """Refuse a step by an optimizer built before the mHC parameters existed.

    Such an optimizer holds every trainable parameter the model had before the first call but
    none of the new ones, which would then never be trained. (An optimizer that holds only part
    of the model, e.g. one of two, is left alone.)
    """
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    signature = (len(held), _CREATED_VERSION[0])
    if _CHECKED.get(optimizer) == signature:
        return
    for root, created in list(_CREATED.items()):
        mhc = [p for p in created if p.requires_grad]
        missing = [p for p in mhc if id(p) not in held]
        if not missing:
            continue
        mhc_ids = {id(p) for p in created}
        original = [p for p in root.parameters() if p.requires_grad and id(p) not in mhc_ids]
        if original and all(id(p) in held for p in original):
            raise MHCBackendError(
                f"mhc: this optimizer holds all of {type(root).__name__}'s original parameters but {len(missing)} of its "
                f"{len(mhc)} mHC parameters are missing: it was built before the mhc backend created them, so they "
                "would never be trained. Build the optimizer after the first call (like lazy modules): "
                "mhc_compile.materialize(compiled_model, batch); opt = Optimizer(model.parameters()). "
                "To freeze the mHC parameters on purpose, set requires_grad=False on them."
            )
    _CHECKED[optimizer] = signature


# ----------------------------------------------------------------------------- materialize
def materialize(model: nn.Module, *example_inputs: Any, **example_kwargs: Any) -> dict[str, nn.Parameter]:
    """Run one forward of ``model`` (compiled with backend "mhc") so its mHC parameters exist.

    Call it before building the optimizer, wrapping in DDP or loading a checkpoint that holds
    mHC parameters. It runs under the caller's grad mode, so the graph compiled here is the one
    the following calls use (under ``torch.no_grad()`` an inference graph; the training graph
    compiled later reuses the same parameters). No gradient and no optimizer step is taken.
    Returns the new parameters by name in the original module ({} if there were none to add,
    e.g. already materialized or a model from ``mhc_compile.convert``).
    """
    root, _ = _ti.unwrap_module(model)
    before = {id(p) for p in root.parameters()}
    token = _EXPLICIT_ROOT.set(model)
    try:
        model(*example_inputs, **example_kwargs)
    finally:
        _EXPLICIT_ROOT.reset(token)
    new = {n: p for n, p in root.named_parameters() if id(p) not in before}
    if not new and not mhc_parameters(root) and not hasattr(root, "mhc_report"):
        warnings.warn(
            f"mhc_compile.materialize: {type(root).__name__} has no mHC parameters after a forward; was it "
            "compiled with torch.compile(model, backend='mhc') (pass the compiled model), and does it have "
            "residual adds? (mhc_compile.backend.records() lists what the backend saw.)",
            stacklevel=2,
        )
    return new
