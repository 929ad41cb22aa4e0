"""Convert a Hugging Face causal LM to mHC, check it computes the same function, then fine-tune it.

The model is built from a config (no download): a tiny GPT-2 or Llama from ``transformers``
with a byte vocabulary (256), so the stdlib text needs no tokenizer. Steps:

1. build the model (random init stands in for pretrained weights; ``--init-from DIR`` loads a
   local ``save_pretrained`` directory instead, safetensors only);
2. ``mhc_compile.convert(model, MHCConfig(streams=4), (input_ids,))``;
3. check the converted logits equal the original's at init (max relative error printed; the
   design asks for <= 1e-5 in fp32);
4. fine-tune both for ``--steps`` AdamW steps on stdlib text and print the losses and the mHC
   Amax gains.

    python examples/finetune_hf.py --arch llama --steps 30
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tinygpt import get_batch, load_corpus, param_groups, split  # noqa: E402

import mhc_compile  # noqa: E402
from mhc_compile import MHCConfig, diagnostics  # noqa: E402


class LogitsOnly(nn.Module):
    """``input_ids -> logits`` around an HF causal LM (no cache, no ModelOutput)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids):
        return self.lm(input_ids=input_ids, use_cache=False).logits


def build_hf(arch: str, dim: int, layers: int, heads: int, seq: int, init_from=None) -> nn.Module:
    import transformers

    if init_from is not None:
        lm = transformers.AutoModelForCausalLM.from_pretrained(init_from, use_safetensors=True)
    elif arch == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=256, n_positions=seq, n_embd=dim, n_layer=layers, n_head=heads,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        lm = transformers.GPT2LMHeadModel(cfg)
    elif arch == "llama":
        cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=layers,
                                       num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=seq,
                                       bos_token_id=0, eos_token_id=0, pad_token_id=0)
        lm = transformers.LlamaForCausalLM(cfg)
    else:
        raise ValueError(f"unknown arch {arch!r}")
    return LogitsOnly(lm.float().eval())


def finetune(model, train, args, gen) -> list[float]:
    opt = torch.optim.AdamW(param_groups(model, 0.0), lr=args.lr)
    losses = []
    for _ in range(args.steps):
        x, y = get_batch(train, args.batch, args.seq, gen)
        loss = F.cross_entropy(model(x).float().flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach().item())
    return losses


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="gpt2", choices=("gpt2", "llama"))
    ap.add_argument("--init-from", default=None, help="local save_pretrained directory (safetensors)")
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    original = build_hf(args.arch, args.dim, args.layers, args.heads, args.seq, args.init_from)
    train, val = split(load_corpus(300_000))
    probe = get_batch(val, 4, args.seq, torch.Generator().manual_seed(7))[0]
    t0 = time.time()
    converted = mhc_compile.convert(original, MHCConfig(streams=args.streams), (probe,))
    report = getattr(converted, "mhc_report", None)
    print(f"converted {args.arch} in {time.time() - t0:.1f}s: "
          f"{getattr(report, 'num_sites', '?')} sites in {getattr(report, 'num_chains', '?')} chain(s), "
          f"{getattr(report, 'params_added', '?')} parameters added")
    with torch.no_grad():
        ref = original(probe)
        got = converted(probe)
    rel = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
    print(f"max relative error of the converted logits at init: {rel:.3g}")

    gen_a, gen_b = torch.Generator().manual_seed(args.seed + 1), torch.Generator().manual_seed(args.seed + 1)
    base_losses = finetune(original, train, args, gen_a)
    mhc_losses = finetune(converted, train, args, gen_b)
    gains = diagnostics.amax_gains(converted, probe)
    print(f"fine-tune {args.steps} steps  original: {base_losses[0]:.3f} -> {base_losses[-1]:.3f}"
          f"   mHC: {mhc_losses[0]:.3f} -> {mhc_losses[-1]:.3f}")
    print(gains.to_table())
    return {"rel_error": rel, "base_losses": base_losses, "mhc_losses": mhc_losses, "gains": gains, "report": report}


if __name__ == "__main__":
    main()
