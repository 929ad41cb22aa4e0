"""Tiny Hugging Face ``transformers`` models built from configs (no download): GPT-2, Llama, BERT,
ViT, ResNet, ConvNeXt, T5, GPT-NeoX (parallel residual). ``HF_FAMILIES`` maps a name to
``(builder, example_inputs(), other_inputs(), expected sites, expected chains)``; builders return
eval-mode models in float32 with dropout 0 and no KV cache. Needs ``transformers``."""
from __future__ import annotations

import torch

VOCAB = 64


def _eval(model):
    return model.float().eval()


def hf_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False)
    return _eval(GPT2LMHeadModel(cfg))


def hf_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, use_cache=False)
    return _eval(LlamaForCausalLM(cfg))


def hf_bert():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return _eval(BertModel(cfg))


def hf_vit():
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=2, intermediate_size=64, hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0)
    return _eval(ViTModel(cfg, add_pooling_layer=False))


def hf_resnet():
    from transformers import ResNetConfig, ResNetModel

    cfg = ResNetConfig(num_channels=3, embedding_size=16, hidden_sizes=[16, 32], depths=[2, 2], layer_type="basic")
    return _eval(ResNetModel(cfg))


def hf_convnext():
    from transformers import ConvNextConfig, ConvNextModel

    cfg = ConvNextConfig(num_channels=3, num_stages=2, hidden_sizes=[16, 32], depths=[2, 2], image_size=32,
                         layer_scale_init_value=0.5)
    return _eval(ConvNextModel(cfg))


def hf_t5():
    from transformers import T5Config, T5Model

    cfg = T5Config(vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2,
                   num_heads=2, dropout_rate=0.0, use_cache=False)
    return _eval(T5Model(cfg))


def hf_gpt_neox():
    """Parallel residual: x + attn(ln1(x)) + mlp(ln2(x)), one site per layer."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, use_parallel_residual=True,
                        use_cache=False, hidden_dropout=0.0, attention_dropout=0.0)
    return _eval(GPTNeoXForCausalLM(cfg))


def tokens(b, t):
    return (torch.randint(0, VOCAB, (b, t)),)


def images(b, hw):
    return (torch.randn(b, 3, hw, hw),)


def t5_inputs(b, s, t):
    return (torch.randint(0, VOCAB, (b, s)), None, torch.randint(0, VOCAB, (b, t)))


HF_FAMILIES = {
    "gpt2": (hf_gpt2, lambda: tokens(2, 8), lambda: tokens(3, 5), 4, 1),
    "llama": (hf_llama, lambda: tokens(2, 8), lambda: tokens(3, 5), 4, 1),
    "bert": (hf_bert, lambda: tokens(2, 8), lambda: tokens(3, 5), 4, 1),
    "vit": (hf_vit, lambda: images(2, 16), lambda: images(3, 16), 4, 1),
    "resnet": (hf_resnet, lambda: images(2, 32), lambda: images(3, 32), 3, 2),
    "convnext": (hf_convnext, lambda: images(2, 32), lambda: images(3, 32), 4, 2),
    "gpt_neox": (hf_gpt_neox, lambda: tokens(2, 8), lambda: tokens(3, 5), 2, 1),
    "t5": (hf_t5, lambda: t5_inputs(2, 8, 6), lambda: t5_inputs(3, 5, 7), 10, 2),
}


# ---------------------------------------------------------------- default configs (issue #14)
# Built the way users get them: the config's defaults (use_cache=True, dropout, sdpa attention),
# only the sizes shrunk. ``DEFAULT_CONFIG_MODELS`` maps a name to (builder, kind): "causal" and
# "seq2seq" generate, "encoder" classifies token sequences, "vision" images.

def default_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                      bos_token_id=0, eos_token_id=0))


def default_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                        bos_token_id=0, eos_token_id=0))


def default_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                        bos_token_id=0, eos_token_id=0))


def default_mixtral():
    """A mixture of experts: 4 experts, 2 per token."""
    from transformers import MixtralConfig, MixtralForCausalLM

    return MixtralForCausalLM(MixtralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                            num_local_experts=4, num_experts_per_tok=2, bos_token_id=0, eos_token_id=0))


def default_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    # the token ids a pretrained T5 config.json carries
    return T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=2,
                                               num_decoder_layers=2, num_heads=2, decoder_start_token_id=0,
                                               pad_token_id=0, eos_token_id=1))


def default_bart():
    from transformers import BartConfig, BartForConditionalGeneration

    return BartForConditionalGeneration(BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
                                                   encoder_attention_heads=2, decoder_attention_heads=2,
                                                   encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64))


def default_bert_classifier():
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=64,
                                                    max_position_embeddings=64, num_labels=3))


def default_vit_classifier():
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32,
                                               num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                               num_labels=3))


DEFAULT_CONFIG_MODELS = {
    "gpt2": (default_gpt2, "causal"),
    "llama": (default_llama, "causal"),
    "qwen2": (default_qwen2, "causal"),
    "mixtral": (default_mixtral, "causal"),
    "t5": (default_t5, "seq2seq"),
    "bart": (default_bart, "seq2seq"),
    "bert": (default_bert_classifier, "encoder"),
    "vit": (default_vit_classifier, "vision"),
}


# ---------------------------------------------------------------- families that used to fall back (issue #22)
# Default config values, only the sizes shrunk.

def default_dinov2():
    """Layer scale as its own module (``Dinov2LayerScale``)."""
    from transformers import Dinov2Config, Dinov2Model

    return Dinov2Model(Dinov2Config(image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=64))


def default_wav2vec2_ctc(**overrides):
    """The encoder adds a positional conv embedding (a residual at the encoder's level) before its
    layers; a feature encoder (convs) in front; LayerDrop 0.1 and SpecAugment by default."""
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    cfg = dict(vocab_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
               conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=8,
               num_conv_pos_embedding_groups=2, pad_token_id=0)
    return Wav2Vec2ForCTC(Wav2Vec2Config(**{**cfg, **overrides}))


def default_opt():
    """Flattens to (B*T, C) for the MLP and views back with a ``torch.Size`` taken earlier."""
    from transformers import OPTConfig, OPTForCausalLM

    return OPTForCausalLM(OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                    num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=32,
                                    pad_token_id=1, bos_token_id=0, eos_token_id=2))
