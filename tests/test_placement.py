"""placement: one helper places mHC parameters for the convert path and the backend."""
import pickle
import subprocess
import sys

import pytest
import torch
from torch import nn

from mhc_compile.placement import (
    CONTAINER_ATTR, MHCPlacementError, MHCSiteParams, attach, safe_name, safe_path, site_container,
)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(2, 2) for _ in range(2)])
        self.scale = 3.0


def test_safe_names_are_ascii_identifiers():
    assert safe_name("blocks") == "blocks"
    assert safe_name("a-b.c") == "a_b_c"
    assert safe_name("") == "_"
    assert safe_name("ä") == "_"  # the backend and the rewrite agree on non-ASCII names
    assert safe_path("blocks.0..attn-x") == "blocks.0.attn_x"


def test_container_is_created_along_the_path_and_reused():
    net = _Net()
    mod, name = site_container(net, "blocks.0.attn.mhc")
    assert name == "blocks.0.attn.mhc" and isinstance(mod, MHCSiteParams)
    assert net.blocks[0].attn.mhc is mod
    again, _ = site_container(net, "blocks.0.attn.mhc")
    assert again is mod


def test_root_path_gets_the_default_container_name():
    net = _Net()
    mod, name = site_container(net, "")
    assert name == CONTAINER_ATTR and getattr(net, CONTAINER_ATTR) is mod


def test_never_added_to_a_module_list():
    net = _Net()
    mod, name = site_container(net, "blocks.extra")
    assert name == "blocks_extra" and net.blocks_extra is mod
    assert len(net.blocks) == 2


def test_non_module_attribute_is_refused():
    with pytest.raises(MHCPlacementError, match="'scale' is an attribute"):
        site_container(_Net(), "scale.mhc")


def test_attach_registers_and_replaces_parameters():
    box = MHCSiteParams()
    first = attach(box, {"phi": torch.zeros(3), "b-pre": nn.Parameter(torch.ones(2))})
    assert set(dict(box.named_parameters())) == {"phi", "b_pre"}
    assert first["b-pre"] is box.b_pre and torch.equal(box.phi, torch.zeros(3))
    kept = attach(box, {"b_pre": box.b_pre})
    assert kept["b_pre"] is first["b-pre"]
    new = nn.Parameter(torch.full((3,), 2.0))
    attach(box, {"phi": new})
    assert box.phi is new


def test_backend_and_convert_name_parameters_alike():
    """A checkpoint moves between the two paths: the same site gives the same parameter names."""
    import mhc_compile
    from mhc_compile import MHCConfig
    from mhc_compile.models import TinyGPT

    torch.manual_seed(0)
    model = TinyGPT(vocab=32, dim=16, layers=2, heads=2, max_len=8)
    ids = torch.randint(0, 16, (2, 8))
    converted = mhc_compile.convert(model, MHCConfig(streams=2), (ids,))
    conv_names = {k for k, _ in converted.named_parameters() if ".mhc" in k or "mhc_" in k}
    compiled = torch.compile(model, backend="mhc", options={"streams": 2})
    mhc_compile.materialize(compiled, ids)
    back_names = {k for k, _ in model.named_parameters() if ".mhc" in k or "mhc_" in k}
    assert conv_names and conv_names == back_names


def _randomize_mhc(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".mhc" in name:
                p.add_(0.5 * torch.randn(p.shape, generator=g))


def _reset_all(model) -> int:
    boxes = [m for m in model.modules() if isinstance(m, MHCSiteParams)]
    for m in boxes:
        m.reset_parameters()
    return len(boxes)


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_reset_parameters_restores_the_function_preserving_init():
    import mhc_compile
    from mhc_compile import MHCConfig
    from tests.models.zoo import tiny_gpt, token_inputs

    torch.manual_seed(0)
    model, x = tiny_gpt(), token_inputs(2, 8)
    conv = mhc_compile.convert(model, MHCConfig(streams=4, collapse="learned"), x)
    _randomize_mhc(conv)
    with torch.no_grad():
        assert _rel(conv(*x), model(*x)) > 1e-3
        assert _reset_all(conv) == 5  # 4 sites and the chain's learned collapse
        assert _rel(conv(*x), model(*x)) < 1e-5


def test_backend_containers_reset_too():
    import mhc_compile
    from tests.models.zoo import tiny_gpt, token_inputs

    torch._dynamo.reset()
    torch.manual_seed(0)
    model, x = tiny_gpt(), token_inputs(2, 8)
    with torch.no_grad():
        want = model(*x)
    compiled = torch.compile(model, backend="mhc", options={"streams": 4, "inner": "aot_eager"})
    mhc_compile.materialize(compiled, *x)
    _randomize_mhc(model)
    with torch.no_grad():
        assert _rel(compiled(*x), want) > 1e-3
        assert _reset_all(model) == 4
        assert _rel(compiled(*x), want) < 1e-5


def test_models_pickled_under_the_old_module_paths_still_load(tmp_path):
    """placement.py and mode_switch.py moved out of passes/ (and mode_switch out of convert.py
    before): a model pickled then names the classes by the old paths; a fresh interpreter loads it."""
    from mhc_compile import mode_switch

    net = nn.Module()  # torch classes only, apart from the moved ones
    net.blocks = nn.ModuleList([nn.Linear(2, 2)])
    container, _ = site_container(net, "blocks.0.mhc")
    attach(container, {"b_pre": nn.Parameter(torch.arange(3.0))})
    net.drop, net.bn = mode_switch._ModeDropout(), mode_switch._ModeBatchNorm()
    old = {MHCSiteParams: "mhc_compile.passes.placement", mode_switch._ModeDropout: "mhc_compile.passes.mode_switch",
           mode_switch._ModeBatchNorm: "mhc_compile.convert"}
    try:
        for cls, path in old.items():
            cls.__module__ = path
        data = pickle.dumps(net)
    finally:
        for cls in old:
            cls.__module__ = "mhc_compile." + ("placement" if cls is MHCSiteParams else "mode_switch")
    for path in old.values():
        assert path.encode() in data
    (tmp_path / "old.pkl").write_bytes(data)
    code = ("import pickle, sys, torch\n"
            "net = pickle.loads(open(sys.argv[1], 'rb').read())\n"
            "from mhc_compile.placement import MHCSiteParams\n"
            "from mhc_compile.mode_switch import _ModeBatchNorm, _ModeDropout\n"
            "assert type(net.blocks[0].mhc) is MHCSiteParams, type(net.blocks[0].mhc)\n"
            "assert type(net.drop) is _ModeDropout and type(net.bn) is _ModeBatchNorm\n"
            "assert torch.equal(net.blocks[0].mhc.b_pre, torch.arange(3.0))\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "old.pkl")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
