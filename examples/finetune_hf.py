"""Convert a Hugging Face causal LM to mHC and use it as the Hugging Face model it still is:
check the function at init, fine-tune with ``transformers.Trainer``, generate with the KV cache,
save with ``save_pretrained`` and load back with ``mhc_compile.load``.

The model is built from a config with its defaults (``use_cache=True``; no download): a tiny
GPT-2 or Llama with a byte vocabulary (256), so the stdlib text needs no tokenizer
(``--init-from DIR`` starts from a local ``save_pretrained`` directory instead). Steps:

1. ``mhc_compile.convert(model, MHCConfig(streams=4), (input_ids,))``: the same class back;
2. the converted logits equal the original's at init, and greedy ``generate`` gives the same
   tokens (max relative error printed; the design asks for <= 1e-5 in fp32);
3. ``Trainer`` fine-tunes it for ``--steps`` steps with labels in the batch (loss printed at the
   start and the end; the mHC Amax gains after);
4. ``generate`` from a prompt, with the KV cache and without (the same tokens);
5. ``save_pretrained(DIR)`` then ``mhc_compile.load(DIR)``: the same class, equal logits.

    python examples/finetune_hf.py --quick          # CPU, under a minute
    python examples/finetune_hf.py --arch llama --steps 200 --out runs/llama_mhc
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tinygpt import load_corpus, split  # noqa: E402

import mhc_compile  # noqa: E402
from mhc_compile import MHCConfig, diagnostics  # noqa: E402


def build_hf(arch: str, dim: int, layers: int, heads: int, seq: int, init_from=None):
    """A causal LM with its config's defaults (use_cache=True), byte vocabulary, eval mode."""
    import transformers

    if init_from is not None:
        return transformers.AutoModelForCausalLM.from_pretrained(init_from, use_safetensors=True).float().eval()
    if arch == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=256, n_positions=4 * seq, n_embd=dim, n_layer=layers, n_head=heads,
                                      bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(cfg).eval()
    if arch == "llama":
        cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=dim, intermediate_size=2 * dim,
                                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                                       max_position_embeddings=4 * seq, bos_token_id=0, eos_token_id=0, pad_token_id=0)
        return transformers.LlamaForCausalLM(cfg).eval()
    raise ValueError(f"unknown arch {arch!r}")


class ByteChunks(torch.utils.data.Dataset):
    """Fixed-length byte windows of a text, as Trainer batches: ``input_ids`` and ``labels``
    (the model shifts the labels itself)."""

    def __init__(self, data: torch.Tensor, seq: int, count: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.starts = torch.randint(0, len(data) - seq - 1, (count,), generator=g).tolist()
        self.data, self.seq = data, seq

    def __len__(self):
        return len(self.starts)

    def __getitem__(self, i):
        x = self.data[self.starts[i]: self.starts[i] + self.seq].long()
        return {"input_ids": x, "labels": x.clone()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _eval_loss(model, batch: dict) -> float:
    model.eval()
    with torch.no_grad():
        return model(**batch).loss.item()


def fine_tune(model, data, args, out_dir: str) -> dict:
    import transformers

    train = ByteChunks(data, args.seq, args.steps * args.batch, args.seed)
    probe = {k: torch.stack([train[i][k] for i in range(min(8, len(train)))]) for k in ("input_ids", "labels")}
    before = _eval_loss(model, probe)
    targs = transformers.TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=args.batch, max_steps=args.steps, learning_rate=args.lr,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, logging_steps=max(1, args.steps // 5),
        save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(), disable_tqdm=True, seed=args.seed)
    trainer = transformers.Trainer(model=model, args=targs, train_dataset=train)
    trainer.train()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"before": before, "after": _eval_loss(model, probe), "logged": logged}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="gpt2", choices=("gpt2", "llama"))
    ap.add_argument("--init-from", default=None, help="local save_pretrained directory (safetensors)")
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--out", default=None, help="save_pretrained directory (default: a temporary one)")
    ap.add_argument("--quick", action="store_true", help="a CPU smoke run: 20 steps of a 32-wide model")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.dim, args.batch, args.seq, args.new_tokens = 20, 32, 8, 32, 12
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    original = build_hf(args.arch, args.dim, args.layers, args.heads, args.seq, args.init_from)
    train, val = split(load_corpus(300_000))
    prompt = val[:args.seq].long().view(1, -1).repeat(2, 1)
    prompt[1] = val[args.seq: 2 * args.seq].long()

    t0 = time.time()
    converted = mhc_compile.convert(original, MHCConfig(streams=args.streams), (prompt,))
    report = converted.mhc_report
    print(f"converted {type(original).__name__} in {time.time() - t0:.1f}s -> {type(converted).__name__} "
          f"({report.form} form): {report.num_sites} sites in {report.num_chains} chain(s), "
          f"{report.params_added} parameters added")
    gen = {"max_new_tokens": args.new_tokens, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        rel = _rel(converted(prompt).logits, original(prompt).logits)
        same_tokens = bool(torch.equal(converted.generate(prompt, **gen), original.generate(prompt, **gen)))
    print(f"at init: max relative error of the logits {rel:.3g}; greedy generate equal: {same_tokens}")

    with tempfile.TemporaryDirectory() as tmp:
        losses = fine_tune(converted, train, args, tmp)
    print(f"Trainer, {args.steps} steps: eval loss {losses['before']:.3f} -> {losses['after']:.3f} "
          f"(logged {', '.join(f'{x:.3f}' for x in losses['logged'])})")
    gains = diagnostics.amax_gains(converted, prompt)
    print(gains.to_table())

    converted.eval()
    with torch.no_grad():
        cached = converted.generate(prompt, use_cache=True, **gen)
        uncached = converted.generate(prompt, use_cache=False, **gen)
    text = bytes(cached[0, prompt.shape[1]:].tolist()).decode("utf-8", "replace")
    print(f"generate (KV cache == no cache: {bool(torch.equal(cached, uncached))}): {text!r}")

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or str(Path(tmp) / "converted")
        converted.save_pretrained(out)
        files = sorted(p.name for p in Path(out).iterdir())
        loaded = mhc_compile.load(out)
        with torch.no_grad():
            reload_rel = _rel(loaded(prompt).logits, converted(prompt).logits)
    print(f"save_pretrained -> {', '.join(files)}; mhc_compile.load -> {type(loaded).__name__}, "
          f"max relative difference {reload_rel:.3g}")
    return {"rel_error": rel, "same_tokens": same_tokens, "losses": losses, "gains": gains, "report": report,
            "cache_equal": bool(torch.equal(cached, uncached)), "loaded_class": type(loaded),
            "converted_class": type(converted), "reload_rel": reload_rel, "files": files}


if __name__ == "__main__":
    main()
