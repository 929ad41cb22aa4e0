"""Tiny Hugging Face models whose residual stream is not (B, T, C) or (B, C, H, W), built from
configs (no download): SAM's vision encoder and VitDet (residual (B, H, W, C), window attention),
and the models with native hyper-connections in transformers 5.25 (HY-V4, DeepSeek-V4, GLM5-Next,
Qwen4-Exp: a (B, T, n, C) or (B, T, n*C) state expanded at the embedding, collapsed at the head).
Every builder returns an eval-mode float32 model."""
from __future__ import annotations

import torch

VOCAB = 64


def sam_vision(window: int = 2):
    """SAM's vision encoder: 16x16 image, patch 4 -> a 4x4 grid of (B, 4, 4, 32) patches; layer 0 uses
    ``window``x``window`` window attention, layer 1 global attention."""
    from transformers import SamVisionConfig, SamVisionModel

    cfg = SamVisionConfig(hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=2,
                          image_size=16, patch_size=4, window_size=window, global_attn_indexes=[1], mlp_dim=64,
                          num_pos_feats=8, use_rel_pos=False)
    return SamVisionModel(cfg).float().eval()


def sam_vision_local(window: int = 2):
    """SAM's vision encoder with window attention in every layer (local: a window's outputs read only its inputs)."""
    from transformers import SamVisionConfig, SamVisionModel

    cfg = SamVisionConfig(hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=2,
                          image_size=16, patch_size=4, window_size=window, global_attn_indexes=[], mlp_dim=64,
                          num_pos_feats=8, use_rel_pos=False)
    return SamVisionModel(cfg).float().eval()


def vitdet():
    from transformers import VitDetConfig, VitDetModel

    cfg = VitDetConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=16,
                       pretrain_image_size=16, patch_size=4, window_block_indices=[0], window_size=2)
    return VitDetModel(cfg).float().eval()


def hy_v4():
    from transformers import HYV4Config, HYV4ForCausalLM

    cfg = HYV4Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                     num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                     q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16,
                     n_routed_experts=4, num_experts_per_tok=2, mlp_layer_types=["dense", "dense"],
                     max_position_embeddings=64, pad_token_id=0, bos_token_id=0, eos_token_id=1)
    return HYV4ForCausalLM(cfg).float().eval()


def deepseek_v4():
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    cfg = DeepseekV4Config(vocab_size=VOCAB, hidden_size=32, moe_intermediate_size=16, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16, q_lora_rank=16,
                           n_routed_experts=4, num_experts_per_tok=2, max_position_embeddings=64, hc_mult=4,
                           o_groups=1, o_lora_rank=16, index_n_heads=2, index_head_dim=8, index_topk=4,
                           sliding_window=8, num_nextn_predict_layers=0, pad_token_id=0, bos_token_id=0,
                           eos_token_id=1)
    return DeepseekV4ForCausalLM(cfg).float().eval()


def qwen4_exp():
    from transformers import Qwen4ExpForCausalLM, Qwen4ExpTextConfig

    cfg = Qwen4ExpTextConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             num_key_value_heads=1, head_dim=16, linear_key_head_dim=8, linear_value_head_dim=8,
                             linear_num_key_heads=2, linear_num_value_heads=2, moe_intermediate_size=16,
                             shared_expert_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
                             max_position_embeddings=64, hc_lowrank=8, indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=16,
                             indexer_budget=8, indexer_compress_ratio=4, layer_types=["linear_attention",
                             "full_attention"], pad_token_id=0, bos_token_id=0, eos_token_id=1)
    return Qwen4ExpForCausalLM(cfg).float().eval()
