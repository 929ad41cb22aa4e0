"""ResidualReport: what residual detection found (sites, chains, adds not taken) and what the rewrite adds.

Returned by ``mhc_compile.find_residuals`` and ``graph_pipeline.rewrite_graph``; printable as a
table (``str(report)`` / ``report.to_table()``) and as JSON (``report.to_json()``,
``report.to_dict()``). Also owns how shapes read in text: :func:`shape_text`, with the capture's
dynamic-size symbols (``s95``, ``s75``, ...) renumbered ``s0``, ``s1``, ... in order of first
appearance (:func:`symbol_names`); the JSON keeps the raw shapes.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Optional

_SYMBOL = re.compile(r"\bs\d+\b")  # torch's dynamic-size symbols: s0, s95, ...


def symbol_names(texts: Iterable[Any]) -> dict[str, str]:
    """Readable names of the dynamic-size symbols in ``texts`` (shape dims, messages): ``s0``,
    ``s1``, ... in order of first appearance, so the same size reads the same everywhere."""
    names: dict[str, str] = {}
    for text in texts:
        for sym in _SYMBOL.findall(str(text)):
            names.setdefault(sym, f"s{len(names)}")
    return names


def rename_symbols(text: Any, names: dict[str, str]) -> str:
    """``text`` with every symbol named in ``names`` replaced by its readable name."""
    return _SYMBOL.sub(lambda m: names.get(m.group(0), m.group(0)), str(text))


def dynamic_legend(names: dict[str, str]) -> str:
    """One line saying what the renamed symbols are."""
    return f"({', '.join(names.values())}: dynamic sizes, they follow the inputs' shapes)"


def shape_text(shape: Iterable[Any], names: Optional[dict[str, str]] = None) -> str:
    """``2×16×64``; a dynamic dim reads as its (renamed) symbol or expression: ``s0×s1×64``."""
    return "×".join(rename_symbols(d, names or {}) for d in shape) or "?"


@dataclass
class SiteReport:
    index: int               # global site index, execution order
    name: str                # parameter prefix, e.g. 'blocks.0.attn.mhc' ('' when not rewritten)
    module_path: str         # module owning the branch (or the add)
    add: str                 # FX node name of the add
    kind: str                # residual | parallel | layer_scale
    shape: list
    dtype: str
    feature_axis: int
    channels: Optional[int]
    chain: int
    index_in_chain: int
    home_stream: int
    skip_ops: list = field(default_factory=list)  # FX node names from the stream to the add's skip operand


@dataclass
class ChainReport:
    index: int
    sites: list              # global site indices
    start: str               # FX node name of the stream's start value
    end: str                 # FX node name of the last site's add
    stream_wise_ops: list    # FX node names of stream-wise ops applied between sites


@dataclass
class NotTakenReport:
    node: str
    module_path: str
    reason: str


@dataclass
class NativeStreamsReport:
    """A residual state that already carries a stream axis (native hyper-connections): left alone."""

    axis: int                # the stream axis of the state (-1: known from the config/modules only)
    streams: int
    shape: list
    modules: list            # module paths of the adds on the state
    message: str             # the one line convert and the table print


class ReportVersionError(ValueError):
    """A stored report dict was written by a newer mhc-compile (or is not a report at all)."""


@dataclass
class ResidualReport:
    """The typed contract every reader of a rewrite takes (backend, recompute, CLI, diagnostics).

    ``to_dict`` / :meth:`from_dict` round-trip it through JSON (``mhc.json``, ``.pt2`` extras);
    the dict carries ``version`` (:attr:`VERSION`), and a dict from a newer version is refused.
    """

    VERSION = 1

    streams: int
    sites: list = field(default_factory=list)
    chains: list = field(default_factory=list)
    not_taken: list = field(default_factory=list)
    params_added: int = 0
    param_names: list = field(default_factory=list)
    rewritten: bool = False
    # how ``convert`` built the model: 'blocks' (stream-carrying blocks), 'whole-graph' (the
    # model's forward runs the rewritten whole graph) or '' (a graph rewrite: backend, CLI)
    form: str = ""
    form_reason: str = ""        # why the whole-graph form was kept ('' for 'blocks')
    blocks: list = field(default_factory=list)   # module paths of the blocks that carry a chain
    native: list = field(default_factory=list)   # NativeStreamsReport: states already multi-stream

    @property
    def num_sites(self) -> int:
        return len(self.sites)

    @property
    def num_chains(self) -> int:
        return len(self.chains)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.VERSION,
            "streams": self.streams,
            "num_sites": self.num_sites,
            "num_chains": self.num_chains,
            "params_added": self.params_added,
            "rewritten": self.rewritten,
            "sites": [asdict(s) for s in self.sites],
            "chains": [asdict(c) for c in self.chains],
            "not_taken": [asdict(t) for t in self.not_taken],
            "param_names": list(self.param_names),
            "form": self.form,
            "form_reason": self.form_reason,
            "blocks": list(self.blocks),
            "native": [asdict(n) for n in self.native],
        }

    @classmethod
    def from_dict(cls, data: Any) -> "ResidualReport":
        """The inverse of :meth:`to_dict`. A dict without ``version`` is read as version 1 (what
        mhc-compile 0.1 wrote); a newer version or a malformed dict raises ReportVersionError."""
        if isinstance(data, cls):
            return data
        if not isinstance(data, dict):
            raise ReportVersionError(f"a residual report must be a dict, got {type(data).__name__}")
        version = data.get("version", 1)
        if not isinstance(version, int) or version > cls.VERSION or version < 1:
            raise ReportVersionError(
                f"residual report version {version!r} is not readable by this mhc-compile "
                f"(reads versions 1 to {cls.VERSION}); upgrade mhc-compile or re-run `mhc convert`")
        try:
            return cls(
                streams=int(data["streams"]),
                sites=[SiteReport(**s) for s in data.get("sites") or []],
                chains=[ChainReport(**c) for c in data.get("chains") or []],
                not_taken=[NotTakenReport(**t) for t in data.get("not_taken") or []],
                params_added=int(data.get("params_added", 0)),
                param_names=list(data.get("param_names") or []),
                rewritten=bool(data.get("rewritten", False)),
                form=str(data.get("form", "")),
                form_reason=str(data.get("form_reason", "")),
                blocks=list(data.get("blocks") or []),
                native=[NativeStreamsReport(**n) for n in data.get("native") or []],
            )
        except (KeyError, TypeError) as exc:
            raise ReportVersionError(f"malformed residual report dict: {exc}") from exc

    def to_json(self, indent: Optional[int] = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def symbol_names(self) -> dict[str, str]:
        """Readable names of the dynamic-size symbols in the site shapes and the adds' reasons."""
        return symbol_names([d for s in self.sites for d in s.shape] + [n.message for n in self.native]
                            + [t.reason for t in self.not_taken])

    def to_table(self) -> str:
        names = self.symbol_names()
        head = ["#", "site", "kind", "shape", "axis", "C", "chain", "pos", "home"]
        rows = [[str(s.index), s.name or s.module_path or s.add, s.kind,
                 shape_text(s.shape, names), str(s.feature_axis), str(s.channels), str(s.chain),
                 str(s.index_in_chain), str(s.home_stream)] for s in self.sites]
        widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(head)]
        line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
        out = [f"mHC residual report: {self.num_sites} site(s) in {self.num_chains} chain(s), "
               f"n={self.streams} streams, {self.params_added} parameter(s) added"]
        if self.form == "blocks":
            out.append(f"form: stream-carrying blocks ({len(self.blocks)}: {', '.join(self.blocks[:4])}"
                       f"{', ...' if len(self.blocks) > 4 else ''})")
        elif self.form:
            out.append(f"form: {self.form}" + (f" ({self.form_reason})" if self.form_reason else ""))
        out += [f"native hyper-connections: {rename_symbols(n.message, names)}" for n in self.native]
        if rows:
            out += [line(head), line(["-" * w for w in widths])] + [line(r) for r in rows]
        if names:
            out.append(dynamic_legend(names))
        for c in self.chains:
            ops = f"; stream-wise ops: {', '.join(c.stream_wise_ops)}" if c.stream_wise_ops else ""
            out.append(f"chain {c.index}: sites {c.sites} (stream starts at {c.start}, ends after {c.end}{ops})")
        for s in self.sites:
            if s.skip_ops:
                out.append(f"site {s.index}: skip operand is the stream through {', '.join(s.skip_ops)}")
        if self.not_taken:
            out.append(f"adds not taken ({len(self.not_taken)}):")
            for t in self.not_taken:
                where = f" in {t.module_path}" if t.module_path else ""
                out.append(f"  {t.node}{where}: {rename_symbols(t.reason, names)}")
        return "\n".join(out)

    def __str__(self) -> str:
        return self.to_table()
