"""passes.nodes, the one home for FX node naming: the module paths of a GPT's residual sites read
the same on a torch.export graph and on a Dynamo graph, and the CLI's graph rendering uses it."""
from __future__ import annotations

import torch

from mhc_compile.passes import detect_sites
from mhc_compile.passes.nodes import module_path, normalize_path, target_name
from tests.models.zoo import tiny_gpt, token_inputs

EXPECTED = ["blocks.0", "blocks.0", "blocks.1", "blocks.1"]


def _site_paths(graph):
    return [module_path(s.add) for s in detect_sites(graph).sites]


def test_export_and_dynamo_graphs_name_sites_alike():
    torch.manual_seed(0)
    model, x = tiny_gpt(), token_inputs()
    export_graph = torch.export.export(model, x, strict=False).module().graph
    graphs = []

    def grab(gm, example_inputs):
        graphs.append(gm.graph)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=grab, fullgraph=True)(*x)
    torch._dynamo.reset()
    paths_export, paths_dynamo = _site_paths(export_graph), _site_paths(graphs[0])
    assert [p.split(".")[:2] for p in paths_export] == [p.split(".")[:2] for p in paths_dynamo]
    assert [".".join(p.split(".")[:2]) for p in paths_export] == EXPECTED
    assert {target_name(s.add) for s in detect_sites(export_graph).sites} == {"add"}


def test_normalize_dynamo_spellings():
    assert normalize_path("L['self'].blocks[3].attn") == "blocks.3.attn"
    assert normalize_path("getattr(getattr(L['self'].layers, '0'), 'mlp')") == "layers.0.mlp"
    assert normalize_path("L__self___blocks") == "blocks"


def test_render_module_label_uses_the_naming_home():
    from mhc_compile.cli.render import _module_of

    g = torch.fx.Graph()
    a = g.placeholder("a")
    a.meta["nn_module_stack"] = {"L__self___blocks_0": ("L['self'].blocks[0].attn", object)}
    assert _module_of(a) == "blocks.0.attn" == module_path(a)
