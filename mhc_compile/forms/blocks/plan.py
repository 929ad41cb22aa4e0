"""Which modules carry which part of each chain, read off the whole-model graph.

A chain's sites are grouped by block: the child, under the chain's lowest common module, that
holds the site's add (``blocks.3`` for ``x = x + attn(ln(x))`` in a block's forward; for a
post-LN BERT layer whose adds sit in ``layer.3.attention.output`` and ``layer.3.output``, the
layer ``layer.3``, whose trace then inlines the modules on the way to the adds). Each group is one *block*: the first block of a
chain expands the streams, the last collapses them, and the blocks in between take and return
the streams. That is only the same model when the parent does nothing with the hidden state
between two blocks: every reader of the value that passes from one block to the next must lie in
one of the two blocks. When a chain breaks one of these rules the plan says why in ``fallback``
and the model keeps the whole-graph form.

An *entry* block is a module that holds a chain's first sites and calls the blocks of the rest
itself (Wav2Vec2's encoder: ``x + pos_conv(x)``, a norm, then its layers): it expands the
streams and hands them to its first child block's call (``BlockPart.into``) instead of
returning them; the children are leaves of its trace.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ...passes.nodes import module_path, module_stack
from ...passes.streams import Chain


@dataclass
class BlockSite:
    """What the whole graph says about one site of a block: the block graph must agree."""

    name: str            # parameter prefix, relative to the model root ('blocks.0.attn.mhc')
    index_in_chain: int
    kind: str
    channels: int
    feature_axis: int
    add_path: str        # module path of the add (the block or a module inside it)


@dataclass
class BlockPart:
    """One chain's sites inside one block."""

    chain: int
    sites: list                  # BlockSite, in execution order
    stream_in: bool              # the block receives the streams (it is not the chain's first block)
    stream_out: bool             # the block returns the streams (it is not the chain's last block)
    into: str = ""               # entry block: the child block (relative path) whose call takes the streams


@dataclass
class BlockSpec:
    path: str                    # module path of the block ('' is the root module)
    parts: list = field(default_factory=list)

    @property
    def carries(self) -> bool:
        return any(p.stream_in or p.stream_out for p in self.parts)

    @property
    def through(self) -> list:
        """Modules inside the block (relative paths) on the way to its adds: traced, not leaves."""
        out: list = []
        for part in self.parts:
            for site in part.sites:
                rel = site.add_path[len(self.path) + 1:] if self.path else site.add_path
                if site.add_path == self.path or not rel:
                    continue
                bits = rel.split(".")
                out += [".".join(bits[:i]) for i in range(1, len(bits) + 1)]
        return list(dict.fromkeys(out))


@dataclass
class BlockPlan:
    blocks: list = field(default_factory=list)   # BlockSpec, in execution order
    fallback: str = ""                            # why the whole-graph form is kept ('' when it is not)


def _inside(node, *paths: str) -> bool:
    stack = module_stack(node)
    return any(p == "" or p in stack for p in paths)


def _cut(paths: list) -> list:
    """Each add's module cut one level below the lowest module common to all of them."""
    parts = [p.split(".") if p else [] for p in paths]
    common = 0
    while all(len(p) > common for p in parts) and len({p[common] for p in parts}) == 1:
        common += 1
    if all(len(p) == common for p in parts):  # every add in one module: that module
        return [".".join(p) for p in parts]
    return [".".join(p[:common + 1]) for p in parts]


def _under(path: str, parent: str) -> bool:
    return parent == "" or path.startswith(parent + ".")


def _block_paths(chain: Chain) -> list:
    """Each site's block: its add's module cut one level below the chain's common module; the
    first sites' own module when it holds them and every later add (an entry block)."""
    paths = [module_path(s.add) for s in chain.sites]
    k = next((i for i, p in enumerate(paths) if p != paths[0]), len(paths))
    if k < len(paths) and all(_under(p, paths[0]) for p in paths[k:]):
        return paths[:k] + _cut(paths[k:])
    return _cut(paths)


def _groups(chain: Chain) -> list:
    """[(block path, [site indices])] for consecutive sites in the same block."""
    out: list = []
    for k, path in enumerate(_block_paths(chain)):
        if out and out[-1][0] == path:
            out[-1][1].append(k)
        else:
            out.append((path, [k]))
    return out


def _boundary_problem(chain: Chain, k: int, here: str, there: str) -> str:
    """Why the streams cannot pass from block ``here`` (last site k) to block ``there``, or ''."""
    values = [chain.sites[k].add, *chain.between[k]]
    for v in chain.between[k]:
        if not _inside(v, here, there):
            return f"the parent applies {v.name} to the hidden state between {here} and {there}"
    for v in values:
        for u in v.users:
            if u.op != "output" and not _inside(u, here, there):
                return (f"the parent reads the hidden state between {here} and {there} "
                        f"({u.name} in {module_path(u) or 'the root'})")
            if u.op == "output":
                return f"the model returns the hidden state between {here} and {there}"
    return ""


def plan_blocks(chains: list) -> BlockPlan:
    """The block plan of a whole-model graph's chains (see the module docstring)."""
    plan = BlockPlan()
    specs: dict = {}
    for chain in chains:
        groups = _groups(chain)
        paths = [p for p, _ in groups]
        if len(set(paths)) != len(paths):
            plan.fallback = f"chain {chain.index} enters module {paths[0]!r} twice (a block called more than once)"
            return plan
        for i, a in enumerate(paths):
            for b in paths:
                if a != b and _under(b, a) and not (i == 0 and len(paths) > 1 and _under(paths[1], a)):
                    plan.fallback = (f"chain {chain.index} runs through {a or 'the root'!r} and its submodule "
                                     f"{b!r}: the residual adds are at two levels of the module tree")
                    return plan
        for g, (path, idx) in enumerate(groups):
            if g + 1 < len(groups):
                why = _boundary_problem(chain, idx[-1], path, groups[g + 1][0])
                if why:
                    plan.fallback = f"chain {chain.index}: {why}"
                    return plan
            sites = [BlockSite(chain.sites[k].name, chain.sites[k].index_in_chain, chain.sites[k].kind,
                               chain.sites[k].channels, chain.sites[k].feature_axis,
                               module_path(chain.sites[k].add)) for k in idx]
            into = groups[g + 1][0] if g + 1 < len(groups) and _under(groups[g + 1][0], path) else ""
            part = BlockPart(chain.index, sites, stream_in=g > 0, stream_out=g + 1 < len(groups),
                             into=into[len(path) + 1:] if path else into)
            spec = specs.setdefault(path, BlockSpec(path))
            spec.parts.append(part)
    for spec in specs.values():
        if spec.carries and len(spec.parts) > 1:
            plan.fallback = (f"module {spec.path!r} holds sites of chains {[p.chain for p in spec.parts]} and "
                             "would carry more than one set of streams")
            return plan
    plan.blocks = list(specs.values())  # first seen: chains in order, blocks in chain order
    return plan
