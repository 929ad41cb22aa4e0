"""The graph analysis pipeline on one FX graph (not the conversion pipeline of a model,
``pipeline.py``): analyze (detect sites, build chains, name them), emit the
mHC ops for every chain (``passes.rewrite``), and build the ``ResidualReport``.

    analyze(graph) -> (DetectResult, [Chain])          sites named (``assign_names``)
    rewrite_graph(gm, config, param_provider) -> ResidualReport
    build_report(detected, chains, config, rewritten, names) -> ResidualReport

Every entry point reads graphs through here: the conversion pipeline (``pipeline.py``, which works
on a model: example, capture, this analysis, the forms), the ``torch.compile`` backend, the
stream-carrying blocks (``analyze`` on a block's graph, then ``passes.rewrite.rewrite_chain_part``)
and the whole-graph form. ``passes/`` holds the passes themselves; this module only orders them.
"""
from __future__ import annotations

from typing import Optional

from torch import fx

from . import reference
from .config import MHCConfig
from .passes.detect import DetectResult, detect_sites
from .passes.rewrite import ParamProvider, default_param_provider, rewrite_chain
from .passes.streams import build_chains
from .placement import safe_path
from .report import ChainReport, NativeStreamsReport, NotTakenReport, ResidualReport, SiteReport

__all__ = ["analyze", "assign_names", "build_report", "rewrite_graph", "site_param_count"]


def assign_names(sites: list) -> None:
    """Give each site a unique parameter prefix (``site.name``)."""
    used: set = set()
    for k, site in enumerate(sites):
        base = safe_path(site.branch_path)
        name = f"{base}.mhc" if base else ""
        if not name or name in used:
            owner = safe_path(site.module_path)
            name = f"{owner}.mhc_site{k}" if owner else f"mhc_site{k}"
        while name in used:
            name += "_"
        used.add(name)
        site.name = name


def site_param_count(n: int, channels: int, dynamic: bool) -> int:
    """How many mHC parameters one site adds (n streams, ``channels`` wide)."""
    count = 2 * n + n * n
    if dynamic:
        count += n * channels * reference.num_logits(n) + 3
    return count


def build_report(detected: DetectResult, chains: list, config: MHCConfig, rewritten: bool, names=()) -> ResidualReport:
    """The report of ``analyze``'s sites and chains (``rewritten``: the rewrite ran; ``names``: the
    parameters it registered)."""
    n = config.streams
    sites = [s for c in chains for s in c.sites]
    order = {id(s): i for i, s in enumerate(detected.sites)}
    sites.sort(key=lambda s: order[id(s)])
    index = {id(s): i for i, s in enumerate(sites)}
    rep = ResidualReport(streams=n, rewritten=rewritten, param_names=list(names))
    for i, s in enumerate(sites):
        try:
            ch = s.channels
        except Exception:
            ch = None
        rep.sites.append(SiteReport(
            index=i, name=s.name, module_path=s.branch_path or s.module_path, add=s.add.name, kind=s.kind,
            shape=list(s.shape), dtype=str(s.dtype).replace("torch.", ""), feature_axis=s.feature_axis,
            channels=ch, chain=s.chain, index_in_chain=s.index_in_chain,
            home_stream=reference.home_stream(s.index_in_chain, n), skip_ops=[p.name for p in s.skip_path],
        ))
        if ch is not None:
            rep.params_added += site_param_count(n, ch, config.dynamic)
    for c in chains:
        rep.chains.append(ChainReport(
            index=c.index, sites=[index[id(s)] for s in c.sites], start=c.start.name, end=c.sites[-1].add.name,
            stream_wise_ops=[p.name for gap in c.between for p in gap],
        ))
        if config.collapse == "learned":
            rep.params_added += n
    rep.not_taken = [NotTakenReport(t.node, t.module_path, t.reason) for t in detected.not_taken]
    rep.native = [NativeStreamsReport(s.axis, s.streams, [str(d) for d in s.shape], s.modules(), s.describe())
                  for s in detected.native]
    return rep


def analyze(graph: fx.Graph, axis_hint: Optional[int] = None) -> tuple:
    """Detect sites and build chains; returns (DetectResult, chains) with names assigned.
    ``axis_hint``: see :func:`detect.detect_sites`."""
    detected = detect_sites(graph, axis_hint)
    chains = build_chains(graph, detected)
    ordered = sorted((s for c in chains for s in c.sites), key=lambda s: detected.sites.index(s))
    assign_names(ordered)
    return detected, chains


def rewrite_graph(gm: fx.GraphModule, config: Optional[MHCConfig] = None,
                  param_provider: Optional[ParamProvider] = None, analysis: Optional[tuple] = None) -> ResidualReport:
    """Rewrite every residual chain of ``gm`` in place into n-stream mHC and recompile it.

    Works on aten-level (``torch.export``) and torch-level (Dynamo) graphs. Returns the report;
    ``report.rewritten`` is False (and ``gm`` untouched apart from making in-place adds
    explicit) when no site was found. ``analysis``: the :func:`analyze` of ``gm.graph`` when the
    caller already has it (and has not changed the graph since).
    """
    config = MHCConfig() if config is None else config
    if not isinstance(config, MHCConfig):  # entry points build the config once; passes never rebuild it
        raise TypeError(f"rewrite_graph needs an MHCConfig, got {type(config).__name__}; "
                        "build one with MHCConfig.from_options(options) at the entry point")
    provider = param_provider or default_param_provider
    detected, chains = analysis if analysis is not None else analyze(gm.graph)
    names: list = []
    if not chains:
        return build_report(detected, chains, config, rewritten=False)
    for chain in chains:
        rewrite_chain(gm, chain, config, provider, names)
    gm.graph.lint()
    gm.recompile()
    return build_report(detected, chains, config, rewritten=True, names=names)
