"""Train a small byte-level GPT three ways -- plain residual, HC and mHC -- at the same step budget.

The text is real and offline: the Python standard library's own sources on this machine (or
``--text FILE``). Each run logs train/validation loss and the Amax gain magnitude of the HC/mHC
residual mixing (``mhc_compile.diagnostics``), and the script writes into ``--out``:

    metrics.csv        one row per run and evaluation step (loss, val loss, composite gains)
    layers.csv         final per-site and cumulative composite gains of every run
    summary.json       final numbers and the settings
    loss.png           loss curves;  gain_vs_step.png: composite forward gain over training
    gains_per_layer.png  per-site and cumulative gain by layer at the end
    lr_sweep.csv/.png  with --lr-sweep: final composite gain and val loss against learning rate

Examples::

    python examples/train_gpt.py --quick                     # CPU, about a minute
    python examples/train_gpt.py --device cuda               # GPU, bf16 autocast
    python examples/train_gpt.py --quick --high-lr            # lr 3e-2: HC's gain grows to ~100s, mHC's stays ~1
    python examples/train_gpt.py --quick --lr-sweep 3e-3,1e-2,3e-2
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tinygpt import GPT, atomic_write_text, set_mode, get_batch, load_corpus, make_variant, param_groups, split  # noqa: E402

from mhc_compile import diagnostics  # noqa: E402

VARIANTS = ("plain", "hc", "mhc")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model and few steps: finishes on CPU in about a minute")
    ap.add_argument("--out", default="runs/train_gpt", help="output directory")
    ap.add_argument("--text", default=None, help="train on this text file instead of the stdlib sources")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--variants", default="plain,hc,mhc", help="comma list of plain, hc, mhc")
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--builder", default="auto", choices=("auto", "convert", "hand"),
                    help="how HC/mHC models are built: mhc_compile.convert, the hand-written rewrite, or auto")
    ap.add_argument("--kernels", default="auto", choices=("auto", "triton", "reference"))
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--lr-sweep", default=None, help="comma list of learning rates; runs every variant at each")
    ap.add_argument("--high-lr", action="store_true",
                    help="shortcut for one run of every variant at a high learning rate (3e-2), where HC's gains grow")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--dim", type=int, default=None)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--heads", type=int, default=None)
    ap.add_argument("--eval-every", type=int, default=None)
    ap.add_argument("--corpus-bytes", type=int, default=None)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--clip", type=float, default=1.0, help="gradient norm clip (0: off)")
    ap.add_argument("--compile", action="store_true", help="torch.compile each model (inductor)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        defaults = dict(steps=120, lr=3e-3, batch=16, seq=32, dim=32, layers=2, heads=2, eval_every=20, corpus_bytes=400_000)
    else:
        defaults = dict(steps=2000, lr=1e-3, batch=32, seq=256, dim=256, layers=6, heads=8, eval_every=100, corpus_bytes=20_000_000)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.high_lr and args.lr_sweep is None:
        args.lr_sweep = "3e-2"
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in args.variants:
        if v not in VARIANTS:
            ap.error(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    return args


def lr_at(step: int, total: int, peak: float) -> float:
    warm = max(1, total // 10)
    if step < warm:
        return peak * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


@torch.no_grad()
def evaluate(model, val, args, gen_seed=1234, batches=4):
    gen = torch.Generator().manual_seed(gen_seed)
    was = model.training
    set_mode(model, False)
    total = 0.0
    for _ in range(batches):
        x, y = get_batch(val, args.batch, args.seq, gen, args.device)
        with autocast(args):
            total += float(F.cross_entropy(model(x).float().flatten(0, 1), y.flatten()))
    set_mode(model, was)
    return total / batches


def autocast(args):
    if str(args.device).startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def gains(model, probe, args):
    with autocast(args):
        return diagnostics.amax_gains(model, probe)


def train_one(variant: str, lr: float, train, val, args, log=print) -> dict:
    torch.manual_seed(args.seed)
    gpt = GPT(c=args.dim, layers=args.layers, heads=args.heads, seq=args.seq)
    probe = get_batch(val, 4, args.seq, torch.Generator().manual_seed(99))[0]
    model = make_variant(gpt, variant, args.streams, probe, builder=args.builder, kernels=args.kernels)
    model = model.to(args.device)
    probe = probe.to(args.device)
    fwd_model = torch.compile(model) if args.compile else model
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(args.seed + 1)
    hist = []
    t0 = time.time()
    ema = None
    for step in range(args.steps + 1):
        if step % args.eval_every == 0 or step == args.steps:
            row = {"variant": variant, "lr": lr, "step": step, "train_loss": ema, "val_loss": evaluate(fwd_model, val, args)}
            if variant != "plain":
                rep = gains(model, probe, args)
                row.update(fwd_gain=rep.max_forward, bwd_gain=rep.max_backward,
                           site_fwd_max=rep.max_site_forward, site_bwd_max=rep.max_site_backward)
                row["_report"] = rep
            else:
                row.update(fwd_gain=float("nan"), bwd_gain=float("nan"), site_fwd_max=float("nan"), site_bwd_max=float("nan"))
            hist.append(row)
            log(f"[{variant:5s} lr={lr:g}] step {step:5d}  train {ema if ema is not None else float('nan'):.4f}"
                f"  val {row['val_loss']:.4f}  fwd gain {row['fwd_gain']:.4g}  bwd gain {row['bwd_gain']:.4g}"
                f"  ({time.time() - t0:.1f}s)")
        if step == args.steps:
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, lr)
        x, y = get_batch(train, args.batch, args.seq, gen, args.device)
        with autocast(args):
            loss = F.cross_entropy(fwd_model(x).float().flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        lv = loss.detach().item()
        if not math.isfinite(lv):
            log(f"[{variant} lr={lr:g}] diverged at step {step} (loss {lv})")
            hist.append({"variant": variant, "lr": lr, "step": step, "train_loss": lv, "val_loss": float("nan"),
                         "fwd_gain": float("nan"), "bwd_gain": float("nan"), "site_fwd_max": float("nan"), "site_bwd_max": float("nan")})
            break
        ema = lv if ema is None else 0.9 * ema + 0.1 * lv
        if step == 0:
            hist[0]["first_loss"] = lv
    final = hist[-1]
    return {
        "variant": variant, "lr": lr, "history": hist, "seconds": time.time() - t0,
        "first_loss": hist[0].get("first_loss"), "initial_val_loss": hist[0]["val_loss"],
        "final_val_loss": final["val_loss"], "final_train_loss": final["train_loss"],
        "final_fwd_gain": final["fwd_gain"], "final_bwd_gain": final["bwd_gain"],
        "report": final.get("_report"), "params": sum(p.numel() for p in model.parameters()),
    }


# ----------------------------------------------------------------------------- outputs
METRIC_FIELDS = ["variant", "lr", "step", "train_loss", "val_loss", "fwd_gain", "bwd_gain", "site_fwd_max", "site_bwd_max"]


def write_csv(path: Path, fields, rows) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})
    atomic_write_text(path, buf.getvalue())


def save_fig(fig, path: Path) -> None:
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    os.replace(tmp, path)


def write_outputs(runs: list[dict], args, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    write_csv(out / "metrics.csv", METRIC_FIELDS, [r for run in runs for r in run["history"]])
    layer_rows = []
    for run in runs:
        rep = run["report"]
        if rep is None:
            continue
        for ch in rep.chains:
            for k, i in enumerate(ch.sites):
                s = rep.sites[i]
                layer_rows.append({"variant": run["variant"], "lr": run["lr"], "chain": ch.index, "site": i, "name": s.name,
                                   "site_fwd": s.forward, "site_bwd": s.backward,
                                   "cum_fwd": ch.cumulative_forward[k], "cum_bwd": ch.cumulative_backward[k],
                                   "max_h_pre": s.pre_max, "h_post_mean": s.post_mean,
                                   "stream_divergence": s.stream_divergence,
                                   "stream_rms": None if s.stream_rms is None else " ".join(f"{v:.4g}" for v in s.stream_rms)})
    write_csv(out / "layers.csv", ["variant", "lr", "chain", "site", "name", "site_fwd", "site_bwd", "cum_fwd", "cum_bwd",
                                   "max_h_pre", "h_post_mean", "stream_divergence", "stream_rms"], layer_rows)
    written += [out / "metrics.csv", out / "layers.csv"]
    summary = {
        "settings": {k: v for k, v in vars(args).items()},
        "torch": torch.__version__,
        "runs": [{k: v for k, v in run.items() if k not in ("history", "report")} for run in runs],
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=str))
    written.append(out / "summary.json")
    if args.no_plots:
        return written
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
        return written
    colors = {"plain": "tab:gray", "hc": "tab:red", "mhc": "tab:blue"}
    lrs = sorted({run["lr"] for run in runs})
    styles = ["-", "--", ":", "-."]

    def label(run):
        return run["variant"] if len(lrs) == 1 else f"{run['variant']} lr={run['lr']:g}"

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        h = [r for r in run["history"] if math.isfinite(r["val_loss"])]
        ax.plot([r["step"] for r in h], [r["val_loss"] for r in h], styles[lrs.index(run["lr"]) % 4],
                color=colors[run["variant"]], label=label(run), lw=3.5 if run["variant"] == "plain" else 1.5,
                alpha=0.6 if run["variant"] == "plain" else 1.0)
    ax.set_xlabel("step"); ax.set_ylabel("validation loss (nats/byte)"); ax.set_title("Byte-level GPT on stdlib text")
    ax.legend(); ax.grid(alpha=0.3)
    save_fig(fig, out / "loss.png"); plt.close(fig); written.append(out / "loss.png")

    gain_runs = [run for run in runs if run["variant"] != "plain"]
    if gain_runs:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for run in gain_runs:
            h = [r for r in run["history"] if math.isfinite(r["fwd_gain"])]
            ax.plot([r["step"] for r in h], [r["fwd_gain"] for r in h], styles[lrs.index(run["lr"]) % 4],
                    color=colors[run["variant"]], label=label(run))
        ax.set_yscale("log"); ax.set_xlabel("step"); ax.set_ylabel("composite forward Amax gain")
        ax.set_title("Gain of prod_l H_res over all layers"); ax.legend(); ax.grid(alpha=0.3, which="both")
        save_fig(fig, out / "gain_vs_step.png"); plt.close(fig); written.append(out / "gain_vs_step.png")

        fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
        for run in gain_runs:
            rep = run["report"]
            if rep is None:
                continue
            ch = rep.chains[0]
            xs = list(range(len(ch.sites)))
            st = styles[lrs.index(run["lr"]) % 4]
            axes[0].plot(xs, [rep.sites[i].forward for i in ch.sites], st, marker="o", color=colors[run["variant"]], label=label(run) + " fwd")
            axes[0].plot(xs, [rep.sites[i].backward for i in ch.sites], st, marker="x", color=colors[run["variant"]], alpha=0.5, label=label(run) + " bwd")
            axes[1].plot(xs, ch.cumulative_forward, st, marker="o", color=colors[run["variant"]], label=label(run) + " fwd")
            axes[1].plot(xs, ch.cumulative_backward, st, marker="x", color=colors[run["variant"]], alpha=0.5, label=label(run) + " bwd")
        axes[0].set_title("single site H_res^(l)"); axes[1].set_title("composite H_res^(l)...H_res^(1)")
        for a in axes:
            a.set_xlabel("residual site l"); a.set_ylabel("Amax gain"); a.set_yscale("log"); a.grid(alpha=0.3, which="both")
            a.xaxis.set_major_locator(MaxNLocator(integer=True))
            a.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.0)))
            a.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}")); a.yaxis.set_minor_formatter(NullFormatter())
        if axes[1].lines:
            axes[1].legend(fontsize=7)
        save_fig(fig, out / "gains_per_layer.png"); plt.close(fig); written.append(out / "gains_per_layer.png")

    if len(lrs) > 1:
        rows = [{"variant": r["variant"], "lr": r["lr"], "final_val_loss": r["final_val_loss"],
                 "final_fwd_gain": r["final_fwd_gain"], "final_bwd_gain": r["final_bwd_gain"]} for r in runs]
        write_csv(out / "lr_sweep.csv", list(rows[0]), rows)
        written.append(out / "lr_sweep.csv")
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
        for v in sorted({r["variant"] for r in runs}):
            rs = sorted((r for r in runs if r["variant"] == v), key=lambda r: r["lr"])
            axes[0].plot([r["lr"] for r in rs], [r["final_val_loss"] for r in rs], marker="o", color=colors[v], label=v)
            if v != "plain":
                axes[1].plot([r["lr"] for r in rs], [r["final_fwd_gain"] for r in rs], marker="o", color=colors[v], label=v + " fwd")
                axes[1].plot([r["lr"] for r in rs], [r["final_bwd_gain"] for r in rs], marker="x", ls="--", color=colors[v], label=v + " bwd")
        axes[0].set_ylabel("final validation loss"); axes[1].set_ylabel("final composite Amax gain"); axes[1].set_yscale("log")
        for a in axes:
            a.set_xscale("log"); a.set_xlabel("peak learning rate"); a.legend(); a.grid(alpha=0.3, which="both")
            a.set_xticks(lrs); a.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            a.xaxis.set_minor_formatter(NullFormatter())
        axes[1].yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        save_fig(fig, out / "lr_sweep.png"); plt.close(fig); written.append(out / "lr_sweep.png")
    return written


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))
    data = load_corpus(args.corpus_bytes, args.text)
    train, val = split(data)
    print(f"corpus: {len(data):,} bytes ({'stdlib sources' if args.text is None else args.text}); "
          f"model C={args.dim} L={args.layers} heads={args.heads} T={args.seq} batch={args.batch} steps={args.steps} device={args.device}")
    lrs = [float(v) for v in args.lr_sweep.split(",")] if args.lr_sweep else [args.lr]
    runs = []
    for lr in lrs:
        for v in args.variants:
            runs.append(train_one(v, lr, train, val, args))
    written = write_outputs(runs, args, Path(args.out))
    print("\nfinal:")
    for r in runs:
        print(f"  {r['variant']:5s} lr={r['lr']:<8g} params={r['params']:,}  val loss {r['initial_val_loss']:.3f} -> {r['final_val_loss']:.3f}"
              f"  composite gain fwd {r['final_fwd_gain']:.4g} bwd {r['final_bwd_gain']:.4g}  ({r['seconds']:.1f}s)")
    print("wrote " + ", ".join(str(p) for p in written))
    return {"runs": runs, "written": written}


if __name__ == "__main__":
    main()
