"""Stability diagnostics for mHC / HC models (DESIGN.md "Stability diagnostics", paper section 5).

This module owns the *Amax gain magnitude* and the per-stream health report:

* forward gain of a mixing matrix ``H`` = max absolute row sum ``max_i sum_j |H[i, j]|``
  (how much ``H`` can amplify a signal travelling forward through the streams);
* backward gain = max absolute column sum ``max_j sum_i |H[i, j]|`` (the same for gradients);
* both are computed per token and **averaged over the tokens** of a batch;
* per site (one ``H_res^(l)``) and per chain for the composite ``prod_l H_res^(l)`` (in execution
  order: ``H_res^(L) ... H_res^(1)``), plus the cumulative composite after every site of a chain.

A doubly stochastic ``H_res`` (mHC) has both gains exactly 1, and so does any product of them;
unconstrained hyper-connections (``variant="hc"``) can drift far from 1 when trained hard.

Coefficients are collected with :func:`mhc_compile.ops.record_coeffs`, which works for converted
models and inside compiled graphs. Stream tensors are recorded (eager models only) by
:class:`record_streams`, a ``TorchDispatchMode`` that watches ``mhc::pre`` / ``mhc::boundary``: it reports the
RMS of each of the n streams at each site and how far the streams are from each other
("divergence", 0 when all n streams are identical copies, i.e. collapsed to one stream).

Public API::

    amax_gain(h_res) -> Gain(forward, backward)           pure, on (..., n, n) tensors
    composite(h_res_list) -> Tensor (..., n, n)            H_L @ ... @ H_1, per token
    gains_from_records(records, chains=None, names=None, streams=None) -> GainReport
    amax_gains(model, *inputs, chains=None, names=None, streams="auto", **kwargs) -> GainReport
    record_streams()                                       context manager -> list of StreamStats
    GainReport.to_table() / .to_dict() / .max_forward / .max_backward
"""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from . import ops
from .mode_switch import set_training
from .ops.table import OPS
from .report import ResidualReport

__all__ = [
    "Gain",
    "SiteGain",
    "ChainGain",
    "StreamStats",
    "GainReport",
    "amax_gain",
    "composite",
    "row_col_sums",
    "gains_from_records",
    "amax_gains",
    "record_streams",
]


class Gain(NamedTuple):
    """Amax gain magnitude, averaged over tokens."""

    forward: float  # mean over tokens of the max absolute row sum
    backward: float  # mean over tokens of the max absolute column sum


def _as_matrices(h_res: Tensor) -> Tensor:
    if h_res.dim() < 2 or h_res.shape[-1] != h_res.shape[-2]:
        raise ValueError(f"expected (..., n, n) mixing matrices, got shape {tuple(h_res.shape)}")
    return h_res.detach().to(torch.float64).reshape(-1, h_res.shape[-2], h_res.shape[-1])


def row_col_sums(h_res: Tensor) -> tuple[Tensor, Tensor]:
    """Absolute row sums and column sums per token: two (T, n) float64 tensors."""
    m = _as_matrices(h_res).abs()
    return m.sum(dim=-1), m.sum(dim=-2)


def amax_gain(h_res: Tensor) -> Gain:
    """Forward (max |row sum|) and backward (max |column sum|) gain of ``h_res`` (..., n, n).

    Leading dims are tokens; each token's gain is computed separately and the result is the
    mean over tokens. Static coefficients (leading dims of size 1) count as one token.
    """
    rows, cols = row_col_sums(h_res)
    return Gain(float(rows.amax(-1).mean()), float(cols.amax(-1).mean()))


def composite(h_res_list: Sequence[Tensor]) -> Tensor:
    """Per-token product ``H_L @ ... @ H_1`` of matrices given in execution order ``[H_1, ..., H_L]``.

    Shapes broadcast (a static site's (1, ..., 1, n, n) with a dynamic site's (B, T, n, n)).
    Computed in float64 so that large HC gains do not lose precision.
    """
    if len(h_res_list) == 0:
        raise ValueError("composite of an empty chain")
    out = h_res_list[0].detach().to(torch.float64)
    for h in h_res_list[1:]:
        out = torch.matmul(h.detach().to(torch.float64), out)
    return out


# ----------------------------------------------------------------------------- stream recorder
@dataclass
class StreamStats:
    """The stream tensor X (..., n, C) entering one site, summarised."""

    rms: list[float]  # RMS of each of the n streams over tokens and features
    divergence: float  # RMS of (X_i - mean_j X_j) over all i, relative to the RMS of mean_j X_j


def _stream_stats(x: Tensor) -> StreamStats:
    x = x.detach().to(torch.float64)
    n = x.shape[-2]
    per = x.transpose(-2, 0).reshape(n, -1) if x.dim() > 2 else x
    rms = per.pow(2).mean(-1).sqrt()
    mean = x.mean(dim=-2, keepdim=True)
    spread = (x - mean).pow(2).mean().sqrt()
    base = mean.pow(2).mean().sqrt()
    div = float(spread / base) if float(base) > 0 else float("inf") if float(spread) > 0 else 0.0
    return StreamStats(rms=[float(v) for v in rms], divergence=div)


class record_streams:
    """Context manager recording a :class:`StreamStats` for the streams entering every site.

    Eager (and converted, non-compiled) models only: it is a ``TorchDispatchMode``, so it sees
    each ``mhc::pre`` call and each fused ``mhc::boundary`` call (whose stream output enters the
    next site); together they occur exactly once per site, in execution order::

        with diagnostics.record_streams() as streams:
            model(x)
        streams[3].rms  # per-stream RMS at site 3
    """

    def __enter__(self) -> list:
        from ._torch_internals import dispatch_mode_base

        TorchDispatchMode = dispatch_mode_base()
        records: list = []
        # ops/table.py: where the streams entering a site show (pre's input; boundary's streams output)
        entry = {op.op().default: op for op in OPS.values() if op.site_entry is not None}

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                op = entry.get(func)
                if op is not None and op.site_entry == "input":
                    records.append(_stream_stats(args[0]))
                out = func(*args, **(kwargs or {}))
                if op is not None and op.site_entry == "output":
                    records.append(_stream_stats(out[op.stream_out]))
                return out

        self.records = records
        self._mode = _Mode()
        self._mode.__enter__()
        return records

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)


# ----------------------------------------------------------------------------- report
@dataclass
class SiteGain:
    index: int  # execution order of the site
    name: str
    chain: int
    forward: float  # gain of this site's H_res
    backward: float
    pre_max: float  # mean over tokens of max_i H_pre[i] (1/n: reads all streams evenly)
    pre_sum: float  # mean over tokens of sum_i H_pre[i] (1 at a preserving init)
    post_mean: float  # mean of H_post
    stream_rms: Optional[list[float]] = None
    stream_divergence: Optional[float] = None


@dataclass
class ChainGain:
    index: int
    sites: list[int]
    forward: float  # gain of the composite prod_l H_res^(l)
    backward: float
    forward_max: float  # worst token
    backward_max: float
    cumulative_forward: list[float] = field(default_factory=list)  # composite of sites[:k+1]
    cumulative_backward: list[float] = field(default_factory=list)
    row_sums: list[float] = field(default_factory=list)  # per output stream, mean over tokens
    col_sums: list[float] = field(default_factory=list)  # per input stream, mean over tokens


@dataclass
class GainReport:
    streams: int
    sites: list[SiteGain]
    chains: list[ChainGain]

    @property
    def max_forward(self) -> float:
        """Largest composite forward gain over all chains."""
        return max((c.forward for c in self.chains), default=float("nan"))

    @property
    def max_backward(self) -> float:
        return max((c.backward for c in self.chains), default=float("nan"))

    @property
    def max_site_forward(self) -> float:
        return max((s.forward for s in self.sites), default=float("nan"))

    @property
    def max_site_backward(self) -> float:
        return max((s.backward for s in self.sites), default=float("nan"))

    def to_dict(self) -> dict[str, Any]:
        return {
            "streams": self.streams,
            "sites": [asdict(s) for s in self.sites],
            "chains": [asdict(c) for c in self.chains],
            "max_forward": self.max_forward,
            "max_backward": self.max_backward,
        }

    def to_table(self) -> str:
        """A plain-text table: one row per site, then one per chain composite."""
        has_streams = any(s.stream_rms is not None for s in self.sites)
        head = f"{'site':>4}  {'name':<28} {'chain':>5} {'fwd gain':>10} {'bwd gain':>10} {'max H_pre':>9} {'H_post':>7}"
        if has_streams:
            head += f" {'diverg':>7}  stream RMS"
        lines = [head]
        for s in self.sites:
            line = (
                f"{s.index:>4}  {s.name[:28]:<28} {s.chain:>5} {s.forward:>10.4g} {s.backward:>10.4g}"
                f" {s.pre_max:>9.3f} {s.post_mean:>7.3f}"
            )
            if s.stream_rms is not None:
                line += f" {s.stream_divergence:>7.3f}  " + " ".join(f"{v:.3g}" for v in s.stream_rms)
            lines.append(line)
        for c in self.chains:
            span = f"{c.sites[0]}..{c.sites[-1]}" if c.sites else "-"
            lines.append(
                f"chain {c.index} (sites {span}, {len(c.sites)} sites): composite fwd gain {c.forward:.4g}"
                f" (worst token {c.forward_max:.4g}), bwd gain {c.backward:.4g} (worst token {c.backward_max:.4g})"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_table()


def gains_from_records(
    records: Sequence[tuple[Tensor, Tensor, Tensor]],
    chains: Optional[Sequence[Sequence[int]]] = None,
    names: Optional[Sequence[str]] = None,
    streams: Optional[Sequence[StreamStats]] = None,
) -> GainReport:
    """Build a :class:`GainReport` from ``(h_pre, h_post, h_res)`` records in execution order.

    ``chains``: lists of record indices, each in execution order; default: one chain of all.
    ``names``: one name per record (default ``site{i}``). ``streams``: one :class:`StreamStats`
    per record (from :class:`record_streams`), or None.
    """
    if not records:
        raise ValueError("no mHC coefficients were recorded: is this a converted mHC model?")
    num = len(records)
    if chains is None:
        chains = [list(range(num))]
    chains = [list(c) for c in chains if len(c) > 0]
    for c in chains:
        bad = [i for i in c if not 0 <= i < num]
        if bad:
            raise ValueError(f"chain {c} names sites {bad} but only {num} were recorded")
    if names is None or len(names) != num:
        names = [f"site{i}" for i in range(num)]
    if streams is not None and len(streams) != num:
        warnings.warn(f"recorded {len(streams)} stream tensors for {num} sites; stream stats dropped")
        streams = None
    chain_of = {}
    for ci, c in enumerate(chains):
        for i in c:
            chain_of.setdefault(i, ci)
    n = records[0][2].shape[-1]

    sites = []
    for i, (h_pre, h_post, h_res) in enumerate(records):
        g = amax_gain(h_res)
        hp = h_pre.detach().to(torch.float64).reshape(-1, h_pre.shape[-1])
        sites.append(
            SiteGain(
                index=i,
                name=str(names[i]),
                chain=chain_of.get(i, -1),
                forward=g.forward,
                backward=g.backward,
                pre_max=float(hp.amax(-1).mean()),
                pre_sum=float(hp.sum(-1).mean()),
                post_mean=float(h_post.detach().to(torch.float64).mean()),
                stream_rms=None if streams is None else list(streams[i].rms),
                stream_divergence=None if streams is None else streams[i].divergence,
            )
        )

    chain_gains = []
    for ci, c in enumerate(chains):
        cum_f, cum_b = [], []
        prod = None
        for i in c:
            h = records[i][2].detach().to(torch.float64)
            prod = h if prod is None else torch.matmul(h, prod)
            g = amax_gain(prod)
            cum_f.append(g.forward)
            cum_b.append(g.backward)
        rows, cols = row_col_sums(prod)
        chain_gains.append(
            ChainGain(
                index=ci,
                sites=list(c),
                forward=cum_f[-1],
                backward=cum_b[-1],
                forward_max=float(rows.amax(-1).max()),
                backward_max=float(cols.amax(-1).max()),
                cumulative_forward=cum_f,
                cumulative_backward=cum_b,
                row_sums=[float(v) for v in rows.mean(0)],
                col_sums=[float(v) for v in cols.mean(0)],
            )
        )
    return GainReport(streams=int(n), sites=sites, chains=chain_gains)


# ----------------------------------------------------------------------------- from a model
def _report_of(model, num_records: int) -> Any:
    """The rewrite report of ``model``: ``model.mhc_report`` (convert), else, for a model compiled
    with the ``"mhc"`` backend, the newest backend record whose sites are exactly this model's
    mHC parameter prefixes and number ``num_records`` (one graph, no graph break)."""
    for obj in (model, getattr(model, "_orig_mod", None)):
        if obj is None:
            continue
        rep = getattr(obj, "mhc_report", None)  # set by convert / load on the converted module
        if isinstance(rep, ResidualReport):
            return rep
    try:
        from . import backend

        prefixes = {name.rsplit(".", 1)[0] for name in backend.mhc_parameters(model)}
        for rec in reversed(backend.records()):
            names = [s.name for s in rec.report.sites]
            if len(names) == num_records and names and set(names) == prefixes:
                return rec.report
    except Exception:  # noqa: BLE001 - the backend is optional here; fall back to one chain
        return None
    return None


def _get(obj, key, default=None):
    if isinstance(obj, dict):
        return obj.get(key, default)
    return getattr(obj, key, default)


def chains_from_report(report: Any, num_records: int) -> tuple[Optional[list[list[int]]], Optional[list[str]]]:
    """Site chains (as lists of execution-order indices) and site names from a rewrite report.

    Understands :class:`mhc_compile.report.ResidualReport` (``chains[k].sites`` are global site
    indices, ``sites[i].name`` the parameter prefix) and plain dicts/lists of the same shape,
    where a site is an int index or an object with ``index``/``name``. Returns (None, None) when the
    report does not describe exactly ``num_records`` sites.
    """
    if report is None:
        return None, None
    raw_chains = _get(report, "chains")
    if not raw_chains:
        return None, None
    chains: list[list[int]] = []
    names: dict[int, str] = {}
    counter = 0
    for rc in raw_chains:
        sites = _get(rc, "sites", rc)
        if not isinstance(sites, Iterable):
            return None, None
        idx = []
        for s in sites:
            if isinstance(s, int):
                i = s
            else:
                i = _get(s, "index")
                if not isinstance(i, int):
                    i = counter
                nm = _get(s, "name") or _get(s, "path")
                if nm is not None:
                    names[i] = str(nm)
            counter += 1
            idx.append(i)
        chains.append(idx)
    flat = sorted(i for c in chains for i in c)
    if flat != list(range(num_records)):
        return None, None
    for s in _get(report, "sites") or []:  # ResidualReport.sites: objects with index and name
        i, nm = _get(s, "index"), _get(s, "name") or _get(s, "module_path")
        if isinstance(i, int) and nm and i not in names:
            names[i] = str(nm)
    name_list = [names.get(i, f"site{i}") for i in range(num_records)]
    return chains, name_list


def _is_compiled(model) -> bool:
    return hasattr(model, "_orig_mod") or type(model).__name__ == "OptimizedModule"


def amax_gains(
    model: torch.nn.Module,
    *inputs: Any,
    chains: Optional[Sequence[Sequence[int]]] = None,
    names: Optional[Sequence[str]] = None,
    streams: Any = "auto",
    **kwargs: Any,
) -> GainReport:
    """Run ``model(*inputs, **kwargs)`` once under ``no_grad`` and report its Amax gains.

    Works on converted models and on compiled ones (coefficients are recorded by
    :func:`mhc_compile.ops.record_coeffs`). The model is put in eval mode for the run and its
    mode restored afterwards. Sites are grouped into chains from ``chains``, else from the rewrite
    report attached to the model (``model.mhc_report``) or, for ``torch.compile(model,
    backend="mhc")``, the backend's record of the graph, else one chain of all recorded sites.
    ``streams``: "auto" records per-stream RMS on eager models, True forces it, False skips it.
    """
    was_training = model.training
    want_streams = (not _is_compiled(model)) if streams == "auto" else bool(streams)
    set_training(model, False)
    try:
        with torch.no_grad(), ops.record_coeffs() as records:
            if want_streams:
                with record_streams() as stream_recs:
                    model(*inputs, **kwargs)
            else:
                stream_recs = None
                model(*inputs, **kwargs)
    finally:
        set_training(model, was_training)
    if chains is None:
        chains, rep_names = chains_from_report(_report_of(model, len(records)), len(records))
        if names is None:
            names = rep_names
    return gains_from_records(records, chains=chains, names=names, streams=stream_recs)
