"""The engines' own init reaches the mHC parameters, and torchtitan's default (flex) Llama3 converts.

* torchtitan 0.3.0's own Llama3 (``attn_backend="flex"``: every block takes a ``BlockMask``)
  converts to the blocks form, passes ``verify_module_protocol``, keeps its function at init and,
  at perturbed mHC parameters, still honours the document mask it is called with (a mask unlike
  the example's: no value of the example's mask is baked in).
* meta init -> convert -> ``to_empty`` -> the engine's own init (torchtitan ``init_weights``, HF
  ``init_weights``/``post_init``, a plain ``reset_parameters`` walk) gives every mHC parameter its
  function-preserving init exactly; loading a checkpoint afterwards is not reset.
* ``MHCSiteParams.reset_parameters`` writes into DTensor parameters (``Replicate`` on a one-rank
  gloo mesh here; sharded ones under FSDP2 in ``tests/test_pipeline_parallel.py``).
"""
from __future__ import annotations

import os
import tempfile
import warnings

import pytest
import torch
import torch.nn.functional as F

import mhc_compile
from mhc_compile.placement import MHCSiteParams

CFG = mhc_compile.MHCConfig(streams=2, kernels="reference")


def _containers(model):
    return [m for m in model.modules() if isinstance(m, MHCSiteParams)]


def _assert_at_init(model) -> int:
    """Every mHC parameter equals its recipe's init value exactly; returns how many were checked."""
    checked = 0
    for box in _containers(model):
        for key, value in box.init_recipe.values().items():
            p = box._parameters[key]
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            assert torch.equal(full.detach().cpu(), value.to(full.dtype)), key
            checked += 1
    assert checked
    return checked


def _fill_garbage(model) -> None:
    with torch.no_grad():
        for box in _containers(model):
            for p in box.parameters():
                p.fill_(float("nan"))


def _perturb(model, seed: int = 0, scale: float = 0.3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for box in _containers(model):
            for p in box.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * scale)


# --- torchtitan ------------------------------------------------------------------------------

def _titan():
    from models.titan_llama3 import require_torchtitan
    require_torchtitan()
    from models.titan_llama3 import flex_masks, tiny_llama3
    return tiny_llama3, flex_masks


def _positions(batch: int, docs: list) -> torch.Tensor:
    return torch.cat([torch.arange(n) for n in docs]).repeat(batch, 1)


def test_titan_flex_llama3_converts_and_honours_the_call_mask():
    tiny_llama3, flex_masks = _titan()
    model = tiny_llama3("flex")
    tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    masks = flex_masks(model, 2, 32)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        conv = mhc_compile.convert(model, CFG, (tokens,), example_kwargs={"attention_masks": masks})
    # the BlockMask's length ties the capture only: the blocks run other lengths (below, 20 of 32)
    assert not [w for w in seen if "fixes some input sizes" in str(w.message)]
    assert conv.mhc_report.form == "blocks" and type(conv) is type(model)
    conv.verify_module_protocol()
    with torch.no_grad():
        err = float((conv(tokens, attention_masks=masks) - model(tokens, attention_masks=masks)).abs().max())
    print(f"flex Llama3 converted at init: max |diff| {err:.3g}")
    assert err < 1e-5
    _perturb(conv)
    two_docs = conv.get_attention_masks(_positions(2, [12, 20]))
    alone = conv.get_attention_masks(_positions(2, [20]))
    with torch.no_grad():
        out = conv(tokens, attention_masks=two_docs)
        second = conv(tokens[:, 12:], attention_masks=alone)
        changed = tokens.clone()
        changed[:, :12] = (changed[:, :12] + 7) % 256
        out_changed = conv(changed, attention_masks=two_docs)
    doc_err = float((out[:, 12:] - second).abs().max())
    print(f"perturbed mHC: second document vs alone max |diff| {doc_err:.3g}")
    assert doc_err < 1e-4
    assert torch.equal(out[:, 12:], out_changed[:, 12:])  # no leak from the first document
    assert not torch.allclose(out[:, :12], out_changed[:, :12])


def test_titan_meta_to_empty_init_weights_restores_mhc_and_keeps_loaded_values(monkeypatch):
    tiny_llama3, flex_masks = _titan()
    from models.titan_llama3 import patch_dense_flex

    patch_dense_flex(monkeypatch)  # flex attention has no CPU backward
    real = tiny_llama3("flex")
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))
    masks = flex_masks(real, 2, 16)
    meta = tiny_llama3("flex", device="meta")
    conv = mhc_compile.convert(meta, CFG, (tokens,), example_kwargs={"attention_masks": masks})  # a CPU mask
    conv.verify_module_protocol()
    conv.to_empty(device="cpu")
    _fill_garbage(conv)
    conv.init_weights(buffer_device=None)
    n = _assert_at_init(conv)
    assert all(torch.isfinite(p).all() for p in conv.parameters())
    # the model's own weights from the same seed: the converted model computes the original's function
    conv.load_state_dict({**conv.state_dict(), **real.state_dict()})
    with torch.no_grad():
        err = float((conv(tokens, attention_masks=masks) - real(tokens, attention_masks=masks)).abs().max())
    loss = F.cross_entropy(conv(tokens, attention_masks=masks).flatten(0, 1), tokens.flatten())
    loss.backward()
    print(f"titan meta flow: {n} mHC tensors at init, |conv - orig| {err:.3g}, loss {float(loss.detach()):.4f}")
    assert err < 1e-5 and torch.isfinite(loss)
    # a checkpoint loaded after init is not reset by anything but an init call
    _perturb(conv, seed=3)
    trained = {k: v.clone() for k, v in conv.state_dict().items() if ".mhc" in k}
    conv.load_state_dict(conv.state_dict())
    conv.to("cpu")
    assert all(torch.equal(conv.state_dict()[k], v) for k, v in trained.items())
    conv.init_weights(buffer_device=None)
    _assert_at_init(conv)


class _Scale:
    """An argument export cannot take (neither tensor, constant nor pytree), like a BlockMask."""

    def __init__(self, v: float):
        self.v = v


class _ObjBlock(torch.nn.Module):
    def __init__(self, c: int = 16):
        super().__init__()
        self.norm, self.lin = torch.nn.LayerNorm(c), torch.nn.Linear(c, c)

    def forward(self, x, obj):
        return x + self.lin(self.norm(x)) * obj.v


class _ObjNet(torch.nn.Module):
    def __init__(self, c: int = 16):
        super().__init__()
        self.blocks = torch.nn.ModuleList([_ObjBlock(c), _ObjBlock(c)])
        self.head = torch.nn.Linear(c, 4)

    def forward(self, x, obj, shift=None):
        for block in self.blocks:
            x = block(x, obj)
        return self.head(x) if shift is None else self.head(x) + shift


def test_opaque_positional_argument_is_bound_for_capture_and_passed_per_call():
    torch.manual_seed(0)
    model = _ObjNet().eval()
    x = torch.randn(2, 5, 16)
    conv = mhc_compile.convert(model, CFG, (x, _Scale(0.5)))
    assert conv.mhc_report.form == "blocks" and not hasattr(model, "mhc_report")
    assert "forward" not in model.__dict__  # the capture's binding is gone
    with torch.no_grad():
        for v in (0.5, 2.0):  # 2.0 was never seen: a baked-in example would give 0.5's output
            err = float((conv(x, _Scale(v)) - model(x, _Scale(v))).abs().max())
            assert err < 1e-5, (v, err)
    with pytest.raises(mhc_compile.MHCCaptureError, match="whole-graph form cannot take"):
        mhc_compile.convert(model, CFG, (x, _Scale(0.5)), form="whole-graph")


# --- Hugging Face ----------------------------------------------------------------------------

def _hf_llama():
    transformers = pytest.importorskip("transformers")
    return transformers, transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                  num_hidden_layers=2, num_attention_heads=2,
                                                  num_key_value_heads=2, max_position_embeddings=64)


@pytest.mark.parametrize("how", ["init_weights", "post_init", "initialize_weights"])
def test_hf_meta_to_empty_own_init_restores_mhc(how):
    transformers, cfg = _hf_llama()
    with torch.device("meta"):
        meta = transformers.LlamaForCausalLM(cfg)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    conv = mhc_compile.convert(meta, CFG, (ids,))
    conv.to_empty(device="cpu")
    _fill_garbage(conv)
    getattr(conv, how)()
    n = _assert_at_init(conv)
    assert all(torch.isfinite(p).all() for p in conv.parameters())
    torch.manual_seed(0)
    plain = transformers.LlamaForCausalLM(cfg).eval()
    conv.load_state_dict({**conv.state_dict(), **plain.state_dict()})
    conv.eval()
    with torch.no_grad():
        err = float((conv(ids).logits - plain(ids).logits).abs().max())
    print(f"HF {how}: {n} mHC tensors at init, |conv - orig| {err:.3g}")
    assert err < 1e-5


def test_plain_reset_parameters_walk_restores_mhc():
    from models.titan import tiny_titan

    meta_model = None
    with torch.device("meta"):
        meta_model = tiny_titan()
    conv = mhc_compile.convert(meta_model, CFG, (torch.zeros(2, 8, dtype=torch.long),))
    conv.to_empty(device="cpu")
    _fill_garbage(conv)
    for m in conv.modules():
        if callable(getattr(m, "reset_parameters", None)):
            m.reset_parameters()
    _assert_at_init(conv)


# --- DTensor parameters ----------------------------------------------------------------------

def test_reset_parameters_on_replicated_and_sharded_dtensors_one_rank():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, distribute_tensor

    from models.titan import tiny_titan

    own = not dist.is_initialized()
    if own:
        store = os.path.join(tempfile.mkdtemp(), "rendezvous")
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        example = (torch.zeros(2, 8, dtype=torch.long),)
        sharded = mhc_compile.convert(tiny_titan(), CFG, example)
        for layer in sharded.layers.values():
            fully_shard(layer, mesh=mesh)
        fully_shard(sharded, mesh=mesh)
        replicated = mhc_compile.convert(tiny_titan(), CFG, example)  # TP-style replicated mHC parameters
        for box in _containers(replicated):
            for name, p in list(box.named_parameters()):
                box.register_parameter(name, torch.nn.Parameter(distribute_tensor(p.detach(), mesh, [Replicate()])))
        for model in (sharded, replicated):
            assert all(hasattr(p, "placements") for box in _containers(model) for p in box.parameters())
            _fill_garbage(model)
            for box in _containers(model):
                box.reset_parameters()
            _assert_at_init(model)
        with torch.device("meta"):  # sharded on meta: a reset before to_empty writes nothing, and does not fail
            meta = tiny_titan()
        meta = mhc_compile.convert(meta, CFG, example)
        fully_shard(meta, mesh=mesh)
        for box in _containers(meta):
            box.reset_parameters()
        meta.to_empty(device="cpu")
        _fill_garbage(meta)
        for box in _containers(meta):
            box.reset_parameters()
        _assert_at_init(meta)
    finally:
        if own:
            dist.destroy_process_group()
