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
