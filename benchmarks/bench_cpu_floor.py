"""How close a converted model's eager eval forward is to what its mHC math and bytes must cost on this
CPU (issue #25): the floor under the GPT and MiniLM targets of ``bench_cpu.py``.

The blocks form runs, per block, passes over the n-wide streams X (n = 4) that attention and the MLP,
which write several MiB of activations between them, leave out of cache:

* GPT (C = 256, 6 layers, T = 256, batch 2: 512 tokens, 2 MiB streams): a site start (coeffs + pre:
  reads X), a boundary (post_res, then the next site's coeffs + pre: reads X, writes X1) and a site end
  (post_res: reads X1, writes X2): one read and two read+write passes;
* MiniLM (C = 384, 6 layers, batch 20 x 18: 360 tokens, 2.1 MiB streams, post-LN): per site a start
  (reads X) and an end (post_res + LayerNorm: reads X, writes X'): two reads and two read+write passes.

A lower bound on the extra time over the original, per forward, from parts measured here at the
model's site shape:

* ``proj``: the phi projection vec(X).phi (T x nC x 24 FMAs) per site, warm (``proj_mm``: the core's
  FMA rate), times 12 sites;
* ``gates``: ``coeffs_fwd`` (RMS, sigmoids, 20 Sinkhorn steps) per site on a warm projection, times 12;
* ``bytes``: per block the cold reads of X and cold copies of X (read X, write X into a reused buffer,
  as the output cache does), each after 16 MiB of other writes (``EVICT_MB``), times 6 blocks.
  The kernels do these passes and more work besides (the mixes, h_out, MiniLM's n LayerNorms per
  site end, the expansion and final mean), and Python runs around them, so the floor is below what
  any implementation of this design can reach.

Printed: the measured ratio mhc/original (interleaved rounds) and the floor ratio (original + floor) /
original, with its parts. CPU time per call (``time.process_time``), 1 thread by default, medians.

Usage:
  python benchmarks/bench_cpu_floor.py [--models gpt,minilm] [--reps 15] [--threads 1]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

EVICT_MB = 16
SITES, BLOCKS = 12, 6
SHAPES = {  # model: (tokens T, channels C, cold reads and read+write passes of X per block)
    "gpt": (512, 256, 1, 2),
    "minilm": (360, 384, 2, 2),
}


def _median_us(fn, reps: int, evict: torch.Tensor | None = None) -> float:
    times = []
    for r in range(reps):
        if evict is not None:
            evict.fill_(float(r))
        t0 = time.process_time()
        fn(r)
        times.append(time.process_time() - t0)
    return statistics.median(times) * 1e6


def parts(model: str, reps: int, quick: bool = False) -> dict:
    """The floor's parts in microseconds per call at ``model``'s site shape (module docstring)."""
    from mhc_compile import kernels_cpu

    if not kernels_cpu.available():
        raise SystemExit(f"CPU kernels not built: {kernels_cpu.build_error()}")
    k = torch.ops.mhc_cpu
    n = 4
    T, C = (32, 32) if quick else SHAPES[model][:2]
    K = 2 * n + n * n
    g = torch.Generator().manual_seed(0)
    sets = [torch.randn(T, n, C, generator=g) for _ in range(4)]
    out = torch.empty(T, n, C)
    phi = torch.randn(n * C, K, generator=g) * 0.02
    small = (torch.full((3,), 0.1), torch.zeros(n), torch.zeros(n), torch.zeros(n, n))
    flat = sets[0].reshape(T, n * C)
    proj = k.proj_mm(flat, phi)
    evict = torch.empty((EVICT_MB << 20) // 4)
    return {
        "proj": _median_us(lambda r: k.proj_mm(flat, phi), reps),
        "gates": _median_us(lambda r: k.coeffs_fwd(flat, proj, *small, 1e-6, n, 20, False), reps),
        "read": _median_us(lambda r: sets[r % 4].sum(), reps, evict),
        "copy": _median_us(lambda r: out.copy_(sets[r % 4]), reps, evict),
    }


def model_times(model_name: str, reps: int, quick: bool = False) -> tuple[float, float]:
    """(original, mhc) ms of the eager eval forward, medians of interleaved rounds."""
    import bench_cpu

    model, args, kwargs, _ = bench_cpu.MODELS[model_name](quick)
    variants = bench_cpu.make_variants(model, args, kwargs, names=("original", "mhc"))
    steps = {name: bench_cpu.make_step(m, args, kwargs, "eval", False) for name, m in variants.items()}
    times = bench_cpu.measure(steps, reps, warmup=2)
    return times["original"] * 1e3, times["mhc"] * 1e3


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="gpt,minilm")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="tiny shapes, a smoke test")
    a = p.parse_args(argv)
    models = [m for m in a.models.split(",") if m]
    unknown = [m for m in models if m not in SHAPES]
    if unknown or not models:
        raise SystemExit(f"--models: expected names from {sorted(SHAPES)}, got {a.models!r}")
    if a.reps < 1 or a.threads < 1:
        raise SystemExit("--reps and --threads must be >= 1")
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {a.threads} thread(s), CPU time, medians", flush=True)
    rows = []
    for name in models:
        reads, copies = SHAPES[name][2:]
        part = parts(name, max(a.reps, 5) * 4, a.quick)
        orig_ms, mhc_ms = model_times(name, a.reps, a.quick)
        floor = {"proj": SITES * part["proj"], "gates": SITES * part["gates"],
                 "bytes": BLOCKS * (reads * part["read"] + copies * part["copy"])}
        total = sum(floor.values()) / 1e3
        print(f"## {name}\n"
              "per call (us): " + ", ".join(f"{k} {v:.1f}" for k, v in part.items()) + "\n"
              "floor per forward (ms): " + ", ".join(f"{k} {v / 1e3:.2f}" for k, v in floor.items())
              + f"; total {total:.2f}\n"
              f"original {orig_ms:.1f} ms; measured mhc/original {mhc_ms / orig_ms:.3f}x; "
              f"floor {(orig_ms + total) / orig_ms:.3f}x", flush=True)
        rows.append({"model": name, "parts_us": part, "floor_us": floor, "original_ms": orig_ms, "mhc_ms": mhc_ms,
                     "passes": (reads, copies), "floor_ratio": (orig_ms + total) / orig_ms})
    return rows


if __name__ == "__main__":
    main()
