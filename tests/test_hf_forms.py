"""Families that used to fall back to the whole-graph form, or to fail, carry the streams in
blocks (issue #22, items 3, 5 and 6): DINOv2 (layer scale as a module), Wav2Vec2ForCTC (a
residual at the encoder's level before its layers), OPT (a view to a ``torch.Size``), a
timm-style Swin (channels-last windows); and the size warning names only dims that really are
fixed. Every equality is checked at perturbed mHC parameters (seeded N(0, 0.3) added to each)."""
from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import mhc_compile  # noqa: E402
from mhc_compile import MHCConfig  # noqa: E402
from mhc_compile.forms import state_of  # noqa: E402
from mhc_compile.forms.blocks.signature import BlockCallError  # noqa: E402
from tests._convert_checks import main_output, mhc_params, one_thread  # noqa: E402, F401 (autouse fixture)
from tests.models.hf import VOCAB, default_dinov2, default_opt, default_wav2vec2_ctc  # noqa: E402

CFG = MHCConfig(streams=4, kernels="reference")


def _perturb(model, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mhc_params(model).values():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model


def _pair(model, args, kwargs=None):
    """(blocks form, whole-graph form) of ``model``, the same perturbed mHC parameters in both."""
    kwargs = kwargs or {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        blocks = mhc_compile.convert(model, CFG, args, example_kwargs=kwargs)
        whole = mhc_compile.convert(model, CFG, args, example_kwargs=kwargs, form="whole-graph")
    assert blocks.mhc_report.form == "blocks", blocks.mhc_report.form_reason
    whole.load_state_dict(_perturb(blocks).state_dict())
    return blocks, whole


def _close(a, b, tol=1e-5):
    a, b = main_output(a), main_output(b)
    assert a.shape == b.shape
    assert ((a - b).abs().max() / b.abs().max()).item() < tol


def _audio(b, t, seed=1):
    return torch.randn(b, t, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- DINOv2
@pytest.fixture(scope="module")
def dinov2():
    """(original, example, blocks form, whole-graph form), perturbed mHC parameters in both."""
    torch.manual_seed(0)
    model = default_dinov2().eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return (model, x, *_pair(model, (x,)))


def test_dinov2_blocks_equal_the_whole_graph_and_take_other_sizes_and_hidden_states(dinov2):
    model, x, blocks, whole = dinov2
    rep = blocks.mhc_report
    assert (rep.num_sites, len(rep.chains)) == (4, 1) and {s.kind for s in rep.sites} == {"layer_scale"}
    assert rep.blocks == ["encoder.layer.0", "encoder.layer.1"]
    with torch.no_grad():
        _close(blocks(x), whole(x))
        assert (main_output(blocks(x)) - main_output(model(x))).abs().max() > 1e-3  # perturbed: not the original
        for other in (torch.randn(3, 3, 48, 48), torch.randn(2, 3, 40, 24)):  # the original interpolates
            out = blocks(other)
            assert out.last_hidden_state.shape == model(other).last_hidden_state.shape
            assert torch.isfinite(out.last_hidden_state).all()
        hs = blocks(x, output_hidden_states=True).hidden_states
        assert len(hs) == 3 and hs[1].shape == (2, 17, 4, 32)  # between two blocks: the n streams


# ----------------------------------------------------------------------------- Wav2Vec2ForCTC
def _wav2vec2(**overrides):
    torch.manual_seed(0)
    return default_wav2vec2_ctc(**overrides).eval()


def _padded(b, t, keep):
    mask = torch.ones(b, t, dtype=torch.long)
    mask[0, keep:] = 0
    return mask


@pytest.fixture(scope="module")
def wav2vec2():
    """(original with the default config, example, blocks form, whole-graph form), perturbed."""
    model, x = _wav2vec2(), _audio(2, 400)
    return (model, x, *_pair(model, (x,)))


def test_wav2vec2_ctc_blocks_equal_the_whole_graph_at_other_lengths(wav2vec2):
    model, x, blocks, whole = wav2vec2
    rep = blocks.mhc_report
    assert (rep.num_sites, len(rep.chains)) == (5, 1)
    assert rep.blocks == ["wav2vec2.encoder", "wav2vec2.encoder.layers.0", "wav2vec2.encoder.layers.1"]
    other = _audio(3, 720, seed=2)
    with torch.no_grad():
        _close(blocks(x), whole(x))
        assert blocks(other).logits.shape == model(other).logits.shape
        out = blocks(other, output_hidden_states=True)
        assert len(out.hidden_states) == 3 and torch.isfinite(out.logits).all()
        assert out.hidden_states[1].shape[-2:] == (4, 32)  # between two blocks: the n streams


@pytest.mark.parametrize("norm", ["group", "layer"])
def test_wav2vec2_ctc_padding_mask(norm):
    """attention_mask: the encoder (the chain's entry block) zeroes the padded frames in place and
    builds the attention mask with HF's mask helper, which is called, not traced (it checks the
    mask's contents in Python). Blocks equal the whole graph captured with a mask at perturbed
    mHC parameters, and the original at init at another length. ``layer``: the stable-layer-norm
    encoder of wav2vec2-large-lv60 / XLS-R, whose processors return masks."""
    model = _wav2vec2(feat_extract_norm=norm, do_stable_layer_norm=norm == "layer")
    x, mask = _audio(2, 400), _padded(2, 400, 300)
    blocks, whole = _pair(model, (x,), {"attention_mask": mask})
    with torch.no_grad():
        _close(blocks(x, attention_mask=mask), whole(x, attention_mask=mask))
        init = mhc_compile.convert(model, CFG, (x,))
        other, omask = _audio(3, 720, seed=2), _padded(3, 720, 500)
        _close(init(other, attention_mask=omask), model(other, attention_mask=omask))


def test_wav2vec2_ctc_trains_with_labels_and_refuses_layerdrop_in_training(wav2vec2):
    """A Trainer-style step: training mode, labels and a padding mask by keyword, CTC loss and
    gradients. With the default LayerDrop (a Python random choice per layer) the training call
    is refused, saying how to turn it off; eval still works."""
    x = _audio(2, 400)
    labels = torch.randint(1, 16, (2, 5), generator=torch.Generator().manual_seed(4))
    cm = wav2vec2[2]  # default config: LayerDrop 0.1
    cm.train()
    try:
        with pytest.raises(BlockCallError, match="layerdrop = 0.0"):
            cm(x, labels=labels)
    finally:
        cm.eval()
    assert torch.isfinite(cm(x).logits).all()

    model = _wav2vec2(layerdrop=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cm = _perturb(mhc_compile.convert(model, CFG, (x,)))
    cm.train()
    out = cm(input_values=x, attention_mask=_padded(2, 400, 300), labels=labels)
    out.loss.backward()
    grads = {k: p.grad for k, p in mhc_params(cm).items()}
    assert torch.isfinite(out.loss) and len(grads) == 5 * 5
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert any(g.abs().sum() > 0 for k, g in grads.items() if k.startswith("wav2vec2.encoder.pos_conv_embed"))


# ----------------------------------------------------------------------------- OPT
def test_opt_blocks_equal_the_whole_graph_and_run_at_other_lengths():
    torch.manual_seed(0)
    model = default_opt().eval()
    ids = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
    blocks, whole = _pair(model, (ids,))
    assert (blocks.mhc_report.num_sites, len(blocks.mhc_report.chains)) == (4, 1)
    other = torch.randint(3, VOCAB, (3, 13))
    with torch.no_grad():
        _close(blocks(ids), whole(ids))
        assert blocks(other).logits.shape == (3, 13, VOCAB)
        loss = blocks(other, attention_mask=torch.ones_like(other), labels=other).loss
        assert torch.isfinite(loss)
        assert blocks.generate(ids, max_new_tokens=3, do_sample=False).shape == (2, 11)


def test_opt_through_the_backend_at_another_length():
    torch.manual_seed(0)
    model = default_opt().eval()
    ids = torch.randint(3, VOCAB, (2, 8))
    other = torch.randint(3, VOCAB, (3, 13))
    compiled = torch.compile(model, backend="mhc", options={"streams": 4, "inner": "eager"})
    with torch.no_grad():
        for x in (ids, other):
            torch.testing.assert_close(compiled(x).logits, model(x).logits, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- timm-style Swin
@pytest.mark.slow  # the all-dynamic export of windowed attention takes ~30 s on one core
def test_timm_style_swin_gives_one_chain_per_stage():
    """timm's window partition/reverse (view, permute, contiguous, view; pad and crop; roll) and
    the (B, H, W, C) <-> (B, H*W, C) reshapes between a block's two adds keep one chain per stage."""
    from tests.models.timm_swin import tiny_timm_swin

    torch.manual_seed(0)
    model = tiny_timm_swin()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cm = mhc_compile.convert(model, CFG, (x,))
    rep = cm.mhc_report
    assert [len(c.sites) for c in rep.chains] == [4, 4], str(rep)
    assert [s.channels for s in rep.sites] == [16] * 4 + [32] * 4
    assert rep.form == "blocks", rep.form_reason
    other = torch.randn(3, 3, 24, 20)  # padded windows
    with torch.no_grad():
        _close(cm(other), model(other))
        _perturb(cm)
        assert torch.isfinite(cm(other)).all()


# ----------------------------------------------------------------------------- the size warning
def _size_warnings(model, args, kwargs=None):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cm = mhc_compile.convert(model, CFG, args, example_kwargs=kwargs or {})
    return cm, [str(w.message) for w in caught if "fixes some input sizes" in str(w.message)]


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_no_size_warning_for_text_lengths_that_run(name):
    torch.manual_seed(0)
    text = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=32, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    if name == "clip":
        model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**text)).eval()
    else:
        model = transformers.SiglipTextModel(transformers.SiglipTextConfig(**text)).eval()
    ids = torch.randint(2, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    cm, msgs = _size_warnings(model, (ids,))
    assert msgs == []
    other = torch.randint(2, VOCAB, (3, 24))
    with torch.no_grad():
        _close(cm(other), model(other))


def test_whisper_warns_only_about_the_mel_bins():
    """The decoder length varies (the old warning named it: 'input 1 dim 1 (size 12)'); the mel-bin
    dim is the encoder conv's channels, which the original fixes too."""
    torch.manual_seed(0)
    cfg = transformers.WhisperConfig(vocab_size=VOCAB, num_mel_bins=8, encoder_layers=2, decoder_layers=2,
                                     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                                     decoder_ffn_dim=64, d_model=32, max_source_positions=16, max_target_positions=32,
                                     pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
                                     suppress_tokens=[], begin_suppress_tokens=[])
    model = transformers.WhisperModel(cfg).eval()
    feats = torch.randn(2, 8, 32)
    ids = torch.randint(3, VOCAB, (2, 12))
    cm, msgs = _size_warnings(model, (feats,), {"decoder_input_ids": ids})
    assert len(msgs) == 1 and "static: input 0 dim 1 (size 8) " in msgs[0] and "input 1" not in msgs[0], msgs
    other = torch.randint(3, VOCAB, (2, 20))
    with torch.no_grad():
        _close(cm(feats, decoder_input_ids=other), model(feats, decoder_input_ids=other))


def test_a_truly_fixed_size_model_still_warns():
    """MLP-Mixer's token mixing is a Linear over a fixed number of patches: the doubled image fails."""
    from tests.models.zoo import tiny_mixer

    torch.manual_seed(0)
    _, msgs = _size_warnings(tiny_mixer().eval(), (torch.randn(2, 3, 16, 16),))
    assert len(msgs) == 1 and "static: input 0 dim 2 (size 16), input 0 dim 3 (size 16)" in msgs[0], msgs
    assert "L['img'].size()[2]" in msgs[0]


# ----------------------------------------------------------------------------- the whole-graph form
def test_whole_graph_form_captures_again_for_other_sizes_and_arguments(dinov2):
    """Another image size (the captured program guards the example's) and output_hidden_states
    capture the model again with its own mHC parameters: equal to the blocks form at perturbed
    parameters; another batch at that size reuses the graph. The hidden states between two
    layers are the collapsed streams here (the mean of the blocks form's n streams)."""
    _, x, blocks, whole = dinov2
    other, again = torch.randn(3, 3, 48, 40), torch.randn(4, 3, 48, 40)
    with torch.no_grad():
        _close(whole(other), blocks(other))
        n = len(state_of(whole).whole_graph.variants)
        _close(whole(again), blocks(again))
        assert len(state_of(whole).whole_graph.variants) == n
        a, b = whole(x, output_hidden_states=True), blocks(x, output_hidden_states=True)
        _close(a, b)
        assert len(a.hidden_states) == len(b.hidden_states) == 3
        _close(a.hidden_states[1], b.hidden_states[1].mean(-2))
