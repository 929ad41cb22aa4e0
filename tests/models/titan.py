"""A torchtitan-style Llama: a ``ModuleDict`` of blocks, each called as ``layer(h, freqs)``.

The rotary table ``freqs`` is a buffer of the root, passed to every block as a second tensor
argument, the way torchtitan's ``Transformer.forward`` does; built under ``torch.device("meta")``
it has ``init_weights()`` for the root's own buffers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 64


def rope_table(head_dim: int, t: int) -> torch.Tensor:
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    ang = torch.arange(t, dtype=torch.float32)[:, None] * inv[None, :]
    return torch.cat([ang.cos(), ang.sin()], dim=-1)  # (t, head_dim)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    t, d = x.shape[-2], x.shape[-1]
    cos, sin = freqs[:t, : d // 2], freqs[:t, d // 2:]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class TitanAttention(nn.Module):
    def __init__(self, c: int, heads: int):
        super().__init__()
        self.heads = heads
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(c, c, bias=False) for _ in range(4))

    def forward(self, x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (w(x).view(b, t, self.heads, c // self.heads).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        q, k = apply_rope(q, freqs), apply_rope(k, freqs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(b, t, c))


class TitanFeedForward(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.w1, self.w3 = nn.Linear(c, 2 * c, bias=False), nn.Linear(c, 2 * c, bias=False)
        self.w2 = nn.Linear(2 * c, c, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TitanBlock(nn.Module):
    def __init__(self, c: int, heads: int):
        super().__init__()
        self.attention_norm, self.ffn_norm = nn.RMSNorm(c), nn.RMSNorm(c)
        self.attention, self.feed_forward = TitanAttention(c, heads), TitanFeedForward(c)

    def forward(self, x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), freqs)
        return h + self.feed_forward(self.ffn_norm(h))


class TitanLlama(nn.Module):
    def __init__(self, c: int = 32, layers: int = 3, heads: int = 2, max_t: int = 32, vocab: int = VOCAB):
        super().__init__()
        self.heads, self.max_t = heads, max_t
        self.tok_embeddings = nn.Embedding(vocab, c)
        self.layers = nn.ModuleDict({str(i): TitanBlock(c, heads) for i in range(layers)})
        self.norm, self.output = nn.RMSNorm(c), nn.Linear(c, vocab, bias=False)
        self.register_buffer("freqs", rope_table(c // heads, max_t), persistent=False)

    def init_weights(self) -> None:
        """The root's own non-persistent buffer, after ``to_empty`` (torchtitan's ``init_weights``)."""
        self.freqs = rope_table(self.freqs.shape[-1], self.max_t).to(self.freqs.device)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
        for layer in self.layers.values():
            h = layer(h, self.freqs)
        return self.output(self.norm(h))


def tiny_titan(c: int = 32, layers: int = 3) -> TitanLlama:
    return TitanLlama(c, layers).eval()
