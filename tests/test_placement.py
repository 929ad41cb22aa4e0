"""passes/placement: one helper places mHC parameters for the convert path and the backend."""
import pytest
import torch
from torch import nn

from mhc_compile.passes.placement import (
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
