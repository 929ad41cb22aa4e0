"""Models whose residual stream passes through reshapes, window partitions and casts (issue #15).

* :class:`TinyFlatMLP`: a decoder layer that flattens its hidden states to ``(B*T, C)`` for the
  MLP and views them back (Megatron / some HF MoE layers do this);
* :class:`TinySwin`: windowed attention with window partition / reverse (and a cyclic shift on
  odd blocks) between the sites, the stream kept as ``(B, H, W, C)`` between blocks;
* :class:`TinySSM`: Mamba-style blocks ``(hidden, residual) -> (mixer(norm(residual)), residual)``
  with ``residual_in_fp32``: a gated depthwise causal conv mixer (no selective scan), the
  residual kept in float32 while the mixer runs in the model dtype;
* :class:`CastSkipBlock`: ``x.to(torch.float32) + f(x)``, the skip operand a cast of the stream.
"""
import torch
from torch import nn
from torch.nn import functional as F

from .zoo import MLP, VOCAB, Attention, RMSNorm


class FlatMLPBlock(nn.Module):
    def __init__(self, c, flat=True):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(c), Attention(c)
        self.ln2, self.mlp = nn.LayerNorm(c), MLP(c)
        self.flat = flat  # False: the same function without the reshapes (the reference)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        if not self.flat:
            return x + self.mlp(self.ln2(x))
        b, t, c = x.shape
        h = x.reshape(b * t, c)
        h = h + self.mlp(self.ln2(h))
        return h.view(b, t, c)


class TinyFlatMLP(nn.Module):
    def __init__(self, c=32, layers=2, vocab=VOCAB, flat=True):
        super().__init__()
        self.embed = nn.Embedding(vocab, c)
        self.blocks = nn.ModuleList(FlatMLPBlock(c, flat) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(c), nn.Linear(c, vocab)

    def forward(self, idx):
        x = self.embed(idx)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x))


class WindowBlock(nn.Module):
    """Swin-style: (B, H, W, C) -> windows (B*nW, w*w, C) -> attention + MLP -> reverse."""

    def __init__(self, c, window=2, shift=0):
        super().__init__()
        self.window, self.shift = window, shift
        self.ln1, self.attn = nn.LayerNorm(c), Attention(c, causal=False)
        self.ln2, self.mlp = nn.LayerNorm(c), MLP(c)

    def partition(self, x):
        b, h, w, c = x.shape
        k = self.window
        return x.view(b, h // k, k, w // k, k, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, k * k, c)

    def reverse(self, win, b, h, w):
        k, c = self.window, win.shape[-1]
        return win.view(b, h // k, w // k, k, k, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)

    def mix(self, win):
        win = win + self.attn(self.ln1(win))
        return win + self.mlp(self.ln2(win))

    def forward(self, x):
        b, h, w, c = x.shape
        s = self.shift
        if s:
            x = torch.roll(x, shifts=(-s, -s), dims=(1, 2))
        x = self.reverse(self.mix(self.partition(x)), b, h, w)
        if s:
            x = torch.roll(x, shifts=(s, s), dims=(1, 2))
        return x


class TinySwin(nn.Module):
    """``keep_windows=True`` (with ``shift=False``) is the reference: the same function with one
    partition before the blocks and one reverse after them."""

    def __init__(self, c=32, layers=2, patch=2, classes=10, shift=True, keep_windows=False):
        super().__init__()
        self.patch = nn.Conv2d(3, c, patch, stride=patch)
        self.blocks = nn.ModuleList(WindowBlock(c, 2, shift=(i % 2) if shift else 0) for i in range(layers))
        self.ln, self.head = nn.LayerNorm(c), nn.Linear(c, classes)
        self.keep_windows = keep_windows

    def forward(self, img):
        x = self.patch(img).permute(0, 2, 3, 1)  # (B, H, W, C)
        if self.keep_windows:
            b, h, w, _ = x.shape
            win = self.blocks[0].partition(x)
            for blk in self.blocks:
                win = blk.mix(win)
            x = self.blocks[0].reverse(win, b, h, w)
        for blk in [] if self.keep_windows else self.blocks:
            x = blk(x)
        return self.head(self.ln(x).mean(dim=(1, 2)))


class GatedConvMixer(nn.Module):
    """in_proj -> (u, gate); causal depthwise conv over time on u; silu gate; out_proj."""

    def __init__(self, c, expand=2, kernel=3):
        super().__init__()
        e = expand * c
        self.in_proj = nn.Linear(c, 2 * e)
        self.conv = nn.Conv1d(e, e, kernel, groups=e, padding=kernel - 1)
        self.out_proj = nn.Linear(e, c)

    def forward(self, x):
        t = x.shape[1]
        u, gate = self.in_proj(x).chunk(2, dim=-1)
        u = self.conv(u.transpose(1, 2))[..., :t].transpose(1, 2)
        return self.out_proj(F.silu(u) * F.silu(gate))


class SSMBlock(nn.Module):
    """Mamba's Block: ``residual = hidden + residual``; ``hidden = mixer(norm(residual))``."""

    def __init__(self, c, residual_in_fp32=True, residual_dtype=torch.float32):
        super().__init__()
        self.norm, self.mixer = RMSNorm(c), GatedConvMixer(c)
        self.residual_in_fp32 = residual_in_fp32
        self.residual_dtype = residual_dtype  # float64 makes the cast real in a float32 model (tests)

    def forward(self, hidden, residual=None):
        residual = hidden if residual is None else hidden + residual
        hidden = self.norm(residual.to(self.norm.weight.dtype))
        if self.residual_in_fp32:
            residual = residual.to(self.residual_dtype)
        return self.mixer(hidden), residual


class TinySSM(nn.Module):
    """``paired=False`` is the reference: the same function as plain pre-norm residuals
    ``x = x + mixer(norm(x))`` in the model dtype."""

    def __init__(self, c=32, layers=3, vocab=VOCAB, residual_in_fp32=True, paired=True, residual_dtype=torch.float32):
        super().__init__()
        self.embed = nn.Embedding(vocab, c)
        self.blocks = nn.ModuleList(SSMBlock(c, residual_in_fp32, residual_dtype) for _ in range(layers))
        self.norm_f, self.head = RMSNorm(c), nn.Linear(c, vocab)
        self.paired = paired

    def forward(self, idx):
        if not self.paired:
            x = self.embed(idx)
            for blk in self.blocks:
                x = x + blk.mixer(blk.norm(x))
            return self.head(self.norm_f(x))
        hidden, residual = self.embed(idx), None
        for blk in self.blocks:
            hidden, residual = blk(hidden, residual)
        residual = hidden + residual
        return self.head(self.norm_f(residual.to(self.norm_f.weight.dtype)))


class CastSkipBlock(nn.Module):
    def __init__(self, c, cast=True, residual_dtype=torch.float32):
        super().__init__()
        self.norm, self.mixer = RMSNorm(c), GatedConvMixer(c)
        self.cast = cast  # False: x + f(x), the reference
        self.residual_dtype = residual_dtype

    def forward(self, x):
        if not self.cast:
            return x + self.mixer(self.norm(x))
        residual = x.to(self.residual_dtype)
        return (residual + self.mixer(self.norm(x)).to(self.residual_dtype)).to(x.dtype)


class TinyCastSkip(nn.Module):
    def __init__(self, c=32, layers=2, vocab=VOCAB, cast=True, residual_dtype=torch.float32):
        super().__init__()
        self.embed = nn.Embedding(vocab, c)
        self.blocks = nn.ModuleList(CastSkipBlock(c, cast, residual_dtype) for _ in range(layers))
        self.head = nn.Linear(c, vocab)

    def forward(self, idx):
        x = self.embed(idx)
        for blk in self.blocks:
            x = blk(x)
        return self.head(x)
