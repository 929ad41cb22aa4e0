"""A tiny Swin in timm 1.x's layout (written here: timm needs torch 2.14.1; not installed).

timm keeps the residual stream channels-last as (B, H, W, C) between blocks: each block adds
its window attention on (B, H, W, C), reshapes to (B, H*W, C) for the MLP's add, and reshapes
back. The attention branch pads to a multiple of the window, partitions with
view/permute/contiguous/view, runs attention per window, reverses with view/permute/contiguous/
view, crops and rolls back. A stage is a patch merging (2x2 -> 2C) then its blocks. The same
sequence of ops as ``timm.models.swin_transformer`` (``window_partition``, ``window_reverse``,
``SwinTransformerBlock._attn``/``forward``, ``PatchMerging``), without relative position bias.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def window_partition(x, window_size):
    B, H, W, C = x.shape
    x = x.view(B, H // window_size[0], window_size[0], W // window_size[1], window_size[1], C)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, window_size[0], window_size[1], C)


def window_reverse(windows, window_size, H: int, W: int):
    C = windows.shape[-1]
    x = windows.view(-1, H // window_size[0], W // window_size[1], window_size[0], window_size[1], C)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, H, W, C)


class WindowAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B_, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B_, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B_, N, -1))


class Mlp(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SwinTransformerBlock(nn.Module):
    def __init__(self, dim, heads, window=2, shift=0):
        super().__init__()
        self.window_size, self.shift_size = (window, window), (shift, shift)
        self.window_area = window * window
        self.norm1, self.attn = nn.LayerNorm(dim), WindowAttention(dim, heads)
        self.drop_path1, self.drop_path2 = nn.Identity(), nn.Identity()
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim)

    def _attn(self, x):
        B, H, W, C = x.shape
        has_shift = any(self.shift_size)
        shifted_x = torch.roll(x, shifts=(-self.shift_size[0], -self.shift_size[1]), dims=(1, 2)) if has_shift else x
        pad_h = (self.window_size[0] - H % self.window_size[0]) % self.window_size[0]
        pad_w = (self.window_size[1] - W % self.window_size[1]) % self.window_size[1]
        shifted_x = F.pad(shifted_x, (0, 0, 0, pad_w, 0, pad_h))
        _, Hp, Wp, _ = shifted_x.shape
        x_windows = window_partition(shifted_x, self.window_size).view(-1, self.window_area, C)
        attn_windows = self.attn(x_windows).view(-1, self.window_size[0], self.window_size[1], C)
        shifted_x = window_reverse(attn_windows, self.window_size, Hp, Wp)
        shifted_x = shifted_x[:, :H, :W, :].contiguous()
        return torch.roll(shifted_x, shifts=self.shift_size, dims=(1, 2)) if has_shift else shifted_x

    def forward(self, x):
        B, H, W, C = x.shape
        x = x + self.drop_path1(self._attn(self.norm1(x)))
        x = x.reshape(B, -1, C)
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x.reshape(B, H, W, C)


class PatchMerging(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm, self.reduction = nn.LayerNorm(4 * dim), nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x):
        B, H, W, C = x.shape
        x = x.reshape(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.reduction(self.norm(x))


class SwinTransformerStage(nn.Module):
    def __init__(self, dim, depth, heads, downsample):
        super().__init__()
        self.downsample = PatchMerging(dim // 2) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*[SwinTransformerBlock(dim, heads, shift=0 if i % 2 == 0 else 1)
                                      for i in range(depth)])

    def forward(self, x):
        return self.blocks(self.downsample(x))


class TimmStyleSwin(nn.Module):
    """Patch embedding (conv, then channels-last), two stages of two blocks, norm, pooled head."""

    def __init__(self, dim=16, depths=(2, 2), heads=(2, 2), patch=2, classes=10):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.embed_norm = nn.LayerNorm(dim)
        self.layers = nn.Sequential(*[SwinTransformerStage(dim * 2 ** i, d, h, downsample=i > 0)
                                      for i, (d, h) in enumerate(zip(depths, heads))])
        self.norm = nn.LayerNorm(dim * 2 ** (len(depths) - 1))
        self.head = nn.Linear(dim * 2 ** (len(depths) - 1), classes)

    def forward(self, img):
        x = self.embed_norm(self.patch_embed(img).permute(0, 2, 3, 1))
        x = self.norm(self.layers(x))
        return self.head(x.mean(dim=(1, 2)))


def tiny_timm_swin():
    return TimmStyleSwin().eval()
