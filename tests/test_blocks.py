"""Stream-carrying blocks: ``convert`` keeps the model's class and module tree, and the n-stream
crosses the blocks as a real ``(..., n, C)`` tensor.

The reference is the whole-graph form of the same conversion (``form="whole-graph"``, the form
every earlier test checks against ``mhc_compile.reference``): with random (trained-like) mHC
parameters the block form must give the same outputs and gradients, which it only can when every
block carries the right streams with the right parameters.
"""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from mhc_compile import MHCCaptureError, MHCConfig, convert
from mhc_compile.example_call import ExampleCall
from mhc_compile.forms import ConvertedState, state_of
from mhc_compile.forms.blocks import BlockCallError
from mhc_compile.placement import MHCSiteParams

from models import zoo
from models.titan import tiny_titan

FAMILIES = {
    "gpt": (zoo.tiny_gpt, zoo.token_inputs, ["blocks.0", "blocks.1"]),
    "llama": (zoo.tiny_llama, zoo.token_inputs, ["layers.0", "layers.1"]),
    "bert": (zoo.tiny_bert, zoo.token_inputs, ["layers.0", "layers.1"]),
    "resnet_projection": (zoo.tiny_resnet_basic, zoo.image_inputs, ["layer1.0", "layer1.1", "layer2.1"]),
    "encdec": (zoo.tiny_encdec, zoo.encdec_inputs, ["enc.0", "enc.1", "dec.0", "dec.1"]),
    "titan": (tiny_titan, zoo.token_inputs, ["layers.0", "layers.1", "layers.2"]),
}


def _randomize(*models: nn.Module, seed: int = 1) -> None:
    """The same random mHC parameters (away from init) in every model."""
    first = dict(models[0].named_parameters())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in sorted(first):
            if ".mhc" in name:
                first[name].add_(0.3 * torch.randn(first[name].shape, generator=gen))
        for other in models[1:]:
            for name, p in other.named_parameters():
                if ".mhc" in name:
                    p.copy_(first[name])


def _loss_and_grads(model: nn.Module, inputs: tuple) -> tuple:
    model.zero_grad(set_to_none=True)
    loss = model(*inputs).float().pow(2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_loss_and_grads(a: nn.Module, b: nn.Module, inputs: tuple, label: str) -> None:
    """Equal loss and every gradient (mHC included) of two forms of one model."""
    l1, g1 = _loss_and_grads(a, inputs)
    l2, g2 = _loss_and_grads(b, inputs)
    torch.testing.assert_close(l1, l2, atol=1e-6, rtol=1e-5)
    assert set(g1) == set(g2) and any(".mhc" in k for k in g1)
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], atol=1e-5, rtol=1e-4, msg=lambda m: f"{label} {k}: {m}")


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    build, inputs, blocks = FAMILIES[request.param]
    torch.manual_seed(0)
    model, args = build(), inputs()
    cfg = MHCConfig(streams=4, kernels="reference")
    return request.param, model, args, blocks, convert(model, cfg, args), convert(model, cfg, args, form="whole-graph")


def test_class_tree_and_keys_are_kept(family):
    name, model, args, blocks, carried, whole = family
    assert type(carried) is type(model)
    assert carried.mhc_report.form == "blocks" and carried.mhc_report.blocks == blocks
    assert whole.mhc_report.form == "whole-graph" and type(whole) is type(model)
    original = set(model.state_dict())
    keys = set(carried.state_dict())
    assert original < keys and all(".mhc" in k for k in keys - original)
    assert keys == set(whole.state_dict())  # one set of names in every form
    assert {n for n, _ in model.named_modules()} <= {n for n, _ in carried.named_modules()}
    assert not any(".mhc" in k for k in model.state_dict())  # the original is not touched


def test_function_preserved_at_init(family):
    _, model, args, _, carried, _ = family
    with torch.no_grad():
        torch.testing.assert_close(carried(*args), model(*args), atol=2e-5, rtol=1e-4)


def test_random_mhc_params_equal_whole_graph(family):
    name, model, args, _, carried, whole = family
    carried, whole = copy.deepcopy(carried), copy.deepcopy(whole)
    _randomize(carried, whole)
    with torch.no_grad():
        assert (carried(*args) - model(*args)).abs().max() > 1e-3  # the mHC parameters matter
    carried.train(model.training), whole.train(model.training)
    _assert_same_loss_and_grads(carried, whole, args, name)


def test_stream_crosses_the_blocks():
    torch.manual_seed(0)
    model, (idx,) = zoo.tiny_gpt(layers=3), zoo.token_inputs()
    carried = convert(model, MHCConfig(streams=4, kernels="reference"), (idx,))
    shapes = {}
    for i, blk in enumerate(carried.blocks):
        blk.register_forward_hook(lambda m, a, out, i=i: shapes.__setitem__(i, (tuple(a[0].shape), tuple(out.shape))))
    carried(idx)
    b, t = idx.shape
    assert shapes[0] == ((b, t, 32), (b, t, 4, 32))          # the first block expands
    assert shapes[1] == ((b, t, 4, 32), (b, t, 4, 32))       # a middle block carries
    assert shapes[2] == ((b, t, 4, 32), (b, t, 32))          # the last collapses


def test_inplace_converts_the_given_object():
    torch.manual_seed(0)
    model, args = zoo.tiny_gpt(), zoo.token_inputs()
    ref = model(*args).detach()
    out = convert(model, MHCConfig(streams=2, kernels="reference"), args, inplace=True)
    assert out is model and any(".mhc" in k for k in model.state_dict())
    torch.testing.assert_close(model(*args), ref, atol=2e-5, rtol=1e-4)


class _ReadsBetween(nn.Module):
    """The parent reads the hidden state between its blocks (it sums them)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(zoo.VOCAB, 32)
        self.blocks = nn.ModuleList(zoo.GPTBlock(32) for _ in range(2))

    def forward(self, idx):
        h = self.emb(idx)
        seen = []
        for blk in self.blocks:
            h = blk(h)
            seen.append(h)
        return seen[0] + seen[1]


def test_parent_reading_between_blocks_falls_back_and_says_why():
    torch.manual_seed(0)
    model, args = _ReadsBetween().eval(), zoo.token_inputs()
    cfg = MHCConfig(streams=4, kernels="reference")
    out = convert(model, cfg, args)
    assert type(out) is _ReadsBetween and out.mhc_report.form == "whole-graph"
    assert "between blocks.0 and blocks.1" in out.mhc_report.form_reason
    with torch.no_grad():
        torch.testing.assert_close(out(*args), model(*args), atol=2e-5, rtol=1e-4)
    with pytest.raises(MHCCaptureError, match="cannot carry the streams"):
        convert(model, cfg, args, form="blocks")


class _ScaledBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln, self.fc = nn.LayerNorm(32), nn.Linear(32, 32)

    def forward(self, x, scale=None):
        y = self.fc(self.ln(x))
        if scale == 0:  # no residual add at all for this value
            return y
        if scale is not None:
            y = y * scale
        if self.training:  # a Python branch on the mode: one graph per mode
            y = y * 0.5
        return x + y


class _Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(zoo.VOCAB, 32)
        self.blocks = nn.ModuleList(_ScaledBlock() for _ in range(2))

    def forward(self, idx, scale=None):
        h = self.emb(idx)
        for blk in self.blocks:
            h = blk(h, scale=scale)
        return h


def _perturbed(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".mhc" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


def test_block_called_with_other_constants_is_traced_again():
    """A call with another specialised value (scale=2.0 where the example had None) traces the
    block once more with the block's own mHC parameters: at random mHC parameters it equals a
    model converted with scale=2.0 as its example, gradients included; the first variant is kept."""
    torch.manual_seed(0)
    model, args = _Scaled().eval(), zoo.token_inputs()
    cfg = MHCConfig(streams=4, kernels="reference")
    out = _perturbed(convert(model, cfg, args))
    ref = convert(model, cfg, args, example_kwargs={"scale": 2.0})
    ref.load_state_dict(out.state_dict())
    carry = state_of(out).blocks["blocks.1"]
    assert carry is out.blocks[1].__dict__["_mhc_carry"]  # the block's own forward state, listed in the model's
    before = len(carry.variants)
    got, want = out(*args, scale=2.0), ref(*args, scale=2.0)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert len(carry.variants) == before + 1
    got.square().sum().backward()
    want.square().sum().backward()
    for (name, p), q in zip(out.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=name)
    out(*args, scale=2.0)
    assert len(carry.variants) == before + 1  # traced once per signature
    with torch.no_grad():
        torch.testing.assert_close(out(*args), ref(*args, scale=None))


def test_block_call_that_cannot_carry_the_streams_raises():
    torch.manual_seed(0)
    model, args = _Scaled().eval(), zoo.token_inputs()
    out = convert(model, MHCConfig(streams=4, kernels="reference"), args)
    with pytest.raises(BlockCallError, match=r"scale=None .*called with .*scale=0 .*0 residual sites"):
        out(*args, scale=0)


class _Memo:
    """A cache-like argument: the block's leaf appends to it."""

    def __init__(self):
        self.items = []


class _Uncopyable(_Memo):
    def __deepcopy__(self, memo):
        raise TypeError("this cache cannot be copied")


class _Writer(nn.Module):
    def forward(self, y, memo):
        if memo is not None:
            memo.items.append(y)
        return y


class _MemoBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln, self.fc, self.writer = nn.LayerNorm(32), nn.Linear(32, 32), _Writer()

    def forward(self, x, memo=None):
        return x + self.writer(self.fc(self.ln(x)), memo)


class _MemoModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(zoo.VOCAB, 32)
        self.blocks = nn.ModuleList(_MemoBlock() for _ in range(2))

    def forward(self, idx, memo=None):
        h = self.emb(idx)
        for blk in self.blocks:
            h = blk(h, memo=memo)
        return h


def test_retrace_never_leaves_fake_tensors_in_the_callers_objects():
    """A call with a new cache-like argument traces each block again on a copy of it; the caller's
    object gets only the real call's tensors. One that cannot be copied and that the trace wrote
    into raises, instead of a real call that runs on fake values."""
    from torch._subclasses.fake_tensor import FakeTensor

    torch.manual_seed(0)
    model, args = _MemoModel().train(), zoo.token_inputs()
    out = _perturbed(convert(model, MHCConfig(streams=4, kernels="reference"), args))
    memo = _Memo()
    got = out(*args, memo=memo)
    assert not isinstance(got, FakeTensor) and len(memo.items) == 2
    assert not any(isinstance(t, FakeTensor) for t in memo.items)
    torch.testing.assert_close(got, out(*args), atol=0, rtol=0)
    with pytest.raises(BlockCallError, match=r"changed the argument 'memo' \(_Uncopyable\).*copy.deepcopy"):
        _perturbed(convert(model, MHCConfig(streams=4, kernels="reference"), args))(*args, memo=_Uncopyable())


class _TupleInner(nn.Module):
    """A leaf returning ``(output, extra)``, as attention returns its weights."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(32, 32)

    def forward(self, x):
        y = self.fc(x)
        return y, y.mean(-1)


class _TupleSublayer(nn.Module):
    """A transformers-4.x-style sublayer (T5LayerSelfAttention): ``(x + out[0],) + out[1:]``."""

    def __init__(self):
        super().__init__()
        self.ln, self.inner = nn.LayerNorm(32), _TupleInner()

    def forward(self, x):
        out = self.inner(self.ln(x))
        return (x + out[0],) + out[1:]


class _TupleBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.ModuleList(_TupleSublayer() for _ in range(2))

    def forward(self, x):
        outputs = self.layer[0](x)
        hidden, extras = outputs[0], outputs[1:]
        hidden = self.layer[1](hidden)[0]
        return (hidden,) + extras


class _TupleModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(zoo.VOCAB, 32)
        self.blocks = nn.ModuleList(_TupleBlock() for _ in range(2))

    def forward(self, idx):
        h = self.emb(idx)
        for blk in self.blocks:
            h = blk(h)[0]
        return h


def test_blocks_returning_tuple_concatenations_carry_the_streams():
    """``(hidden,) + outputs[1:]`` (how transformers 4.x layers return, T5's among them) used to
    break the block's own chain at the tuple node and sent the model to the whole-graph form. At
    trained mHC parameters the blocks form equals the whole-graph form, loss and gradients."""
    torch.manual_seed(0)
    model, args = _TupleModel(), zoo.token_inputs()
    cfg = MHCConfig(streams=4, kernels="reference")
    carried, whole = convert(model, cfg, args), convert(model, cfg, args, form="whole-graph")
    assert carried.mhc_report.form == "blocks", carried.mhc_report.form_reason
    assert len(carried.mhc_report.sites) == 4
    _randomize(carried, whole)
    _assert_same_loss_and_grads(carried, whole, args, "tuple blocks")


def test_one_state_object_per_converted_model():
    """convert leaves one ConvertedState (form, report, config, what the form runs) under one
    attribute; mhc_report / mhc_config are read from it; no other mHC attribute on the model."""
    torch.manual_seed(0)
    model, args = _Scaled().eval(), zoo.token_inputs()
    cfg = MHCConfig(streams=4, kernels="reference")
    for form in ("blocks", "whole-graph"):
        out = convert(model, cfg, args, form=form)
        state = state_of(out)
        assert isinstance(state, ConvertedState) and state.form == out.mhc_report.form == form
        assert state.report is out.mhc_report and state.config is out.mhc_config == cfg
        assert state.example is None  # save_pretrained's inputs: HF models only
        own = {k for k in out.__dict__ if "mhc" in k and k != "_mhc_carry"}
        assert own == {"mhc_state", "mhc_report", "mhc_config"}, own
        if form == "blocks":
            assert state.whole_graph is None and set(state.blocks) == set(out.mhc_report.blocks)
            assert all(state.blocks[p] is out.get_submodule(p).__dict__["_mhc_carry"] for p in state.blocks)
        else:
            assert not state.blocks and isinstance(state.whole_graph.graph, torch.fx.GraphModule)
            call = state.whole_graph.call  # the conversion's ExampleCall, bound once
            assert isinstance(call, ExampleCall) and call.bound and call.args[0] is args[0] and len(call.args) == 1
            assert state.whole_graph.signature is call.signature
            assert state.whole_graph.positional == call.positional_names()[:len(args)]
        with pytest.raises(dataclasses.FrozenInstanceError):
            state.form = "blocks"
    with pytest.raises(TypeError, match="not a model converted"):
        state_of(model)


def test_mode_branch_in_block_forward_follows_train_and_eval():
    torch.manual_seed(0)
    model, args = _Scaled().eval(), zoo.token_inputs()
    out = convert(model, MHCConfig(streams=4, kernels="reference"), args)
    assert len(state_of(out).blocks["blocks.0"].variants) == 2
    for training in (False, True):
        model.train(training), out.train(training)
        with torch.no_grad():
            torch.testing.assert_close(out(*args), model(*args), atol=2e-5, rtol=1e-4)


def test_checkpointed_blocks_give_the_same_loss_and_grads():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    model, args = tiny_titan(), zoo.token_inputs()
    carried = convert(model, MHCConfig(streams=4, kernels="reference"), args)
    _randomize(carried)
    ref_loss, ref_grads = _loss_and_grads(carried, args)
    wrapped = copy.deepcopy(carried)
    for key in list(wrapped.layers):
        wrapped.layers[key] = checkpoint_wrapper(wrapped.layers[key])
    fn = copy.deepcopy(carried)
    for key in list(fn.layers):
        blk = fn.layers[key]
        fn.layers[key] = _Checkpointed(blk, checkpoint)
    for variant in (wrapped, fn):
        loss, grads = _loss_and_grads(variant, args)
        torch.testing.assert_close(loss, ref_loss)
        names = {k.replace("._checkpoint_wrapped_module", "").replace(".inner", ""): v for k, v in grads.items()}
        assert set(names) == set(ref_grads)
        for k, g in ref_grads.items():
            torch.testing.assert_close(names[k], g, atol=1e-6, rtol=1e-5)


class _Checkpointed(nn.Module):
    def __init__(self, inner, checkpoint):
        super().__init__()
        self.inner, self._checkpoint = inner, checkpoint

    def forward(self, *args):
        return self._checkpoint(self.inner, *args, use_reentrant=False)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_per_block_compile(backend):
    torch.manual_seed(0)
    model, args = tiny_titan(layers=2), zoo.token_inputs()
    carried = convert(model, MHCConfig(streams=4, kernels="reference"), args)
    _randomize(carried)
    ref_loss, ref_grads = _loss_and_grads(carried, args)
    compiled = copy.deepcopy(carried)
    seen_ops: list = []

    def spy(gm, example_inputs):
        seen_ops.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return torch._dynamo.backends.registry.lookup_backend(backend)(gm, example_inputs)

    torch._dynamo.reset()
    for key in list(compiled.layers):
        compiled.layers[key] = torch.compile(compiled.layers[key], backend=spy, fullgraph=True)
    loss, grads = _loss_and_grads(compiled, args)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    names = {k.replace("._orig_mod", ""): v for k, v in grads.items()}
    assert set(names) == set(ref_grads)
    for k, g in ref_grads.items():
        torch.testing.assert_close(names[k], g, atol=1e-5, rtol=1e-4, msg=lambda m: f"{k}: {m}")
    assert any("mhc" in t for t in seen_ops), "the mHC ops stay the project's custom ops in the block graphs"


def test_per_block_compile_of_a_deep_model_compiles_three_graphs():
    """Middle layers share one generated forward, so block.compile() on a 10-layer model compiles
    three graphs (first, middle, last layer): with one function per layer dynamo would hit its
    recompile limit (8) and run the last layers eagerly."""
    torch.manual_seed(0)
    model, args = zoo.tiny_gpt(layers=10), zoo.token_inputs()
    carried = convert(model, MHCConfig(streams=4, kernels="reference"), args)
    _randomize(carried)
    want = carried(*args)
    graphs: list = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    for block in carried.blocks:
        block.compile(backend=counting)
    torch.testing.assert_close(carried(*args), want)
    torch.testing.assert_close(carried(*args), want)
    assert len(graphs) == 3


def test_meta_init_convert_to_empty_load_reset():
    """meta init -> convert -> to_empty -> load the original weights -> reset: the original function."""
    torch.manual_seed(0)
    real = tiny_titan()
    args = zoo.token_inputs()
    with torch.device("meta"):
        meta = tiny_titan()
    carried = convert(meta, MHCConfig(streams=4, kernels="reference"), args, inplace=True)
    assert carried.mhc_report.form == "blocks"
    assert all(p.is_meta for p in carried.parameters())
    carried.to_empty(device="cpu")
    missing, unexpected = carried.load_state_dict(real.state_dict(), strict=False)
    assert not unexpected and missing and all(".mhc" in k for k in missing)
    carried.init_weights()
    holders = [m for m in carried.modules() if isinstance(m, MHCSiteParams) and m._parameters]
    assert len(holders) == 6
    for m in holders:
        m.reset_parameters()
    with torch.no_grad():
        torch.testing.assert_close(carried(*args), real(*args), atol=2e-5, rtol=1e-4)


def test_meta_convert_of_a_1b_model_stays_small():
    """A ~1B-parameter torchtitan-style Llama built on the meta device converts without
    allocating its weights: peak RSS grows by under 300 MB (its fp32 weights would be 4 GB)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), str(root / "tests")]))
    out = subprocess.run([sys.executable, str(root / "benchmarks" / "bench_scale.py"), "--worker", "2048x22"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    row = json.loads(out.stdout.strip().splitlines()[-1])
    assert row["params"] > 1e9 and row["form"] == "blocks" and row["sites"] == 44
    assert row["rss_mb"] < 300, row


def _hf(name):
    import transformers as T

    common = dict(vocab_size=64)
    if name == "gpt2":
        return T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=2, n_head=2, use_cache=False, **common))
    if name == "llama":
        return T.LlamaForCausalLM(T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                num_attention_heads=2, num_key_value_heads=1, use_cache=False, **common))
    return T.BertModel(T.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=2, **common))


def _both_forms_with_a_padded_mask(name):
    """(model, ids, {"attention_mask": padded mask}, blocks form, whole-graph form) of ``_hf(name)``."""
    torch.manual_seed(0)
    model = _hf(name).eval()
    ids = torch.randint(0, 64, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    cfg = MHCConfig(streams=4, kernels="reference")
    kw = {"attention_mask": mask}
    carried = convert(model, cfg, (ids,), example_kwargs=kw)
    whole = convert(model, cfg, (ids,), example_kwargs=kw, form="whole-graph")
    return model, ids, kw, carried, whole


@pytest.mark.parametrize("name,blocks", [
    ("gpt2", ["transformer.h.0", "transformer.h.1"]),
    ("llama", ["model.layers.0", "model.layers.1"]),
    ("bert", ["encoder.layer.0", "encoder.layer.1"]),   # post-LN adds inside the layer's submodules
])
def test_hf_blocks_with_keyword_arguments(name, blocks):
    """HF layers take **kwargs (attention masks, position embeddings): each keyword the parent
    passes becomes its own traced argument; with a padded mask the blocks equal the whole graph
    at random mHC parameters."""
    model, ids, kw, carried, whole = _both_forms_with_a_padded_mask(name)
    assert type(carried) is type(model) and carried.mhc_report.form == "blocks", carried.mhc_report.form_reason
    assert carried.mhc_report.blocks == blocks
    main = (lambda o: o.logits) if name != "bert" else (lambda o: o.last_hidden_state)
    with torch.no_grad():
        ref = main(model(ids, **kw))
        torch.testing.assert_close(main(carried(ids, **kw)), ref, atol=2e-5, rtol=1e-4)
        _randomize(carried, whole)
        got, want = main(carried(ids, **kw)), main(whole(ids, **kw))
    assert (got - ref).abs().max() > 1e-3
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_whole_graph_call_without_the_examples_mask_captures_its_own_graph():
    """Converted with an ``attention_mask`` example, the whole-graph form called without the mask
    (left at its default None) must not run the example's graph (captured with a mask tensor; it
    crashed): it captures that call's own graph and, at perturbed mHC parameters, equals the
    blocks form called the same way, and differs from the masked call."""
    model, ids, kw, carried, whole = _both_forms_with_a_padded_mask("llama")
    with torch.no_grad():
        torch.testing.assert_close(whole(ids).logits, model(ids).logits, atol=2e-5, rtol=1e-4)
        _randomize(carried, whole)
        got, want, masked = whole(ids).logits, carried(ids).logits, whole(ids, **kw).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert (got[1] - masked[1]).abs().max() > 1e-3  # the padded row: the mask matters
    assert len(state_of(whole).whole_graph.variants) == 1


def test_convert_leaves_buffers_and_random_state_alone():
    """The example forward that records the block calls runs for real (in training mode here):
    batch-norm statistics and the caller's random stream are as before."""
    torch.manual_seed(0)
    model = zoo.tiny_resnet_basic().train()
    args = zoo.image_inputs()
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    state = torch.random.get_rng_state()
    convert(model, MHCConfig(streams=2, kernels="reference"), args, inplace=True)
    assert torch.equal(torch.random.get_rng_state(), state)
    for k, v in stats.items():
        assert torch.equal(model.state_dict()[k], v), k
