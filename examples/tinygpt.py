"""Shared pieces of the examples: an offline byte-level text corpus, a small GPT, and its mHC / HC variants.

* :func:`load_corpus` reads real text that is always on the machine: the Python standard library's
  own ``.py`` sources (``sysconfig.get_paths()["stdlib"]``), or a user's text file. Byte tokens,
  vocabulary 256, nothing downloaded.
* :class:`GPT` is the package's plain pre-norm GPT (``mhc_compile.models.TinyGPT``:
  ``x = x + attn(ln1(x)); x = x + mlp(ln2(x))``) with a GPT-2 style init.
* :func:`make_variant` turns it into the mHC (``variant="mhc"``) or HC (``variant="hc"``) model with
  ``mhc_compile.convert`` when that is available; :class:`HandStreamGPT` is the same rewrite
  written by hand from ``mhc_compile.ops`` (used as a fallback and as a cross-check).
"""
from __future__ import annotations

import math
import os
import sysconfig
from pathlib import Path
from typing import Optional

import torch
from torch import nn

import mhc_compile
from mhc_compile import MHCConfig, ops, reference
from mhc_compile.models import TinyGPT


# ----------------------------------------------------------------------------- data
def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).parts
        if any(part in ("site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__") for part in rel):
            continue
        files.append(p)
    return files


def load_corpus(max_bytes: int = 2_000_000, text_file: Optional[str] = None) -> torch.Tensor:
    """Up to ``max_bytes`` bytes of real text as a uint8 tensor (byte-level tokens, vocab 256)."""
    if text_file is not None:
        data = Path(text_file).read_bytes()[:max_bytes]
        if len(data) < 4096:
            raise ValueError(f"{text_file}: need at least 4096 bytes of text, got {len(data)}")
    else:
        chunks, total = [], 0
        for p in stdlib_files():
            try:
                b = p.read_bytes()
            except OSError:
                continue
            chunks.append(b)
            total += len(b)
            if total >= max_bytes:
                break
        data = b"\n".join(chunks)[:max_bytes]
        if len(data) < 4096:
            raise RuntimeError(
                f"found only {len(data)} bytes of Python sources under {sysconfig.get_paths()['stdlib']}; "
                "pass a text file with --text FILE"
            )
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


def split(data: torch.Tensor, val_frac: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    cut = int(len(data) * (1 - val_frac))
    return data[:cut], data[cut:]


def get_batch(data: torch.Tensor, batch: int, seq: int, gen: torch.Generator, device="cpu"):
    ix = torch.randint(0, len(data) - seq - 1, (batch,), generator=gen)
    x = torch.stack([data[i : i + seq] for i in ix.tolist()]).long()
    y = torch.stack([data[i + 1 : i + seq + 1] for i in ix.tolist()]).long()
    return x.to(device), y.to(device)


# ----------------------------------------------------------------------------- model
class GPT(TinyGPT):
    """Plain pre-norm GPT over bytes (``mhc_compile.models.TinyGPT``) with GPT-2 style init;
    ``forward(idx) -> logits``."""

    def __init__(self, vocab: int = 256, c: int = 64, layers: int = 4, heads: int = 4, seq: int = 128):
        super().__init__(vocab, dim=c, layers=layers, heads=heads, max_len=seq)
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2 style scaled init of the residual projections
            if name.endswith("proj.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * layers))

    @staticmethod
    def _init(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)


class SiteParams(nn.Module):
    def __init__(self, tensors: dict):
        super().__init__()
        for k, v in tensors.items():
            setattr(self, k, nn.Parameter(v))


class HandStreamGPT(nn.Module):
    """The mHC / HC rewrite of :class:`GPT` written by hand from ``mhc_compile.ops``.

    Every residual add (two per block) becomes one site; the streams start after the embedding
    and are collapsed (mean) before ``ln_f``. Parameters: ``blocks.{i}.{attn,mlp}.mhc.{phi,...}``.
    """

    def __init__(self, gpt: GPT, config: MHCConfig):
        super().__init__()
        self.gpt, self.config = gpt, config
        n, c = config.streams, gpt.tok.embedding_dim
        self.mhc = nn.ModuleDict()
        for i in range(len(gpt.blocks)):
            for j, kind in enumerate(("attn", "mlp")):
                p = reference.init_site_params(
                    n, c, 2 * i + j, variant=config.variant, init=config.init,
                    dynamic=config.dynamic, alpha_init=config.alpha_init,
                )
                self.mhc[f"blocks_{i}_{kind}"] = SiteParams(p)

    def forward(self, idx):
        cfg, gpt = self.config, self.gpt
        s = ops.expand(gpt.embed(idx), cfg.streams)
        for i, block in enumerate(gpt.blocks):
            for kind, norm, f in (("attn", block.ln1, block.attn), ("mlp", block.ln2, block.mlp)):
                p = self.mhc[f"blocks_{i}_{kind}"]
                hp, ho, hr = ops.coeffs(
                    s, getattr(p, "phi", None), getattr(p, "alpha", None), p.b_pre, p.b_post, p.b_res,
                    cfg.sinkhorn_iters, cfg.eps, cfg.variant, cfg.dynamic, cfg.kernels,
                )
                h_out = f(norm(ops.pre(s, hp, cfg.kernels)))
                s = ops.post_res(s, h_out.to(s.dtype), ho, hr, cfg.kernels)
        return gpt.head(gpt.ln_f(ops.collapse(s, cfg.collapse)))


def have_convert() -> bool:
    return hasattr(mhc_compile, "convert")


def make_variant(
    gpt: GPT, variant: str, streams: int, example_idx: torch.Tensor, builder: str = "auto", **config
) -> nn.Module:
    """``variant`` in plain / hc / mhc. ``builder``: "convert" (mhc_compile.convert), "hand"
    (:class:`HandStreamGPT`), or "auto" (convert when the package has it, else hand)."""
    if variant == "plain":
        return gpt
    cfg = MHCConfig(streams=streams, variant=variant, **config)
    if builder == "auto":
        builder = "convert" if have_convert() else "hand"
    if builder == "convert":
        return mhc_compile.convert(gpt, cfg, (example_idx,))
    if builder == "hand":
        return HandStreamGPT(gpt, cfg)
    raise ValueError(f"unknown builder {builder!r}")


def param_groups(model: nn.Module, weight_decay: float):
    """AdamW groups: decay the 2-d weights of the original model; never the mHC/HC parameters,
    embeddings' positions, norms or biases (decaying b_res would pull H_res towards 0)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() >= 2 and "mhc" not in name and "pos" not in name:
            decay.append(p)
        else:
            no_decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def set_mode(model: nn.Module, training: bool) -> None:
    """model.train(training); modules from torch.export's ``ep.module()`` refuse it, which is fine here
    (the GPT has no dropout or batch norm)."""
    try:
        model.train(training)
    except NotImplementedError:
        pass


def atomic_write_text(path: os.PathLike, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
