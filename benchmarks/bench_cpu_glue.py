"""Python glue per call of the CPU eager path (issue #25, "Fourth pass" in docs/benchmarks.md).

At tiny shapes (T = 2 tokens as (2, 1) token dims, n = 4, C = 8: the kernels take about 2-8 us) the
time of a ``mhc_compile.ops`` call minus its raw ``torch.ops.mhc_cpu`` kernels is the Python, checks,
dispatch and reshapes around them, i.e. what every site pays on top of its kernels whatever the model
size. Printed per call (CPU time, 1 thread, min over 5 blocks of ``--reps`` calls): each op without
grad, a site (coeffs + pre + post_res) forward with grad and forward + backward, and the per-call
guard of a stream-carrying block (``parallel.guard.check_block``) on a converted TinyGPT layer.
Run it on two checkouts to compare (the before/after of a change to the glue).

Usage:
  python benchmarks/bench_cpu_glue.py [--reps 2000]
"""
from __future__ import annotations

import argparse
import time

import torch


def _best_us(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(5):
        t0 = time.process_time()
        for _ in range(reps):
            fn()
        best = min(best, (time.process_time() - t0) / reps)
    return best * 1e6


def rows(reps: int) -> list[tuple[str, float]]:
    from mhc_compile import MHCConfig, convert, ops
    from mhc_compile.kernels_cpu import available, build_error
    from mhc_compile.models import TinyGPT
    from mhc_compile.parallel.guard import check_block

    if not available():
        raise SystemExit(f"CPU kernels not built: {build_error()}")
    n, c, lead = 4, 8, (2, 1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*lead, n, c, generator=g)
    h_out = torch.randn(*lead, c, generator=g)
    params = [torch.randn(*s, generator=g).requires_grad_() for s in ((n * c, 2 * n + n * n), (3,), (n,), (n,), (n, n))]
    k = torch.ops.mhc_cpu
    with torch.no_grad():
        hp, ho, hr = ops.coeffs(x, *params)
        flat, x3 = x.reshape(-1, n * c), x.reshape(-1, n, c)
        hp3, ho3, hr3, h2 = hp.reshape(-1, n), ho.reshape(-1, n), hr.reshape(-1, n, n), h_out.reshape(-1, c)
        out = [
            ("kernels: proj_mm + coeffs_fwd", _best_us(lambda: k.coeffs_fwd(flat, k.proj_mm(flat, params[0]), *params[1:], 1e-6, n, 20, False), reps)),
            ("ops.coeffs (no grad)", _best_us(lambda: ops.coeffs(x, *params), reps)),
            ("kernel: pre_fwd", _best_us(lambda: k.pre_fwd(x3, hp3), reps)),
            ("ops.pre (no grad)", _best_us(lambda: ops.pre(x, hp), reps)),
            ("kernel: post_res_fwd", _best_us(lambda: k.post_res_fwd(x3, h2, ho3, hr3), reps)),
            ("ops.post_res (no grad)", _best_us(lambda: ops.post_res(x, h_out, ho, hr), reps)),
            ("ops.boundary (no grad)", _best_us(lambda: ops.boundary(x, h_out, ho, hr, *params), reps)),
        ]
    xg, hg = x.clone().requires_grad_(), h_out.clone().requires_grad_()

    def site():
        hp, ho, hr = ops.coeffs(xg, *params)
        return ops.post_res(xg, ops.pre(xg, hp) + hg, ho, hr)

    def site_fb():
        y = site()
        y.backward(torch.ones_like(y))

    out += [("site forward with grad (+1 add)", _best_us(site, reps // 4)),
            ("site forward + backward (+1 add)", _best_us(site_fb, reps // 4))]
    torch.manual_seed(0)
    ids = torch.randint(0, 64, (2, 16))
    model = convert(TinyGPT(vocab=64, dim=32, layers=2, heads=2, max_len=16), MHCConfig(streams=4), (ids,))
    block = next(m for m in model.modules() if "_mhc_carry" in m.__dict__)
    out.append(("check_block (TinyGPT layer, per block call)", _best_us(lambda: check_block(block), reps)))
    return out


def main(argv=None) -> list[tuple[str, float]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=2000)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = rows(args.reps)
    for name, us in out:
        print(f"{name:48s} {us:8.1f} us")
    return out


if __name__ == "__main__":
    main()
