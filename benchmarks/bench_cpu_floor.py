"""How close the GPT eval forward's mHC cost is to what its math and bytes must cost on this CPU (issue #25).

The converted GPT of ``bench_cpu.py`` (C = 256, 6 layers, T = 256, batch 2, n = 4: 512 tokens, 2 MiB
stream tensors) runs per block a site start (coeffs + pre: reads X), a boundary (post_res, then the
next site's coeffs + pre: reads X, writes X1) and a site end (post_res: reads X1, writes X2). Between
them attention and the MLP write several MiB of activations, so each pass finds its streams out of
cache. A lower bound on the extra time over the original, per forward, from parts measured here:

* ``proj``: the phi projection vec(X).phi (512 x 1024 x 24 FMAs) per site, warm (``proj_mm``: the
  core's FMA rate), times 12 sites;
* ``gates``: ``coeffs_fwd`` (RMS, sigmoids, 20 Sinkhorn steps) per site on a warm projection, times 12;
* ``bytes``: per block one cold read of X and two cold copies of X (read 2 MiB, write 2 MiB into a
  reused buffer, as the output cache does), each after 16 MiB of other writes (``EVICT_MB``), times 6.
  The kernels do these passes and more work besides (the mixes, h_out, the expansion and final mean
  are left out), so this underestimates what they can cost.

Printed: the measured ratio mhc/original (interleaved rounds) and the floor ratio (original + floor) /
original, with its parts. CPU time per call (``time.process_time``), 1 thread by default, medians.

Usage:
  python benchmarks/bench_cpu_floor.py [--reps 15] [--threads 1]
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


def _median_us(fn, reps: int, evict: torch.Tensor | None = None) -> float:
    times = []
    for r in range(reps):
        if evict is not None:
            evict.fill_(float(r))
        t0 = time.process_time()
        fn(r)
        times.append(time.process_time() - t0)
    return statistics.median(times) * 1e6


def parts(reps: int, quick: bool = False) -> dict:
    """The floor's parts in microseconds per call (module docstring)."""
    from mhc_compile import kernels_cpu

    if not kernels_cpu.available():
        raise SystemExit(f"CPU kernels not built: {kernels_cpu.build_error()}")
    k = torch.ops.mhc_cpu
    T, n, C = (32, 4, 32) if quick else (512, 4, 256)
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


def model_times(reps: int, quick: bool = False) -> tuple[float, float]:
    """(original, mhc) ms of the eager eval forward, medians of interleaved rounds."""
    import bench_cpu

    model, args, kwargs, _ = bench_cpu.build_gpt(quick)
    variants = bench_cpu.make_variants(model, args, kwargs, names=("original", "mhc"))
    times = {}
    for name, m in variants.items():
        m.eval()
    for r in range(reps + 2):
        for name, m in variants.items():
            t0 = time.process_time()
            with torch.no_grad():
                m(*args, **kwargs)
            if r >= 2:
                times.setdefault(name, []).append(time.process_time() - t0)
    return statistics.median(times["original"]) * 1e3, statistics.median(times["mhc"]) * 1e3


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="tiny shapes, a smoke test")
    a = p.parse_args(argv)
    if a.reps < 1 or a.threads < 1:
        raise SystemExit("--reps and --threads must be >= 1")
    torch.set_num_threads(a.threads)
    part = parts(max(a.reps, 5) * 4, a.quick)
    orig_ms, mhc_ms = model_times(a.reps, a.quick)
    floor = {"proj": SITES * part["proj"], "gates": SITES * part["gates"],
             "bytes": BLOCKS * (part["read"] + 2 * part["copy"])}
    total = sum(floor.values()) / 1e3
    lines = [
        f"torch {torch.__version__}, {a.threads} thread(s), CPU time, medians",
        "per call (us): " + ", ".join(f"{k} {v:.1f}" for k, v in part.items()),
        "floor per forward (ms): " + ", ".join(f"{k} {v / 1e3:.2f}" for k, v in floor.items()) + f"; total {total:.2f}",
        f"original {orig_ms:.1f} ms; measured mhc/original {mhc_ms / orig_ms:.3f}x; floor {(orig_ms + total) / orig_ms:.3f}x",
    ]
    print("\n".join(lines))
    return {"parts_us": part, "floor_us": floor, "original_ms": orig_ms, "mhc_ms": mhc_ms,
            "floor_ratio": (orig_ms + total) / orig_ms}


if __name__ == "__main__":
    main()
