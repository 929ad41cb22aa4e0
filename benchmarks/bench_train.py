"""Training benchmark for mhc-compile: peak memory, step time, first compile, saved activations.

Owns the training-level comparison of DESIGN.md section 3 ("Numbers to beat"). For each GPT
shape it trains a few AdamW steps of, side by side:

  plain        the plain pre-norm GPT (``mhc_compile.models.TinyGPT``: x = x + attn(ln1(x));
               x = x + mlp(ln2(x))), compiled by inductor;
  hand_mhc     the anchor: the same GPT with n-stream mHC written by hand in plain torch from
               ``mhc_compile.reference`` (coeffs / pre_mix / post_res_mix / expand / collapse),
               compiled by inductor; autograd and the partitioner save whatever they like;
  mhc          the plain GPT compiled with ``backend="mhc"`` (streams n), recompute on;
  mhc_norecomp the same with ``recompute=False``;
  mhc_blocks   the per-block scale recipe: ``mhc_compile.convert`` (stream-carrying blocks), then
               on every block ``checkpoint_wrapper``, ``block.compile(backend=compiler)`` and
               FSDP2 ``fully_shard`` (one rank), then the root (torchtitan's order).

and reports per variant:

  first_step_s   wall time of the first training step, compile included (inductor/AOT caches
                 are disabled in the worker, so this is a cold compile);
  step_ms        median time of the following steps (CUDA: synchronised wall clock);
  peak_mem_gb    torch.cuda.max_memory_allocated over the measured steps (CUDA only);
  saved_mb       bytes of activations saved for backward by one forward, measured with
                 ``torch.autograd.graph.saved_tensors_hooks`` (parameters excluded, each
                 storage counted once; works on CPU too);
  saved_streams  how many of the saved tensors are n-stream X (shape (..., n, C)), with their MB
                 (saved_stream_mb), and the MB of the other C-wide and remaining saved tensors;
  recompute      the block plan of the "mhc" backend (chain length L, L_r, X kept) when on.

Shapes (GPU defaults): C=1024 L=12 with 8 x 1024 tokens, and C=2048 L=24 with 4 x 2048 tokens,
vocabulary 50304, bf16 parameters, AdamW. Each variant runs in a fresh subprocess (clean peak
memory, cold compile) unless ``--inprocess``.

Usage:
  python benchmarks/bench_train.py --json train.json --markdown train.md          # GPU, both shapes
  python benchmarks/bench_train.py --shapes 1024x12x8x1024 --variants plain,mhc
  python benchmarks/bench_train.py --quick            # CPU: C=256, 8 layers, 512 tokens, fp32, aot_eager:
                                                      # saved bytes and saved X per variant (~2 min)
  python benchmarks/bench_train.py --quick --variants plain,mhc --recompute-block 3   # another L_r
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Optional

VARIANTS = ("plain", "hand_mhc", "mhc", "mhc_norecomp", "mhc_blocks")
GPU_SHAPES = "1024x12x8x1024,2048x24x4x2048"   # C x layers x batch x seq
QUICK_SHAPES = "256x8x1x512"                   # C=256, 8 layers (16 sites), 512 tokens: ~1-2 min on CPU


# ----------------------------------------------------------------------------- models
def _build_model_classes():
    from torch import nn

    from mhc_compile import reference as R
    from mhc_compile.models import TinyGPT

    class GPT(TinyGPT):
        """The plain model: the package's pre-norm GPT, one head per 64 channels, tanh GELU."""

        def __init__(self, c, layers, vocab, max_t):
            super().__init__(vocab, dim=c, layers=layers, heads=max(1, c // 64), max_len=max_t, gelu="tanh")

    class HandSite(nn.Module):
        """One mHC site's parameters (the section 1 math, preserve init)."""

        def __init__(self, n, c, index):
            super().__init__()
            for k, v in R.init_site_params(n, c, index).items():
                self.register_parameter(k, nn.Parameter(v))

        def forward(self, X, f):
            hp, ho, hr = R.coeffs(X, self.phi, self.alpha, self.b_pre, self.b_post, self.b_res)
            h_in = R.pre_mix(X, hp)
            return R.post_res_mix(X, f(h_in), ho, hr)

    class HandMHCGPT(GPT):
        """The anchor: mHC written by hand in plain torch (reference functions), no custom ops."""

        def __init__(self, c, layers, vocab, max_t, n):
            super().__init__(c, layers, vocab, max_t)
            self.n = n
            self.sites = nn.ModuleList(HandSite(n, c, i) for i in range(2 * layers))

        def forward(self, idx):
            X = R.expand(self.embed(idx), self.n)
            for i, blk in enumerate(self.blocks):
                X = self.sites[2 * i](X, lambda h: blk.attn(blk.ln1(h)))
                X = self.sites[2 * i + 1](X, lambda h: blk.mlp(blk.ln2(h)))
            return self.head(self.ln_f(R.collapse(X)))

    return GPT, HandMHCGPT


# ----------------------------------------------------------------------------- one variant
def saved_activation_bytes(fn) -> int:
    """Bytes saved for backward while ``fn()`` runs (non-parameters, each storage once)."""
    return saved_activations(fn)["bytes"]


def saved_activations(fn, n: int = 0, c: int = 0) -> dict:
    """What ``fn()`` saves for backward (non-parameters, each storage once), by shape: ``bytes``
    in all; ``streams`` / ``stream_bytes``: tensors shaped (..., n, c), the n-stream X;
    ``cwide_bytes``: other tensors whose last dimension is c; ``other_bytes``: the rest.
    Machine-independent (saved_tensors_hooks, not RSS)."""
    import torch

    seen = set()
    out = dict(bytes=0, streams=0, stream_bytes=0, cwide_bytes=0, other_bytes=0)

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            key = (t.device, t.untyped_storage().data_ptr())
            if key not in seen:
                seen.add(key)
                nbytes = t.untyped_storage().nbytes()
                out["bytes"] += nbytes
                if n and t.dim() >= 2 and tuple(t.shape[-2:]) == (n, c):
                    out["streams"] += 1
                    out["stream_bytes"] += nbytes
                else:
                    out["cwide_bytes" if c and t.dim() and t.shape[-1] == c else "other_bytes"] += nbytes
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        res = fn()
    del res
    return out


def run_variant(variant: str, c: int, layers: int, batch: int, seq: int, *, streams: int = 4,
                vocab: int = 50304, dtype: str = "bf16", steps: int = 10, warmup: int = 3,
                compiler: str = "inductor", device: Optional[str] = None, seed: int = 0,
                recompute_block: Optional[int] = None) -> dict:
    """Build, compile and train one variant; returns its row (error rows carry ``error``)."""
    import torch
    import torch.nn.functional as F

    import mhc_compile
    from mhc_compile.passes import recompute as RC

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    tdtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    row = dict(variant=variant, C=c, layers=layers, sites=2 * layers, batch=batch, seq=seq, tokens=batch * seq,
               streams=streams if variant != "plain" else 1, dtype=dtype, compiler=compiler, device=device,
               first_step_s=None, step_ms=None, peak_mem_gb=None, saved_mb=None, recompute=None, error=None)
    try:
        torch.manual_seed(seed)
        GPT, HandMHCGPT = _build_model_classes()
        if variant == "hand_mhc":
            model = HandMHCGPT(c, layers, vocab, seq, streams)
        else:
            model = GPT(c, layers, vocab, seq)
        model = model.to(device=device, dtype=tdtype).train()
        idx = torch.randint(0, vocab, (batch, seq), device=device)

        if variant in ("plain", "hand_mhc"):
            compiled = torch.compile(model, backend=compiler)
        elif variant == "mhc_blocks":
            compiled = _per_block_recipe(model, idx, streams, compiler, device)
        else:
            options = {"streams": streams, "recompute": variant == "mhc",
                       "inner": compiler if compiler in ("inductor", "aot_eager", "eager") else "inductor"}
            if variant == "mhc" and recompute_block is not None:
                options["recompute_block"] = recompute_block
            compiled = torch.compile(model, backend="mhc", options=options)

        def loss_fn():
            logits = compiled(idx)
            return F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), idx[:, 1:].reshape(-1))

        def sync():
            if cuda:
                torch.cuda.synchronize()

        n_records = len(RC.last_records())
        sync()
        t0 = time.perf_counter()
        if variant in ("mhc", "mhc_norecomp"):
            mhc_compile.materialize(compiled, idx)  # creates the mHC parameters before the optimizer
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            opt.zero_grad(set_to_none=True)
            loss = loss_fn()
            loss.backward()
            opt.step()
            return loss

        loss = step()
        sync()
        row["first_step_s"] = time.perf_counter() - t0
        row["first_loss"] = float(loss.detach())
        for _ in range(max(0, warmup - 1)):
            step()
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(steps):
            sync()
            t = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - t)
        row["step_ms"] = statistics.median(times) * 1e3
        if cuda:
            row["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
        opt.zero_grad(set_to_none=True)
        saved = saved_activations(loss_fn, streams if variant != "plain" else 0, c)
        row["saved_mb"] = saved["bytes"] / 1e6
        row["saved_streams"] = saved["streams"]
        for key in ("stream", "cwide", "other"):
            row[f"saved_{key}_mb"] = saved[f"{key}_bytes"] / 1e6
        plans = [p for r in RC.last_records()[n_records:] for p in r.chains]
        if variant == "mhc" and plans:
            row["recompute"] = ", ".join(f"L={p.length} L_r={p.block} keeps {p.kept_streams} X" for p in plans)
    except Exception as e:  # report and go on with the other variants
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        if os.environ.get("MHC_BENCH_DEBUG"):
            traceback.print_exc()
    return row


# ----------------------------------------------------------------------------- driver
def _per_block_recipe(model, idx, streams: int, compiler: str, device: str):
    """convert, then checkpoint + compile + fully_shard every block, then the root (1 rank)."""
    import tempfile

    import torch.distributed as dist
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import mhc_compile

    model = mhc_compile.convert(model, mhc_compile.MHCConfig(streams=streams), (idx,), inplace=True)
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend, init_method=f"file://{tempfile.mktemp()}", rank=0, world_size=1)
        _OWN_GROUP.append(True)  # main() destroys it: an importing caller's process stays clean
    mesh = init_device_mesh("cuda" if device.startswith("cuda") else "cpu", (1,))
    for i, block in enumerate(model.blocks):
        block = checkpoint_wrapper(block)
        block.compile(backend=compiler)
        fully_shard(block, mesh=mesh)
        model.blocks[i] = block
    fully_shard(model, mesh=mesh)
    return model


def _parse_shapes(text: str) -> list[tuple[int, int, int, int]]:
    shapes = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 4:
            raise argparse.ArgumentTypeError(f"shape {item!r}: expected CxLAYERSxBATCHxSEQ, e.g. 1024x12x8x1024")
        shapes.append(tuple(int(p) for p in parts))
    return shapes


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"CPU run of the saved bytes: {QUICK_SHAPES}, fp32, aot_eager, 1 step, in-process")
    p.add_argument("--shapes", default=None, help=f"CxLAYERSxBATCHxSEQ list (default {GPU_SHAPES}; quick {QUICK_SHAPES})")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--vocab", type=int, default=None, help="default 50304 (quick: 256)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None, help="default bf16 (quick: fp32)")
    p.add_argument("--steps", type=int, default=None, help="measured steps (default 10; quick 1)")
    p.add_argument("--warmup", type=int, default=None, help="steps before measuring, first included (default 3; quick 1)")
    p.add_argument("--compiler", default=None, help="inductor (default) or aot_eager (quick: aot_eager; same partitioner)")
    p.add_argument("--recompute-block", type=int, default=None, help="L_r for the mhc variant (default: the paper's L_r*)")
    p.add_argument("--inprocess", action="store_true", help="run every variant in this process (quick: default)")
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    q = args.quick
    args.shapes = _parse_shapes(args.shapes or (QUICK_SHAPES if q else GPU_SHAPES))
    args.vocab = args.vocab or (256 if q else 50304)
    args.dtype = args.dtype or ("fp32" if q else "bf16")
    args.compiler = args.compiler or ("aot_eager" if q else "inductor")
    args.steps = args.steps if args.steps is not None else (1 if q else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if q else 3)
    args.inprocess = args.inprocess or q
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        p.error(f"unknown variant(s) {bad}; choose from {','.join(VARIANTS)}")
    args.variants = variants
    return args


def _in_subprocess(kwargs: dict) -> dict:
    env = dict(os.environ, TORCHINDUCTOR_FORCE_DISABLE_CACHES="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(kwargs)],
                         capture_output=True, text=True, env=env)
    for line in reversed(res.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return dict(variant=kwargs["variant"], C=kwargs["c"], layers=kwargs["layers"], error=(
        f"worker exited {res.returncode}: " + (res.stderr.strip().splitlines() or [""])[-1])[:300])


def _pct(a, b):
    return None if a is None or b is None or b == 0 else 100.0 * (a / b - 1.0)


def add_ratios(rows: list[dict]) -> None:
    """vs_plain: +% over the plain model of the same shape for step time, peak memory, saved bytes."""
    for r in rows:
        base = next((b for b in rows if b.get("variant") == "plain" and b.get("C") == r.get("C")
                     and b.get("layers") == r.get("layers") and not b.get("error")), None)
        for key in ("step_ms", "peak_mem_gb", "saved_mb", "first_step_s"):
            r[f"{key}_vs_plain_pct"] = _pct(r.get(key), base.get(key)) if base else None


def to_markdown(rows: list[dict], meta: dict) -> str:
    def fmt(v, spec, unit=""):
        return "-" if v is None else format(v, spec) + unit

    lines = [f"Device: {meta['device']}; torch {meta['torch']}; {meta['date']}; dtype {meta['dtype']}; "
             f"compiler {meta['compiler']}; n = {meta['streams']}", "",
             "| shape (C, layers, tokens) | variant | step ms | vs plain | peak GB | vs plain | saved MB | vs plain "
             "| X saved (MB) | first step s | recompute | error |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        shape = f"{r.get('C')}, {r.get('layers')}, {r.get('batch', '?')}x{r.get('seq', '?')}"
        lines.append(
            f"| {shape} | {r['variant']} | {fmt(r.get('step_ms'), '.1f')} | {fmt(r.get('step_ms_vs_plain_pct'), '+.0f', '%')} "
            f"| {fmt(r.get('peak_mem_gb'), '.2f')} | {fmt(r.get('peak_mem_gb_vs_plain_pct'), '+.0f', '%')} "
            f"| {fmt(r.get('saved_mb'), '.3f')} | {fmt(r.get('saved_mb_vs_plain_pct'), '+.1f', '%')} "
            f"| {r.get('saved_streams', '-')} ({fmt(r.get('saved_stream_mb'), '.2f')}) "
            f"| {fmt(r.get('first_step_s'), '.1f')} | {r.get('recompute') or '-'} | {r.get('error') or ''} |")
    return "\n".join(lines) + "\n"


def _write_atomic(path: str, text: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".bench_train.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_OWN_GROUP: list = []


def main(argv=None) -> list[dict]:
    try:
        return _main(argv)
    finally:
        if _OWN_GROUP:
            import torch.distributed as dist

            dist.destroy_process_group()
            _OWN_GROUP.clear()


def _main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.worker:
        row = run_variant(**json.loads(args.worker))
        print(json.dumps(row))
        return [row]
    import datetime

    import torch

    rows = []
    for c, layers, batch, seq in args.shapes:
        for variant in args.variants:
            kwargs = dict(variant=variant, c=c, layers=layers, batch=batch, seq=seq, streams=args.streams,
                          vocab=args.vocab, dtype=args.dtype, steps=args.steps, warmup=args.warmup,
                          compiler=args.compiler, recompute_block=args.recompute_block)
            if args.inprocess:
                torch._dynamo.reset()
                row = run_variant(**kwargs)
            else:
                row = _in_subprocess(kwargs)
            rows.append(row)
            print(json.dumps(row), flush=True)
    add_ratios(rows)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    meta = dict(device=device, torch=torch.__version__, date=datetime.date.today().isoformat(), dtype=args.dtype,
                compiler=args.compiler, streams=args.streams)
    md = to_markdown(rows, meta)
    print(md)
    if args.json:
        _write_atomic(args.json, json.dumps(dict(meta=meta, rows=rows), indent=2))
    if args.markdown:
        _write_atomic(args.markdown, md)
    return rows


if __name__ == "__main__":
    main()
