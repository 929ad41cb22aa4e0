"""Tiny hand-written residual families (pre-norm GPT, Llama, post-norm BERT, ViT, MLP-Mixer,
ResNet basic/bottleneck, ConvNeXt, parallel residual, encoder-decoder, no residual).

Sizes are tiny (C <= 32, 2 layers) so conversion, export and a few training steps run in
seconds on CPU. Every builder returns the model in eval mode.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 64


# ----------------------------------------------------------------------------- GPT (pre-norm)
class Attention(nn.Module):
    def __init__(self, c, heads=2, causal=True, rope=False, bias=True):
        super().__init__()
        self.h, self.causal, self.rope = heads, causal, rope
        self.qkv = nn.Linear(c, 3 * c, bias=bias)
        self.proj = nn.Linear(c, c, bias=bias)

    def forward(self, x, kv=None):
        b, t, c = x.shape
        if kv is None:
            q, k, v = self.qkv(x).split(c, dim=-1)
        else:
            w_q, w_kv = self.qkv.weight.split([c, 2 * c])
            b_q, b_kv = (self.qkv.bias.split([c, 2 * c]) if self.qkv.bias is not None else (None, None))
            q = F.linear(x, w_q, b_q)
            k, v = F.linear(kv, w_kv, b_kv).split(c, dim=-1)
        q, k, v = (z.reshape(b, -1, self.h, c // self.h).transpose(1, 2) for z in (q, k, v))
        if self.rope:
            q, k = apply_rope(q), apply_rope(k)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal and kv is None)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


def apply_rope(x):
    t, d = x.shape[-2], x.shape[-1]
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    ang = torch.arange(t, device=x.device, dtype=torch.float32)[:, None] * inv[None, :]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    rot = torch.cat([-x2, x1], dim=-1)
    return x * cos + rot * sin


class MLP(nn.Module):
    def __init__(self, c, hidden=None):
        super().__init__()
        self.fc = nn.Linear(c, hidden or 4 * c)
        self.out = nn.Linear(hidden or 4 * c, c)

    def forward(self, x):
        return self.out(F.gelu(self.fc(x)))


class GPTBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(c), Attention(c)
        self.ln2, self.mlp = nn.LayerNorm(c), MLP(c)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        x = x + self.mlp(self.ln2(x))
        return x


class TinyGPT(nn.Module):
    def __init__(self, c=32, layers=2, vocab=VOCAB, max_t=64):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, c), nn.Embedding(max_t, c)
        self.blocks = nn.ModuleList(GPTBlock(c) for _ in range(layers))
        self.ln_f, self.head = nn.LayerNorm(c), nn.Linear(c, vocab, bias=False)

    def forward(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x))


def tiny_gpt(c=32, layers=2):
    return TinyGPT(c, layers).eval()


def token_inputs(b=2, t=8):
    return (torch.randint(0, VOCAB, (b, t)),)


# ----------------------------------------------------------------------------- Llama
class RMSNorm(nn.Module):
    def __init__(self, c, eps=1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(c)), eps

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class SwiGLU(nn.Module):
    def __init__(self, c, hidden=48):
        super().__init__()
        self.gate, self.up = nn.Linear(c, hidden, bias=False), nn.Linear(c, hidden, bias=False)
        self.down = nn.Linear(hidden, c, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class LlamaBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norm1, self.attn = RMSNorm(c), Attention(c, rope=True, bias=False)
        self.norm2, self.mlp = RMSNorm(c), SwiGLU(c)

    def forward(self, x):
        h = x + self.attn(self.norm1(x))
        h += self.mlp(self.norm2(h))  # in-place spelling
        return h


class TinyLlama(nn.Module):
    def __init__(self, c=32, layers=2, vocab=VOCAB):
        super().__init__()
        self.embed = nn.Embedding(vocab, c)
        self.layers = nn.ModuleList(LlamaBlock(c) for _ in range(layers))
        self.norm, self.head = RMSNorm(c), nn.Linear(c, vocab, bias=False)

    def forward(self, idx):
        x = self.embed(idx)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


def tiny_llama(c=32, layers=2):
    return TinyLlama(c, layers).eval()


# ----------------------------------------------------------------------------- BERT (post-norm)
class BertLayer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.attn, self.ln1 = Attention(c, causal=False), nn.LayerNorm(c)
        self.mlp, self.ln2 = MLP(c), nn.LayerNorm(c)
        self.drop = nn.Dropout(0.0)

    def forward(self, x):
        x = self.ln1(torch.add(self.drop(self.attn(x)), x))  # branch first
        x = self.ln2(x + self.drop(self.mlp(x)))
        return x


class TinyBERT(nn.Module):
    def __init__(self, c=32, layers=2, vocab=VOCAB, max_t=64):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, c), nn.Embedding(max_t, c)
        self.ln_e = nn.LayerNorm(c)
        self.layers = nn.ModuleList(BertLayer(c) for _ in range(layers))
        self.head = nn.Linear(c, 2)

    def forward(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.ln_e(self.wte(idx) + self.wpe(pos))
        for layer in self.layers:
            x = layer(x)
        return self.head(x[:, 0])


def tiny_bert(c=32, layers=2):
    return TinyBERT(c, layers).eval()


# ----------------------------------------------------------------------------- ViT (post-norm variant)
class TinyViT(nn.Module):
    def __init__(self, c=32, layers=2, patch=4, classes=10):
        super().__init__()
        self.patch = nn.Conv2d(3, c, patch, stride=patch)
        self.cls = nn.Parameter(torch.randn(1, 1, c) * 0.02)
        self.layers = nn.ModuleList(BertLayer(c) for _ in range(layers))
        self.head = nn.Linear(c, classes)

    def forward(self, img):
        x = self.patch(img).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        for layer in self.layers:
            x = layer(x)
        return self.head(x[:, 0])


def tiny_vit(c=32, layers=2):
    return TinyViT(c, layers).eval()


def image_inputs(b=2, hw=16, ch=3):
    return (torch.randn(b, ch, hw, hw),)


# ----------------------------------------------------------------------------- MLP-Mixer
class MixerBlock(nn.Module):
    def __init__(self, c, tokens):
        super().__init__()
        self.ln1, self.token_mlp = nn.LayerNorm(c), MLP(tokens, 2 * tokens)
        self.ln2, self.channel_mlp = nn.LayerNorm(c), MLP(c)

    def forward(self, x):
        x = x + self.token_mlp(self.ln1(x).transpose(1, 2)).transpose(1, 2)
        x = x + self.channel_mlp(self.ln2(x))
        return x


class TinyMixer(nn.Module):
    def __init__(self, c=32, layers=2, patch=4, hw=16, classes=10):
        super().__init__()
        tokens = (hw // patch) ** 2
        self.patch = nn.Conv2d(3, c, patch, stride=patch)
        self.blocks = nn.ModuleList(MixerBlock(c, tokens) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(c), nn.Linear(c, classes)

    def forward(self, img):
        x = self.patch(img).flatten(2).transpose(1, 2)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x).mean(1))


def tiny_mixer(c=32, layers=2):
    return TinyMixer(c, layers).eval()


# ----------------------------------------------------------------------------- ResNet
class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        sc = x if self.down is None else self.down(x)
        return F.relu(out + sc)


class Bottleneck(nn.Module):
    def __init__(self, cin, cout, stride=1, mid=8):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv2, self.bn2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        sc = x if self.down is None else self.down(x)
        out += sc
        return F.relu(out)


class TinyResNet(nn.Module):
    """Stem, stage 1 (2 identity blocks), stage 2 (projection block + identity block)."""

    def __init__(self, block=BasicBlock, c=16, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.layer1 = nn.Sequential(block(c, c), block(c, c))
        self.layer2 = nn.Sequential(block(c, 2 * c, stride=2), block(2 * c, 2 * c))
        self.head = nn.Linear(2 * c, classes)

    def forward(self, img):
        x = self.layer2(self.layer1(self.stem(img)))
        return self.head(x.mean((2, 3)))


def tiny_resnet_basic():
    return _randomize_bn(TinyResNet(BasicBlock)).eval()


def tiny_resnet_bottleneck():
    return _randomize_bn(TinyResNet(Bottleneck)).eval()


def _randomize_bn(model):
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


# ----------------------------------------------------------------------------- ConvNeXt
class ConvNeXtBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.ln = nn.LayerNorm(c)
        self.pw1, self.pw2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.full((c,), 0.5))

    def forward(self, x):
        h = self.dw(x).permute(0, 2, 3, 1)
        h = self.pw2(F.gelu(self.pw1(self.ln(h))))
        h = (self.gamma * h).permute(0, 3, 1, 2)
        return x + h


class TinyConvNeXt(nn.Module):
    def __init__(self, c=16, layers=2, classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 4, stride=4)
        self.blocks = nn.Sequential(*[ConvNeXtBlock(c) for _ in range(layers)])
        self.head = nn.Linear(c, classes)

    def forward(self, img):
        return self.head(self.blocks(self.stem(img)).mean((2, 3)))


def tiny_convnext(c=16, layers=2):
    return TinyConvNeXt(c, layers).eval()


# ----------------------------------------------------------------------------- parallel residual
class ParallelBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.ln, self.attn, self.mlp = nn.LayerNorm(c), Attention(c), MLP(c)

    def forward(self, x):
        h = self.ln(x)
        return x + self.attn(h) + self.mlp(h)


class TinyParallel(nn.Module):
    def __init__(self, c=32, layers=2, vocab=VOCAB):
        super().__init__()
        self.embed = nn.Embedding(vocab, c)
        self.blocks = nn.ModuleList(ParallelBlock(c) for _ in range(layers))
        self.ln_f, self.head = nn.LayerNorm(c), nn.Linear(c, vocab)

    def forward(self, idx):
        x = self.embed(idx)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x))


def tiny_parallel(c=32, layers=2):
    return TinyParallel(c, layers).eval()


# ----------------------------------------------------------------------------- encoder-decoder
class DecoderBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.ln1, self.self_attn = nn.LayerNorm(c), Attention(c)
        self.ln2, self.cross = nn.LayerNorm(c), Attention(c, causal=False)
        self.ln3, self.mlp = nn.LayerNorm(c), MLP(c)

    def forward(self, x, mem):
        x = x + self.self_attn(self.ln1(x))
        x = x + self.cross(self.ln2(x), kv=mem)
        return x + self.mlp(self.ln3(x))


class TinyEncDec(nn.Module):
    """Pre-norm encoder (2 blocks) and decoder (2 blocks with cross-attention)."""

    def __init__(self, c=32, layers=2, vocab=VOCAB):
        super().__init__()
        self.embed = nn.Embedding(vocab, c)
        self.enc = nn.ModuleList(GPTBlock(c) for _ in range(layers))
        self.enc_ln = nn.LayerNorm(c)
        self.dec = nn.ModuleList(DecoderBlock(c) for _ in range(layers))
        self.dec_ln, self.head = nn.LayerNorm(c), nn.Linear(c, vocab)
        for blk in self.enc:
            blk.attn.causal = False

    def forward(self, src, tgt):
        mem = self.embed(src)
        for blk in self.enc:
            mem = blk(mem)
        mem = self.enc_ln(mem)
        x = self.embed(tgt)
        for blk in self.dec:
            x = blk(x, mem)
        return self.head(self.dec_ln(x))


def tiny_encdec(c=32, layers=2):
    return TinyEncDec(c, layers).eval()


def encdec_inputs(b=2, s=8, t=6):
    return (torch.randint(0, VOCAB, (b, s)), torch.randint(0, VOCAB, (b, t)))


# ----------------------------------------------------------------------------- no residual
class TinyPlain(nn.Module):
    def __init__(self, c=32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(c, c), nn.GELU(), nn.Linear(c, c))

    def forward(self, x):
        return self.net(x)


def tiny_plain(c=32):
    return TinyPlain(c).eval()


def plain_inputs(b=2, t=8, c=32):
    return (torch.randn(b, t, c),)


# ----------------------------------------------------------------------------- registry
# name: (builder, example_inputs(), other_inputs(), expected sites, expected chains)
FAMILIES = {
    "gpt": (tiny_gpt, lambda: token_inputs(2, 8), lambda: token_inputs(3, 5), 4, 1),
    "llama": (tiny_llama, lambda: token_inputs(2, 8), lambda: token_inputs(3, 5), 4, 1),
    "bert": (tiny_bert, lambda: token_inputs(2, 8), lambda: token_inputs(3, 5), 4, 1),
    "vit": (tiny_vit, lambda: image_inputs(2), lambda: image_inputs(3), 4, 1),
    "mixer": (tiny_mixer, lambda: image_inputs(2), lambda: image_inputs(3), 4, 1),
    "resnet_basic": (tiny_resnet_basic, lambda: image_inputs(2), lambda: image_inputs(3), 3, 2),
    "resnet_bottleneck": (tiny_resnet_bottleneck, lambda: image_inputs(2), lambda: image_inputs(3), 3, 2),
    "convnext": (tiny_convnext, lambda: image_inputs(2), lambda: image_inputs(3), 2, 1),
    "parallel": (tiny_parallel, lambda: token_inputs(2, 8), lambda: token_inputs(3, 5), 2, 1),
    "encdec": (tiny_encdec, lambda: encdec_inputs(2, 8, 6), lambda: encdec_inputs(3, 5, 7), 10, 2),
}
