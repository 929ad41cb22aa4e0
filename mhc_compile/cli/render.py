"""What ``mhc inspect`` shows: the residual report as a table, JSON, DOT, SVG or HTML.

This module owns the *inspect view*: a plain, JSON-able dict built from a residual report plus
the model, with the estimated cost of the rewrite, and the renderers of that dict.

Cost model (per residual site, per token; ``n`` streams, ``C`` features, ``b`` bytes per element
of the model dtype; documented in docs/cli.md):

    coeffs    reads nC                 FLOPs 2·nC·(2n+n²)   (the projection x·φ; RMS, sigmoid and
                                                            Sinkhorn are O(n²) per token, ignored)
    pre       reads nC,  writes C      FLOPs 2nC
    post_res  reads (n+1)C, writes nC  FLOPs 2n²C + 2nC
    ---------------------------------------------------------------------------------------
    mHC total bytes  b·C·(4n+2)        FLOPs 2nC(2n+n²) + 2n²C + 4nC
    extra bytes over the plain add it replaces (reads 2C, writes C): b·C·(4n−1)

Public API::

    build_view(report, config, model, converted=None, dtype=None) -> dict
    site_cost(n, C, bytes_per_elem) -> dict
    to_text(view) -> str
    to_json(view) -> str
    graph_to_dot(graphs: list[(title, torch.fx.Graph)], view) -> str
    render_svg(dot_text) -> str | None       (None: Graphviz is not installed)
    svg_available() -> bool
    to_html(view, svg=None, dot_text=None) -> str
"""
from __future__ import annotations

import html
import json
import shutil
import subprocess
from typing import Any, Optional

import torch
from torch import nn

from ..report import ResidualReport, dynamic_legend, rename_symbols, shape_text, symbol_names

__all__ = ["build_view", "site_cost", "to_text", "to_json", "graph_to_dot", "render_svg", "to_html", "GRAPHVIZ_HELP"]

GRAPHVIZ_HELP = (
    "rendering SVG needs Graphviz: install the `dot` program (apt install graphviz / brew install graphviz) "
    "or `pip install graphviz` with the program on PATH; --format dot or html work without it"
)


# ------------------------------------------------------------------------------ report access
def _get(obj: Any, *names: str, default: Any = None) -> Any:
    """First present attribute / key of ``names`` (reports may be objects or dicts)."""
    for name in names:
        if isinstance(obj, dict):
            if name in obj and obj[name] is not None:
                return obj[name]
        else:
            val = getattr(obj, name, None)
            if val is not None:
                return val
    return default


def _plain(val: Any) -> Any:
    if isinstance(val, torch.Size):
        return [int(v) for v in val]
    if isinstance(val, (list, tuple)):
        return [_plain(v) for v in val]
    if isinstance(val, torch.dtype):
        return str(val).replace("torch.", "")
    if isinstance(val, (str, int, float, bool)) or val is None:
        return val
    return str(val)


def _symbol_names(view: dict) -> dict[str, str]:
    """Readable names (s0, s1, ...) of the dynamic-size symbols in the view's shapes and reasons."""
    return symbol_names([d for s in view["sites"] for d in s["shape"]] + list(view.get("native", []))
                        + [r["reason"] for r in view["rejected"]])


def _count_params(model: Optional[nn.Module]) -> int:
    if model is None:
        return 0
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def _model_dtype(model: Optional[nn.Module]) -> torch.dtype:
    if model is not None:
        for p in model.parameters():
            if p.dtype.is_floating_point:
                return p.dtype
    return torch.float32


def site_cost(n: int, C: int, bytes_per_elem: int) -> dict:
    """Estimated forward cost of one mHC site per token (see the module docstring)."""
    proj = 2 * n * C * (2 * n + n * n)
    mix = 2 * n * C + 2 * n * n * C + 2 * n * C
    return {
        "bytes": bytes_per_elem * C * (4 * n + 2),
        "extra_bytes": bytes_per_elem * C * (4 * n - 1),
        "projection_flops": proj,
        "mix_flops": mix,
        "flops": proj + mix,
    }


def build_view(report: Any, config: Any, model: Optional[nn.Module] = None, converted: Optional[nn.Module] = None,
               dtype: Optional[torch.dtype] = None) -> dict:
    """The inspect view: a JSON-able dict of sites, chains, adds not taken, parameters and cost.

    ``report`` is a :class:`mhc_compile.ResidualReport` (a stored one is read back with
    ``ResidualReport.from_dict``); ``config`` an MHCConfig; ``model``/``converted`` give the parameter count
    of the original model (and of the added parameters when the report lacks it).
    """
    if not isinstance(report, ResidualReport):
        raise TypeError(f"build_view needs a ResidualReport, got {type(report).__name__}")
    rdict = report.to_dict()
    cfg = config.to_dict()
    n = config.streams

    sites = []
    for i, s in enumerate(rdict.get("sites") or []):
        shape = _plain(_get(s, "shape", default=[]))
        feat = _get(s, "channels", default=None)
        if feat is None and shape:
            feat = shape[int(_get(s, "feature_axis", default=-1))]
        sites.append({
            "index": int(_get(s, "index", default=i)),
            "site": str(_get(s, "add", default=f"site{i}")),
            "params": str(_get(s, "name", default="") or ""),
            "module": str(_get(s, "module_path", default="") or ""),
            "kind": str(_get(s, "kind", default="residual")),
            "shape": shape,
            "dtype": str(_get(s, "dtype", default="") or ""),
            "features": int(feat or 0),
            "axis": _get(s, "feature_axis", default=-1),
            "chain": _get(s, "chain", default=0),
            "home_stream": _get(s, "home_stream", default=i % n),
            "skip_ops": _plain(_get(s, "skip_ops", default=[])),
        })
    chains = [{"index": int(_get(c, "index", default=ci)), "sites": [int(i) for i in _get(c, "sites", default=[])],
               "start": _plain(_get(c, "start", default=None)), "end": _plain(_get(c, "end", default=None)),
               "stream_wise_ops": _plain(_get(c, "stream_wise_ops", default=[]))}
              for ci, c in enumerate(rdict.get("chains") or [])]
    rejected = [{"site": str(_get(r, "node", default="?")), "module": str(_get(r, "module_path", default="") or ""),
                 "reason": str(_get(r, "reason", default=""))} for r in (rdict.get("not_taken") or [])]

    if dtype is None:
        site_dtypes = [s["dtype"] for s in sites if s["dtype"]]
        dtype = getattr(torch, site_dtypes[0].replace("torch.", ""), None) if site_dtypes else None
        if not isinstance(dtype, torch.dtype):
            dtype = _model_dtype(model if model is not None else converted)
    b = torch.empty((), dtype=dtype).element_size()

    orig = _count_params(model) if model is not None else None
    added = rdict.get("params_added")
    if not added and converted is not None and model is not None and converted is not model:
        added = _count_params(converted) - orig
    added = int(added or 0)
    if orig is None and converted is not None:  # only the converted model is at hand (.pt2 output)
        orig = _count_params(converted) - added

    costs = [site_cost(n, s["features"], b) for s in sites]
    total = {k: sum(c[k] for c in costs) for k in ("bytes", "extra_bytes", "projection_flops", "mix_flops", "flops")}
    for s, c in zip(sites, costs):
        s["cost"] = c
    return {
        "source": None,
        "streams": n,
        "config": cfg,
        "dtype": str(dtype).replace("torch.", ""),
        "bytes_per_element": b,
        "sites": sites,
        "chains": chains,
        "rejected": rejected,
        "native": [str(_get(x, "message", default="")) for x in (rdict.get("native") or [])],
        "params": {"original": orig, "added": added, "percent": (100.0 * added / orig) if orig else None},
        "cost_per_token": total,
    }


# -------------------------------------------------------------------------------------- text
def _s(count: int) -> str:
    return "" if count == 1 else "s"


def _fmt_percent(v: float) -> str:
    """Three significant digits: 6.81%, 20.8%, 0.00412% (small shares of big models stay visible)."""
    return f"{float(f'{v:.3g}'):g}%" if v else "0%"


def _fmt_count(v: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= div:
            return f"{v / div:.2f}{unit}"
    return f"{v:.0f}"


def _table(rows: list[list[str]], head: list[str]) -> list[str]:
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
    return [line(head), line(["-" * w for w in widths])] + [line(r) for r in rows]


def to_text(view: dict) -> str:
    out = []
    if view.get("source"):
        out.append(f"model: {view['source']}")
    n = view["streams"]
    out.append(f"mHC with n={n} streams, {view['dtype']} ({view['bytes_per_element']} bytes per element)")
    out.append("")
    names = _symbol_names(view)
    if view["sites"]:
        rows = [[s["index"], s["site"], s["module"] or "-", s["kind"], shape_text(s["shape"], names), s["axis"],
                 s["features"], s["chain"], s["home_stream"]] for s in view["sites"]]
        out.append(f"residual sites ({len(view['sites'])}):")
        out += _table(rows, ["#", "site (add)", "module path", "kind", "shape", "axis", "C", "chain", "home stream"])
        if names:
            out.append(dynamic_legend(names))
    elif not view.get("native"):
        out.append("residual sites: none found (the model has no residual add x + f(x) to rewrite)")
    out += [f"native hyper-connections: {rename_symbols(m, names)}" for m in view.get("native", [])]
    out.append("")
    for c in view["chains"]:
        span = " -> ".join(str(i) for i in c["sites"])
        ends = (f"; the value of node {c['start']} is expanded to n streams, collapsed after node {c['end']}"
                if c.get("start") and c.get("end") else "")
        out.append(f"chain {c['index']}: {len(c['sites'])} sites ({span}){ends}")
        if c.get("stream_wise_ops"):
            out.append(f"  stream-wise ops between sites (applied to every stream): {', '.join(c['stream_wise_ops'])}")
    for s in view["sites"]:
        if s.get("skip_ops"):
            out.append(f"site {s['index']}: skip operand is the stream through {', '.join(s['skip_ops'])}")
    if view["rejected"]:
        out.append("")
        out.append(f"adds not taken ({len(view['rejected'])}):")
        out += _table([[r["site"], r["module"] or "-", rename_symbols(r["reason"], names)] for r in view["rejected"]],
                      ["add", "module path", "why"])
    p = view["params"]
    out.append("")
    pct = f" ({_fmt_percent(p['percent'])} of {p['original']:,})" if p["percent"] is not None else ""
    out.append(f"parameters added: {p['added']:,}{pct}")
    c = view["cost_per_token"]
    out.append(
        f"estimated cost per token (forward): {_fmt_count(c['bytes'])}B moved by mHC ops "
        f"(+{_fmt_count(c['extra_bytes'])}B over the plain adds), {_fmt_count(c['flops'])} FLOPs "
        f"({_fmt_count(c['projection_flops'])} in the coefficient projection)"
    )
    return "\n".join(out)


def to_json(view: dict) -> str:
    return json.dumps(view, indent=2, default=str)


# --------------------------------------------------------------------------------------- DOT
def _target_name(node) -> str:
    t = node.target
    if node.op == "call_function":
        name = getattr(t, "__name__", None) if not hasattr(t, "_schema") else str(t)
        name = name or str(t)
        if str(getattr(t, "__module__", "")).startswith("mhc_compile") and not name.startswith("mhc."):
            name = "mhc." + name  # the mhc_compile.ops wrappers (expand, coeffs, pre, post_res, boundary, ...)
        for pre in ("aten.",):
            name = name[len(pre):] if name.startswith(pre) else name
        for suf in (".default", ".Tensor"):
            name = name[: -len(suf)] if name.endswith(suf) else name
        return name
    return str(t)


def _module_of(node) -> str:
    """The module path a node runs in (passes.nodes: the one home for node naming)."""
    from ..passes.nodes import module_path

    return module_path(node)


def _dot_id(prefix: str, name: str) -> str:
    return '"' + f"{prefix}:{name}".replace('"', "'") + '"'


def _dot_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def graph_to_dot(graphs: list[tuple[str, Any]], view: Optional[dict] = None, max_nodes: int = 3000) -> str:
    """One DOT digraph with a cluster per (title, fx.Graph): residual sites orange, mHC ops blue.

    Parameter reads (get_attr, parameter placeholders) and tuple indexing are left out so the
    picture shows the data flow.
    """
    sites = {s["site"] for s in (view or {}).get("sites", [])}
    rejected = {r["site"] for r in (view or {}).get("rejected", [])}
    lines = ["digraph mhc {", '  rankdir=TB; newrank=true; node [shape=box, style="rounded,filled", fillcolor=white, fontname="Helvetica", fontsize=10];']
    for gi, (title, graph) in enumerate(graphs):
        prefix = f"g{gi}"
        lines.append(f"  subgraph cluster_{gi} {{")
        lines.append(f'    label="{_dot_label(title)}"; fontsize=14; color=gray;')
        nodes = list(graph.nodes)
        if len(nodes) > max_nodes:
            lines.append(f'    "{prefix}:too_big" [label="{len(nodes)} nodes: too many to draw"];')
            lines.append("  }")
            continue
        skip, alias = set(), {}
        for node in nodes:
            if node.op == "get_attr" or (node.op == "call_module" and "guards" in str(node.target)) or (node.op == "placeholder" and (node.name.startswith(("p_", "b_", "c_")))):
                skip.add(node.name)
            elif node.op == "call_function" and getattr(node.target, "__name__", "") == "getitem":
                src = node.args[0]
                alias[node.name] = alias.get(src.name, src.name) if hasattr(src, "name") else node.name
        for node in nodes:
            if node.name in skip or node.name in alias:
                continue
            label = _target_name(node) if node.op not in ("placeholder", "output") else node.op + (f"\n{node.name}" if node.op == "placeholder" else "")
            mod = _module_of(node)
            if mod:
                label += f"\n{mod}"
            attrs = ""
            if "mhc" in label.split("\n")[0]:
                attrs = ', fillcolor="#cfe3ff", color="#3572b0"'
            elif node.name in sites and gi == 0:
                attrs = ', fillcolor="#ffd8a8", color="#d9480f", penwidth=2'
            elif node.name in rejected and gi == 0:
                attrs = ', fillcolor="#eeeeee", color="#999999", style="rounded,filled,dashed"'
            elif node.op in ("placeholder", "output"):
                attrs = ", shape=ellipse"
            lines.append(f'    {_dot_id(prefix, node.name)} [label="{_dot_label(label)}"{attrs}];')
        for node in nodes:
            if node.name in skip or node.name in alias:
                continue
            srcs = []
            for inp in node.all_input_nodes:
                if inp.name in skip:
                    continue
                srcs.append(alias.get(inp.name, inp.name))
            for s in dict.fromkeys(srcs):
                if s in skip:
                    continue
                lines.append(f"    {_dot_id(prefix, s)} -> {_dot_id(prefix, node.name)};")
        lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def svg_available() -> bool:
    """Whether :func:`render_svg` can work: the ``dot`` program is on PATH (the ``graphviz``
    python package also needs it)."""
    return shutil.which("dot") is not None


def render_svg(dot_text: str, timeout: float = 120.0) -> Optional[str]:
    """SVG from DOT with the Graphviz ``dot`` program or the ``graphviz`` package; None if neither."""
    exe = shutil.which("dot")
    if exe:
        proc = subprocess.run([exe, "-Tsvg"], input=dot_text.encode(), capture_output=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"dot failed: {proc.stderr.decode(errors='replace').strip().splitlines()[:1]}")
        return proc.stdout.decode()
    try:
        import graphviz  # type: ignore
    except ImportError:
        return None
    try:
        return graphviz.Source(dot_text).pipe(format="svg").decode()
    except Exception:  # the python package without the program
        return None


# -------------------------------------------------------------------------------------- HTML
_PALETTE = ["#4c6ef5", "#f76707", "#37b24d", "#ae3ec9", "#1098ad", "#f03e3e", "#f59f00", "#495057"]


def _short_label(text: str, limit: int) -> str:
    """``text`` if it fits in ``limit`` characters, else its last dotted components that fit,
    after an ellipsis (``transformer.h.0.attn`` -> ``…h.0.attn``); never a name cut mid-word
    unless its last component alone is too long."""
    if len(text) <= limit:
        return text
    parts, kept = text.split("."), []
    while parts and len(".".join([parts[-1], *kept])) <= limit - 1:
        kept.insert(0, parts.pop())
    return "…" + (".".join(kept) if kept else text[-(limit - 1):])


def chain_svg(view: dict) -> str:
    """A chain diagram drawn without Graphviz: per chain, n stream lanes and one box per site
    on the lane of its home stream."""
    n = max(1, int(view["streams"]))
    sites = {s["index"]: s for s in view["sites"]}
    names = _symbol_names(view)
    lane, box_w, gap, top = 26, 118, 16, 34
    width = 140 + max((len(c["sites"]) for c in view["chains"]), default=1) * (box_w + gap)
    parts, y = [], 10
    for c in view["chains"]:
        h = top + n * lane + 14
        parts.append(f'<text x="8" y="{y + 18}" font-size="13" font-weight="bold">chain {html.escape(str(c["index"]))}'
                     f' ({len(c["sites"])} sites)</text>')
        for k in range(n):
            ly = y + top + k * lane + lane / 2
            parts.append(f'<line x1="90" y1="{ly}" x2="{width - 10}" y2="{ly}" stroke="{_PALETTE[k % 8]}" stroke-width="2" opacity="0.45"/>')
            parts.append(f'<text x="8" y="{ly + 4}" font-size="11" fill="{_PALETTE[k % 8]}">stream {k}</text>')
        for j, si in enumerate(c["sites"]):
            s = sites.get(si, {"site": str(si), "module": "", "home_stream": 0, "shape": []})
            k = int(s["home_stream"]) % n if isinstance(s["home_stream"], int) else 0
            x = 100 + j * (box_w + gap)
            by = y + top + k * lane + 2
            label = _short_label(s["module"] or s["site"], 20 - len(f"{j}: "))
            tip = f'{s["site"]} {s["module"]} shape {shape_text(s["shape"], names)} home stream {s["home_stream"]}'
            parts.append(f'<g><title>{html.escape(tip)}</title><rect x="{x}" y="{by}" width="{box_w}" height="{lane - 4}" rx="5" '
                         f'fill="{_PALETTE[k % 8]}" opacity="0.9"/><text x="{x + 6}" y="{by + 15}" font-size="11" fill="white">'
                         f'{j}: {html.escape(label)}</text></g>')
        y += h
    if not view["chains"]:
        parts.append('<text x="8" y="24" font-size="13">no residual chains</text>')
        y = 40
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{y + 4}" '
            f'font-family="Helvetica, Arial, sans-serif">' + "".join(parts) + "</svg>")


def to_html(view: dict, svg: Optional[str] = None, dot_text: Optional[str] = None) -> str:
    """A self-contained HTML report: summary, chain diagram, sites, adds not taken, cost, graph."""
    e = html.escape
    p, c = view["params"], view["cost_per_token"]
    names = _symbol_names(view)
    pct = f" ({_fmt_percent(p['percent'])} of {p['original']:,})" if p["percent"] is not None else ""
    site_rows = "".join(
        f"<tr><td>{s['index']}</td><td><code>{e(s['site'])}</code></td><td><code>{e(s['module'] or '-')}</code></td><td>{e(s['kind'])}</td>"
        f"<td>{e(shape_text(s['shape'], names))}</td><td>{e(str(s['chain']))}</td>"
        f"<td><span class=dot style='background:{_PALETTE[int(s['home_stream']) % 8] if isinstance(s['home_stream'], int) else '#999'}'></span>{e(str(s['home_stream']))}</td>"
        f"<td>{_fmt_count(s['cost']['bytes'])}B</td><td>{_fmt_count(s['cost']['flops'])}</td></tr>"
        for s in view["sites"]
    ) or "<tr><td colspan=9>no residual sites found</td></tr>"
    rej_rows = "".join(
        f"<tr><td><code>{e(r['site'])}</code></td><td><code>{e(r['module'] or '-')}</code></td><td>{e(rename_symbols(r['reason'], names))}</td></tr>"
        for r in view["rejected"]
    ) or "<tr><td colspan=3>none</td></tr>"
    if svg:
        start = svg.find("<svg")
        graph = f"<div class=graph>{svg[start:] if start >= 0 else svg}</div>"
    else:
        graph = f"<p class=note>{e(GRAPHVIZ_HELP)}.</p>"
        if dot_text:
            graph += f"<details><summary>DOT source ({len(dot_text.splitlines())} lines)</summary><pre>{e(dot_text)}</pre></details>"
    cfg_rows = "".join(f"<tr><td>{e(k)}</td><td><code>{e(str(v))}</code></td></tr>" for k, v in view["config"].items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>mhc inspect: {e(str(view.get('source') or 'model'))}</title>
<style>
body{{font-family:Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}}
h1{{font-size:1.5em}} h2{{font-size:1.15em;margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}}
table{{border-collapse:collapse;font-size:.9em}} td,th{{border:1px solid #ddd;padding:.3em .6em;text-align:left}}
th{{background:#f4f4f8}} tr:nth-child(even) td{{background:#fafafa}} code{{font-size:.95em}}
.cards{{display:flex;gap:1em;flex-wrap:wrap}} .card{{background:#f4f6fb;border-radius:8px;padding:.8em 1.2em;min-width:10em}}
.card b{{display:block;font-size:1.5em}} .dot{{display:inline-block;width:.8em;height:.8em;border-radius:50%;margin-right:.4em}}
.graph{{overflow:auto;border:1px solid #ddd;max-height:80vh}} .note{{color:#a00}} pre{{background:#f7f7f7;padding:1em;overflow:auto;max-height:40em}}
</style></head><body>
<h1>mHC rewrite report{(': ' + e(str(view['source']))) if view.get('source') else ''}</h1>
<div class=cards>
<div class=card><b>{len(view['sites'])}</b>residual site{_s(len(view['sites']))}</div>
<div class=card><b>{len(view['chains'])}</b>chain{_s(len(view['chains']))}</div>
<div class=card><b>{view['streams']}</b>stream{_s(view['streams'])}</div>
<div class=card><b>{p['added']:,}</b>parameters added{e(pct)}</div>
<div class=card><b>{_fmt_count(c['bytes'])}B</b>moved per token by mHC ops (+{_fmt_count(c['extra_bytes'])}B over plain adds, {e(view['dtype'])})</div>
<div class=card><b>{_fmt_count(c['flops'])}</b>FLOPs per token ({_fmt_count(c['projection_flops'])} projection)</div>
</div>
<h2>Chains</h2>
{chain_svg(view)}
<h2>Residual sites</h2>
<table><tr><th>#</th><th>site (add)</th><th>module path</th><th>kind</th><th>shape</th><th>chain</th><th>home stream</th><th>bytes/token</th><th>FLOPs/token</th></tr>
{site_rows}</table>
<h2>Adds not taken</h2>
<table><tr><th>add</th><th>module path</th><th>why</th></tr>{rej_rows}</table>
<h2>Cost model</h2>
<p>Per site and token, with n streams, C features and b bytes per element: coeffs reads nC and costs 2&middot;nC&middot;(2n+n&sup2;) FLOPs
(the projection), pre reads nC and writes C, post_res reads (n+1)C and writes nC. Total b&middot;C&middot;(4n+2) bytes, of which
b&middot;C&middot;(4n&minus;1) are extra over the plain add (reads 2C, writes C).</p>
<h2>Configuration</h2>
<table>{cfg_rows}</table>
<h2>Graph before and after the rewrite</h2>
<p>Orange: residual adds that were rewritten; grey dashed: adds not taken; blue: mHC ops.</p>
{graph}
</body></html>
"""
