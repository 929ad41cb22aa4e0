"""Small models shipped with the package.

Owns :class:`TinyGPT`, the one small pre-norm GPT (``x = x + attn(ln1(x)); x = x + mlp(ln2(x))``)
that serves as the built-in model of ``mhc demo`` (``mhc_compile.cli.demo``), the base of the
examples' GPT (``examples/tinygpt.py``, which adds a GPT-2 style init) and the plain / anchor
models of the training benchmark (``benchmarks/bench_train.py``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TinyGPT"]


class Attention(nn.Module):
    """Causal multi-head self-attention (one fused qkv projection, SDPA)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class MLP(nn.Module):
    """``proj(gelu(fc(x)))`` with hidden width 4 * dim; ``gelu`` is GELU's ``approximate`` ("none" / "tanh")."""

    def __init__(self, dim: int, gelu: str = "none"):
        super().__init__()
        self.fc = nn.Linear(dim, 4 * dim)
        self.proj = nn.Linear(4 * dim, dim)
        self.gelu = gelu

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x), approximate=self.gelu))


class Block(nn.Module):
    """One pre-norm transformer block: two residual adds."""

    def __init__(self, dim: int, heads: int, gelu: str = "none"):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, gelu)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        x = x + self.mlp(self.ln2(x))
        return x


class TinyGPT(nn.Module):
    """A pre-norm GPT: token + position embeddings, L blocks, final LayerNorm, LM head.

    ``forward(idx) -> logits``; :meth:`embed` gives the residual stream's input (used by the
    hand-written mHC variants of the examples and the benchmark). Default (PyTorch) init.
    """

    def __init__(self, vocab: int = 256, dim: int = 64, layers: int = 4, heads: int = 4, max_len: int = 64,
                 gelu: str = "none"):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, gelu) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def embed(self, idx):
        return self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))

    def forward(self, idx):
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))
