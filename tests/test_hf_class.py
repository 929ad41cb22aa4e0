"""A converted Hugging Face model stays a Hugging Face model (issue #14): the same class with its
default config (``use_cache=True``), ``generate`` with the KV cache, labels and the other forward
arguments, Trainer, gradient checkpointing, PEFT LoRA, save_pretrained -> mhc_compile.load, and
padded batches. Tiny configs built in the test (random weights, nothing downloaded)."""
from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import mhc_compile  # noqa: E402
from mhc_compile import MHCConfig  # noqa: E402
from mhc_compile.forms import state_of  # noqa: E402
from tests._convert_checks import mhc_params, one_thread  # noqa: E402, F401 (one_thread: autouse fixture)
from tests.models.hf import DEFAULT_CONFIG_MODELS, VOCAB, default_gpt2  # noqa: E402

CFG = MHCConfig(streams=4)
pytestmark = pytest.mark.filterwarnings("ignore")


def _inputs(kind: str, b: int = 2, t: int = 7) -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(1)
    if kind == "vision":
        return (torch.randn(b, 3, 16, 16, generator=g),), {}
    ids = torch.randint(3, VOCAB, (b, t), generator=g)
    if kind == "seq2seq":
        return (ids,), {"decoder_input_ids": torch.randint(3, VOCAB, (b, 5), generator=g)}
    return (ids,), {}


def _convert(name: str):
    build, kind = DEFAULT_CONFIG_MODELS[name]
    torch.manual_seed(0)
    model = build().eval()
    args, kwargs = _inputs(kind)
    return model, mhc_compile.convert(model, CFG, args, example_kwargs=kwargs), kind, args, kwargs


def _perturb(model, scale: float = 0.5):
    """Trained-looking (non-init) mHC parameters."""
    torch.manual_seed(5)
    with torch.no_grad():
        for p in mhc_params(model).values():
            p.add_(scale * torch.randn_like(p))
    return model


def _logits(out):
    return out.logits


@pytest.mark.parametrize("name", list(DEFAULT_CONFIG_MODELS))
def test_default_config_keeps_the_class_and_the_function(name):
    """Item 1 and 2: with the default config the same class comes back, in the stream-carrying
    form; logits equal the original's at init; generate's greedy tokens with the KV cache equal
    the original's at init; with trained mHC parameters use_cache=True gives the same tokens as
    use_cache=False (and other logits than the original's)."""
    model, cm, kind, args, kwargs = _convert(name)
    assert type(cm) is type(model) and cm is not model
    assert cm.mhc_report.form == "blocks", cm.mhc_report.form_reason
    assert getattr(cm.config, "use_cache", True) is True
    with torch.no_grad():
        torch.testing.assert_close(_logits(cm(*args, **kwargs)), _logits(model(*args, **kwargs)), atol=1e-5, rtol=1e-4)
    if kind not in ("causal", "seq2seq"):
        return
    gen = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        want = model.generate(args[0], **gen)
        assert torch.equal(cm.generate(args[0], **gen), want)
        _perturb(cm)
        cached = cm.generate(args[0], use_cache=True, **gen)
        assert torch.equal(cached, cm.generate(args[0], use_cache=False, **gen))
        assert not torch.allclose(_logits(cm(*args, **kwargs)), _logits(model(*args, **kwargs)), atol=1e-3)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_forward_takes_every_argument_of_the_original(name):
    """labels, attention_mask, past_key_values, output_hidden_states, output_attentions and
    return_dict: the same outputs as the original at init (the hidden states between two
    stream-carrying blocks are the n streams, (B, T, n, C), whose mean is the original's at init)."""
    model, cm, _, (ids,), _ = _convert(name)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    with torch.no_grad():
        a = model(ids, attention_mask=mask, labels=ids, output_hidden_states=True, output_attentions=True)
        b = cm(ids, attention_mask=mask, labels=ids, output_hidden_states=True, output_attentions=True)
        torch.testing.assert_close(b.loss, a.loss, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(b.logits, a.logits, atol=1e-5, rtol=1e-4)
        assert len(b.hidden_states) == len(a.hidden_states) == 3
        assert tuple(b.hidden_states[1].shape) == (*ids.shape, 4, 32)
        torch.testing.assert_close(b.hidden_states[1].mean(-2), a.hidden_states[1], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(b.hidden_states[-1], a.hidden_states[-1], atol=1e-5, rtol=1e-4)
        assert len(b.attentions) == len(a.attentions)
        # a step with the cache the first call returned
        step = torch.randint(3, VOCAB, (2, 1))
        mask2 = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
        a2 = model(step, attention_mask=mask2, past_key_values=a.past_key_values)
        b2 = cm(step, attention_mask=mask2, past_key_values=b.past_key_values)
        torch.testing.assert_close(b2.logits, a2.logits, atol=1e-5, rtol=1e-4)
        t = cm(ids, return_dict=False)
        assert isinstance(t, tuple)
        torch.testing.assert_close(t[0], model(ids).logits, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_padded_batches_match_the_original(name):
    """Item 6: zeros in attention_mask (a BERT classifier, a left-padded decoder) at init."""
    model, cm, _, (ids,), _ = _convert(name)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[1, -1] = 0 if name == "bert" else 1
    with torch.no_grad():
        torch.testing.assert_close(cm(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits,
                                   atol=1e-5, rtol=1e-4)
        if name == "llama":
            gen = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
            assert torch.equal(cm.generate(ids, attention_mask=mask, **gen), model.generate(ids, attention_mask=mask, **gen))


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 8, t: int = 8):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(3, VOCAB, (4, t), generator=g).repeat(n // 4, 1)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_trainer_trains_the_converted_model(tmp_path):
    """Item 3: transformers.Trainer with labels in the batch: the loss goes down and every mHC
    parameter moves; its checkpoint directory (save_pretrained inside Trainer) loads back with
    mhc_compile.load, optimizer state kept beside it."""
    _, cm, _, _, _ = _convert("llama")
    data = _Tokens()
    batch = {k: torch.stack([data[i][k] for i in range(4)]) for k in ("input_ids", "labels")}
    with torch.no_grad():
        before = cm(**batch).loss.item()
    start = {k: p.detach().clone() for k, p in mhc_params(cm).items()}
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=12,
                                          learning_rate=1e-2, report_to=[], save_strategy="steps", save_steps=12,
                                          use_cpu=True, disable_tqdm=True, logging_strategy="no")
    transformers.Trainer(model=cm, args=args, train_dataset=data).train()
    cm.eval()
    with torch.no_grad():
        after = cm(**batch).loss.item()
    assert after < before - 0.1, (before, after)
    assert all(not torch.equal(start[k], p) for k, p in mhc_params(cm).items())
    ckpt = tmp_path / "checkpoint-12"
    assert (ckpt / "mhc.json").is_file() and (ckpt / "optimizer.pt").is_file()
    with torch.no_grad():
        torch.testing.assert_close(mhc_compile.load(ckpt)(**batch).logits, cm(**batch).logits, atol=0, rtol=0)
    _, fresh, _, _, _ = _convert("llama")  # resume_from_checkpoint on a freshly converted model
    more = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=14,
                                          learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True,
                                          disable_tqdm=True, logging_strategy="no")
    resumed = transformers.Trainer(model=fresh, args=more, train_dataset=data)
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed.state.global_step == 14


def test_new_keyword_in_training_with_a_kv_cache_traces_on_a_copy_of_the_cache():
    """A call with a new keyword (Trainer passes ``num_items_in_batch``) retraces each block. In
    training mode the cache holds tensors with a grad_fn, which deepcopy refuses; the trace used
    to run on the caller's cache itself, wrote fake keys into it, and every later layer returned
    FakeTensors (the loss's backward then failed). At trained mHC parameters the new call's
    logits equal the old one's, its loss is the summed loss over ``num_items_in_batch``, and so
    are the gradients."""
    from torch._subclasses.fake_tensor import FakeTensor

    _, cm, _, _, _ = _convert("llama")
    _perturb(cm).train()
    ids = torch.randint(3, VOCAB, (4, 8), generator=torch.Generator().manual_seed(3))
    items = int(ids[:, 1:].numel())
    runs = []
    for extra in ({}, {"num_items_in_batch": torch.tensor(items)}):
        cm.zero_grad(set_to_none=True)
        out = cm(input_ids=ids, labels=ids, use_cache=True, **extra)
        leaves = [t for t in torch.utils._pytree.tree_leaves([out.logits, out.loss, list(out.past_key_values.layers)])
                  if isinstance(t, torch.Tensor)]
        assert not any(isinstance(t, FakeTensor) for t in leaves)
        keys = [layer.keys for layer in out.past_key_values.layers]
        assert not any(isinstance(k, FakeTensor) for k in keys) and len(keys) == cm.config.num_hidden_layers
        out.loss.backward()
        runs.append((out.logits.detach(), float(out.loss), {k: p.grad.clone() for k, p in mhc_params(cm).items()}))
    (logits0, loss0, grads0), (logits1, loss1, grads1) = runs
    torch.testing.assert_close(logits1, logits0, atol=0, rtol=0)
    assert loss1 == pytest.approx(loss0, rel=1e-6)  # the mean over all labels == sum / num_items here
    for k in grads0:
        torch.testing.assert_close(grads1[k], grads0[k], atol=1e-7, rtol=1e-5)
    assert max(float(g.abs().max()) for g in grads0.values()) > 1e-4


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    """Item 3: model.gradient_checkpointing_enable() recomputes the layers (the MLP runs twice per
    step) and gives the same loss and gradients, at trained mHC parameters."""
    _, cm, _, (ids,), _ = _convert("llama")
    _perturb(cm)
    cm.train()
    calls = []
    mlp = cm.model.layers[1].mlp
    mlp_forward = mlp.forward

    def counted(*a, **k):  # forward hooks do not run again in the recomputation; forward does
        calls.append(1)
        return mlp_forward(*a, **k)
    mlp.forward = counted

    def loss_and_grads():
        cm.zero_grad(set_to_none=True)
        calls.clear()
        loss = cm(ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {k: p.grad.clone() for k, p in cm.named_parameters() if p.grad is not None}, len(calls)

    loss0, grads0, n0 = loss_and_grads()
    cm.gradient_checkpointing_enable()
    loss1, grads1, n1 = loss_and_grads()
    assert (n0, n1) == (1, 2)
    torch.testing.assert_close(loss1, loss0)
    assert grads0.keys() == grads1.keys() and set(mhc_params(cm)) <= set(grads1)
    for k in grads0:
        torch.testing.assert_close(grads1[k], grads0[k], atol=1e-6, rtol=1e-5, msg=k)


def test_peft_lora_adapters_change_the_output_and_train_with_the_mhc_parameters(tmp_path):
    """Item 4: LoRA adapters on the attention projections change the output and get gradients;
    PEFT freezes the mHC parameters unless modules_to_save names their containers ("mhc",
    "mhc_collapse"), and then they get gradients and are saved with the adapter."""
    peft = pytest.importorskip("peft")
    _, cm, _, (ids,), _ = _convert("llama")
    with torch.no_grad():
        base = cm(ids).logits
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    pm = peft.get_peft_model(cm, lora)
    with torch.no_grad():
        assert (pm(input_ids=ids).logits - base).abs().max() > 1e-3
    pm.train()
    pm(input_ids=ids, labels=ids).loss.backward()
    adapters = {k: p for k, p in pm.named_parameters() if "lora_" in k}
    assert adapters and all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapters.values())
    assert not any(p.requires_grad for k, p in pm.named_parameters() if ".mhc." in k)

    _, cm2, _, _, _ = _convert("llama")
    n_mhc = len(mhc_params(cm2))
    pm2 = peft.get_peft_model(cm2, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                   modules_to_save=["mhc", "mhc_collapse"]))
    pm2.train()
    pm2(input_ids=ids, labels=ids).loss.backward()
    trained = {k: p for k, p in pm2.named_parameters() if p.requires_grad and ".mhc" in k}
    assert len(trained) == n_mhc and all(p.grad is not None for p in trained.values())
    pm2.save_pretrained(str(tmp_path / "adapter"))
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert sum(".mhc." in k for k in saved) == n_mhc
    with torch.no_grad():  # the adapter (mHC included) on a freshly converted base gives the same logits
        for p in pm2.parameters():
            if p.requires_grad:  # adapters and mHC: what the adapter file holds
                p.add_(0.05 * torch.randn_like(p))
        pm2.eval()
        want = pm2(input_ids=ids).logits
        pm2.save_pretrained(str(tmp_path / "adapter"))
        _, base, _, _, _ = _convert("llama")
        again = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
        torch.testing.assert_close(again(input_ids=ids).logits, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["gpt2", "t5"])
def test_save_pretrained_then_load_gives_the_class_and_the_logits(name, tmp_path):
    """Item 5: save_pretrained writes an HF directory (config.json, safetensors) plus mhc.json;
    mhc_compile.load gives the same class with equal logits (trained mHC parameters) and
    generate still works; transformers alone refuses it, naming mhc_compile.load (issue #23)."""
    model, cm, kind, args, kwargs = _convert(name)
    _perturb(cm)
    out = tmp_path / "saved"
    cm.save_pretrained(str(out))
    files = {f.name for f in out.iterdir()}
    assert {"config.json", "model.safetensors", "mhc.json", "example_inputs.safetensors"} <= files
    assert json.loads((out / "mhc.json").read_text())["source"] == "hf"
    loaded = mhc_compile.load(out)
    assert type(loaded) is type(model) and loaded.mhc_report.form == "blocks"
    with torch.no_grad():
        torch.testing.assert_close(loaded(*args, **kwargs).logits, cm(*args, **kwargs).logits, atol=0, rtol=0)
        gen = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
        assert torch.equal(loaded.generate(args[0], **gen), cm.generate(args[0], **gen))
    with pytest.raises(Exception, match=r"mhc_compile\.load"):  # never the plain class, silently
        type(model).from_pretrained(str(out))


def test_save_pretrained_shards_and_keeps_other_files(tmp_path):
    """A sharded save (max_shard_size) loads back; files the directory already held (a
    Trainer checkpoint's optimizer state) stay; stale shards of an older save go."""
    _, cm, _, (ids,), _ = _convert("llama")
    _perturb(cm)
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "optimizer.pt").write_bytes(b"keep me")
    (out / "model.safetensors").write_bytes(b"stale")
    cm.save_pretrained(str(out), max_shard_size="40KB")
    assert (out / "optimizer.pt").read_bytes() == b"keep me"
    assert (out / "model.safetensors.index.json").is_file() and not (out / "model.safetensors").exists()
    loaded = mhc_compile.load(out)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, cm(ids).logits, atol=0, rtol=0)


def test_cli_convert_of_an_hf_directory_writes_the_same_format(tmp_path):
    """Item 5: `mhc convert` on a save_pretrained directory writes config.json, safetensors and
    mhc.json like save_pretrained does; mhc_compile.load gives the class, which generates."""
    from click.testing import CliRunner

    from mhc_compile.cli.main import cli

    torch.manual_seed(0)
    model = default_gpt2().eval()
    model.save_pretrained(str(tmp_path / "hf"))
    result = CliRunner().invoke(cli, ["convert", str(tmp_path / "hf"), "-o", str(tmp_path / "out"), "--no-progress",
                                      "--streams", "4"])
    assert result.exit_code == 0, result.output
    files = {f.name for f in (tmp_path / "out").iterdir()}
    assert {"config.json", "model.safetensors", "mhc.json", "example_inputs.safetensors"} <= files
    loaded = mhc_compile.load(tmp_path / "out")
    assert type(loaded) is type(model)
    ids = torch.randint(3, VOCAB, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-4)
        gen = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": 0}
        assert torch.equal(loaded.generate(ids, **gen), model.generate(ids, **gen))


def test_the_core_package_does_not_need_peft_or_accelerate():
    """peft and accelerate are dev extras: convert works with both made unimportable."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['peft'] = None; sys.modules['accelerate'] = None\n"
        "import torch, mhc_compile\n"
        "class R(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__(); self.f = torch.nn.Linear(8, 8); self.g = torch.nn.Linear(8, 8)\n"
        "    def forward(self, x):\n"
        "        x = x + self.f(x)\n"
        "        return x + self.g(x)\n"
        "m = R()\n"
        "c = mhc_compile.convert(m, mhc_compile.MHCConfig(streams=2, kernels='reference'), (torch.randn(2, 3, 8),))\n"
        "print(c.mhc_report.num_sites)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "2", out.stderr[-2000:]


def test_whole_graph_form_takes_the_example_arguments_and_captures_others():
    """The whole-graph form (asked for here; the fallback when a block cannot carry the streams
    alone): the class is kept, the example's arguments work by position or by name; other
    arguments (labels) and other sizes capture the model again for that call signature, with
    the same mHC parameters."""
    torch.manual_seed(0)
    model = transformers.ResNetForImageClassification(transformers.ResNetConfig(
        num_channels=3, embedding_size=16, hidden_sizes=[16, 32], depths=[2, 2], layer_type="basic",
        num_labels=3)).eval()
    x = torch.randn(2, 3, 32, 32)
    assert mhc_compile.convert(model, CFG, (x,)).mhc_report.form == "blocks"  # HF ResNet carries the streams
    cm = mhc_compile.convert(model, CFG, (x,), form="whole-graph")
    assert type(cm) is type(model) and cm.mhc_report.form == "whole-graph"
    with torch.no_grad():
        torch.testing.assert_close(cm(x).logits, model(x).logits, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(cm(pixel_values=x).logits, model(x).logits, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(cm(x, labels=None).logits, model(x).logits, atol=1e-5, rtol=1e-4)
        labels = torch.tensor([0, 1])
        torch.testing.assert_close(cm(x, labels=labels).loss, model(x, labels=labels).loss, atol=1e-5, rtol=1e-4)
        other = torch.randn(3, 3, 48, 40)
        torch.testing.assert_close(cm(other).logits, model(other).logits, atol=1e-5, rtol=1e-4)
        assert len(state_of(cm).whole_graph.variants) >= 1


def _whole_graph_pair(name: str):
    from tests.models.hf import hf_convnext, hf_resnet

    if name in ("resnet", "convnext"):
        torch.manual_seed(0)
        model = (hf_resnet if name == "resnet" else hf_convnext)()
        args, kwargs = (torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)),), {}
    else:
        build, kind = DEFAULT_CONFIG_MODELS[name]
        torch.manual_seed(0)
        model = build().eval()
        args, kwargs = _inputs(kind)
    cfg = MHCConfig(streams=4, kernels="reference")
    blocks = mhc_compile.convert(model, cfg, args, example_kwargs=kwargs)
    whole = mhc_compile.convert(model, cfg, args, example_kwargs=kwargs, form="whole-graph")
    return blocks, whole, args, kwargs


@pytest.mark.parametrize("name", [*DEFAULT_CONFIG_MODELS, "resnet", "convnext"])
def test_blocks_equal_the_whole_graph_at_trained_mhc_parameters(name):
    """The stream-carrying layers (KV cache on, T5's position bias handed from layer to layer,
    Mixtral's experts, ResNet/ConvNeXt stages) compute what the rewritten whole graph computes,
    at random mHC parameters: outputs and every mHC gradient."""
    blocks, whole, args, kwargs = _whole_graph_pair(name)
    assert blocks.mhc_report.form == "blocks", blocks.mhc_report.form_reason
    _perturb(blocks)
    whole.load_state_dict(blocks.state_dict())
    outs = []
    for m in (blocks, whole):
        out = m(*args, **kwargs)
        main = out.logits if hasattr(out, "logits") else out.last_hidden_state
        main.square().mean().backward()
        outs.append((main.detach(), {k: p.grad for k, p in mhc_params(m).items()}))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-5, rtol=1e-4)
    assert outs[0][1].keys() == outs[1][1].keys()
    for k, g in outs[0][1].items():
        torch.testing.assert_close(g, outs[1][1][k], atol=1e-5, rtol=1e-4, msg=k)


def test_fsdp2_per_layer_with_checkpointing_and_generate(tmp_path):
    """The per-block recipe on an HF model: fully_shard on every decoder layer and the root
    (gloo, one rank), gradient checkpointing on: the same loss and gradients as the unsharded
    model at trained mHC parameters, and generate with a padded mask (a new call signature,
    traced again while the layer is sharded) gives the same tokens."""
    import copy

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    own = not dist.is_initialized()
    if own:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    assert dist.get_world_size() == 1
    try:
        _, cm, _, (ids,), _ = _convert("llama")
        _perturb(cm, 0.3)
        ref = copy.deepcopy(cm)
        for m in (cm, ref):
            m.gradient_checkpointing_enable()
            m.train()
        for layer in cm.model.layers:
            fully_shard(layer)
        fully_shard(cm)
        loss = cm(ids, labels=ids).loss
        loss.backward()
        want = ref(ids, labels=ids).loss
        want.backward()
        torch.testing.assert_close(loss, want)
        grads = {k: p.grad.full_tensor() for k, p in cm.named_parameters() if p.grad is not None}
        ref_grads = {k: p.grad for k, p in ref.named_parameters() if p.grad is not None}
        assert grads.keys() == ref_grads.keys() and set(mhc_params(ref)) <= set(grads)
        for k, g in ref_grads.items():
            torch.testing.assert_close(grads[k], g, atol=1e-6, rtol=1e-5, msg=k)
        cm.eval()
        ref.eval()
        mask = torch.ones_like(ids)
        mask[0, :2] = 0
        gen = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
        with torch.no_grad():
            assert torch.equal(cm.generate(ids, attention_mask=mask, **gen), ref.generate(ids, attention_mask=mask, **gen))
    finally:
        if own:
            dist.destroy_process_group()
