"""torchtitan's own Llama3 (``torchtitan.models.llama3``) at a tiny size, built the way its
``debugmodel`` flavor is (same layer recipe, inits and RoPE; only the sizes are smaller).

``attn_backend="flex"`` is torchtitan's default: every block takes a flex-attention ``BlockMask``
(``model.get_attention_masks(positions)``); ``"sdpa"`` is its causal SDPA backend (no mask).
Callers skip with :func:`require_torchtitan` when torchtitan or its Llama3 does not import.
"""
from __future__ import annotations

import pytest
import torch

VOCAB = 256


def require_torchtitan():
    """Skip the calling test (or module) when torchtitan's Llama3 does not import with this torch."""
    return pytest.importorskip(
        "torchtitan.models.llama3", exc_type=ImportError,
        reason="torchtitan or its Llama3 does not import with this torch (torchtitan 0.3.0 needs a newer torch than 2.11)")


def tiny_llama3_config(attn_backend: str = "flex", dim: int = 64, layers: int = 2, heads: int = 4,
                       vocab: int = VOCAB):
    from torchtitan.models import llama3 as tl
    from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm, compute_ffn_hidden_dim

    return tl.Llama3Model.Config(
        dim=dim,
        vocab_size=vocab,
        tok_embeddings=Embedding.Config(num_embeddings=vocab, embedding_dim=dim, param_init=tl._EMBEDDING_INIT),
        norm=RMSNorm.Config(normalized_shape=dim, param_init=tl._NORM_INIT),
        lm_head=Linear.Config(in_features=dim, out_features=vocab, param_init=tl._output_linear_init(dim)),
        layers=tl._build_llama3_layers(
            fuse_qkv=True, n_layers=layers, dim=dim, n_heads=heads,
            hidden_dim=compute_ffn_hidden_dim(dim, multiple_of=32),
            rope=ComplexRoPE.Config(dim=dim // heads, max_seq_len=256, theta=500000, scaling="llama"),
            attn_backend=attn_backend,
        ),
    )


def tiny_llama3(attn_backend: str = "flex", seed: int = 0, device: str = "cpu", **sizes):
    """The model, initialised by its own ``init_weights`` (on ``device="meta"``: not initialised)."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = tiny_llama3_config(attn_backend, **sizes).build()
    if device != "meta":
        model.init_weights(buffer_device=None)
    return model


def flex_masks(model, batch: int, seq: int):
    """torchtitan's own causal + document BlockMask for ``batch`` sequences of ``seq`` tokens."""
    positions = torch.arange(seq).repeat(batch, 1)
    return model.get_attention_masks(positions)


def dense_flex(q, k, v, *, score_mod=None, block_mask=None, scale=None, enable_gqa=False, return_aux=None,
               kernel_options=None):
    """A stand-in for torchtitan's ``FlexAttention.compiled_flex_attn`` that runs on the CPU with
    grad (flex attention has no CPU backward): the BlockMask's own ``mask_mod`` made dense, then
    SDPA. A test-side patch only (``monkeypatch.setattr(FlexAttention, "compiled_flex_attn",
    staticmethod(dense_flex))``)."""
    from torch.nn.attention.flex_attention import create_mask

    assert score_mod is None and (return_aux is None or not return_aux.lse)
    b, _, lq, _ = q.shape
    mask = create_mask(block_mask.mask_mod, b, None, lq, k.shape[2], device=q.device)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=enable_gqa)
    return out, None


def patch_dense_flex(monkeypatch) -> None:
    from torchtitan.models.common.attention import FlexAttention

    monkeypatch.setattr(FlexAttention, "compiled_flex_attn", staticmethod(dense_flex))
