"""Bytes and launches one mHC site really moves, counted through the Triton interpreter (no GPU).

Owns the per-path byte table of docs/benchmarks.md ("Bytes per site"). For each path and n it
runs the Triton kernels (``kernels="triton"``, interpreted) forward, then backward through
autograd, under :class:`bytecount.ByteCounter`, which counts every masked ``tl.load`` /
``tl.store`` and every torch op between the kernels (the autograd engine's adds included). It
reports, per site, the stream-sized bytes per token in units of C * e (e = element size of the
streams) against the byte floor, forward 2n+2, backward 3n+3, together (5n+5) (DESIGN.md), the
coefficient-sized bytes per token, and the launches (Triton kernels + torch ops).

Paths (branch f = identity, so only the mHC traffic is counted; T tokens, n streams, C channels):
  site      coeffs + pre + post_res as three ops through autograd (what a converted model's
            block with one residual site runs: ``passes/rewrite.py`` emits exactly these);
  boundary  one ``mhc::boundary`` (post_res of site l + coeffs and pre of site l+1), the steady
            state of a chain of fused sites; its backward gets gradients for all five outputs;
  block2    a Llama-style block with two sites as the blocks form emits it: coeffs + pre, f1,
            boundary, f2, post_res; reported per site (totals / 2).

These counts are exact for a design (they do not depend on timing), so
tests/test_bench_bytes.py asserts them at n = 4.

Usage:
  TRITON_INTERPRET=1 python benchmarks/bench_bytes.py                   # n = 2, 4, 8, every path
  TRITON_INTERPRET=1 python benchmarks/bench_bytes.py --streams 4 --markdown bytes.md --json bytes.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from benchio import write_atomic  # noqa: E402
from bytecount import ByteCounter  # noqa: E402

PATHS = ("site", "boundary", "block2")
ITERS, EPS = 20, 1e-6
_K = "triton"


def floor_units(n: int) -> dict:
    """Byte floor per site, in units of C * e per token (DESIGN.md section 3)."""
    return {"fwd": 2 * n + 2, "bwd": 3 * n + 3, "fwd+bwd": 5 * n + 5}


def _params(n: int, C: int, seed: int) -> list:
    from mhc_compile import reference

    gen = torch.Generator().manual_seed(seed)
    p = reference.init_site_params(n, C, seed, init="paper", generator=gen)
    return [p[k].detach().clone().requires_grad_() for k in ("phi", "alpha", "b_pre", "b_post", "b_res")]


def _coeffs(x, p):
    return torch.ops.mhc.coeffs(x, *p, ITERS, EPS, "mhc", _K)


def _site(x, p):
    hp, ho, hr = _coeffs(x, p)
    h_in = torch.ops.mhc.pre(x, hp, _K)
    return (torch.ops.mhc.post_res(x, h_in, ho, hr, _K),)  # f = identity: h_out = h_in


def _block2(x, p1, p2):
    hp, ho, hr = _coeffs(x, p1)
    h_in = torch.ops.mhc.pre(x, hp, _K)
    x1, hp2, ho2, hr2, h_in2 = torch.ops.mhc.boundary(x, h_in, ho, hr, *p2, ITERS, EPS, "mhc", _K)
    return (torch.ops.mhc.post_res(x1, h_in2, ho2, hr2, _K),)


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_()


def path_call(path: str, T: int, n: int, C: int, dtype: torch.dtype):
    """(forward callable -> outputs tuple, sites it covers) with fresh leaves for ``path``."""
    import mhc_compile.ops  # noqa: F401  (registers the mhc:: ops; the package imports it lazily)

    gen = torch.Generator().manual_seed(1)
    x = _leaf(torch.randn(T, n, C, generator=gen).to(dtype))
    p1 = _params(n, C, 1)
    if path == "site":
        return (lambda: _site(x, p1)), 1
    if path == "block2":
        p2 = _params(n, C, 2)
        return (lambda: _block2(x, p1, p2)), 2
    if path == "boundary":
        from mhc_compile import reference

        h_out = _leaf(torch.randn(T, C, generator=gen).to(dtype))
        with torch.no_grad():
            hp, ho, hr = reference.coeffs(x.float(), *p1, iters=ITERS, eps=EPS)
        ho, hr = _leaf(ho), _leaf(hr)
        p2 = _params(n, C, 2)
        return (lambda: torch.ops.mhc.boundary(x, h_out, ho, hr, *p2, ITERS, EPS, "mhc", _K)), 1
    raise ValueError(f"unknown path {path!r}; choose from {PATHS}")


def count_path(path: str, n: int, T: int = 37, C: int = 256, dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """Rows (fwd, bwd, fwd+bwd) of one path: per-site stream units, floor ratio, launches.

    ``C`` must exceed every per-token coefficient width (the logit tile W <= 128) and ``T``
    divide no parameter size, so the counter tells stream tensors from the rest.
    """
    fwd, sites = path_call(path, T, n, C, dtype)
    e = torch.empty((), dtype=dtype).element_size()
    with ByteCounter(T, C) as tf:
        outs = fwd()
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(o.shape, generator=gen).to(o.dtype) for o in outs]
    with ByteCounter(T, C) as tb:
        torch.autograd.backward(outs, grads)
    rows = []
    floor = floor_units(n)
    for pas, tallies in (("fwd", [tf]), ("bwd", [tb]), ("fwd+bwd", [tf, tb])):
        units = sum(t.units(e) for t in tallies) / sites
        rows.append({
            "path": path, "n": n, "pass": pas, "T": T, "C": C, "dtype": str(dtype).replace("torch.", ""),
            "units": units, "floor": floor[pas], "x_floor": units / floor[pas],
            "coeff_bytes_per_token": sum(t.coeff for t in tallies) / (T * sites),
            "triton": sum(t.triton for t in tallies) / sites, "torch": sum(t.torch for t in tallies) / sites,
            "kernels": [k for t in tallies for k in t.kernels],
            "stream_by_launch": {k: v / (T * C * e) for t in tallies for k, v in t.detail.items()},
        })
    return rows


# ============================================================================ output
def format_markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"{meta['date']}; {meta['where']}; T={meta['T']}, C={meta['C']}, {meta['dtype']}; "
             f"torch {meta['torch']}, triton {meta['triton']}", "",
             "| path | n | pass | C·e per token | floor | × floor | coeff B/token | Triton launches | torch ops |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['path']} | {r['n']} | {r['pass']} | {r['units']:.2f} | {r['floor']} | {r['x_floor']:.2f} | "
                     f"{r['coeff_bytes_per_token']:.0f} | {r['triton']:g} | {r['torch']:g} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--streams", default="2,4,8", help="comma list of n")
    ap.add_argument("--paths", default=",".join(PATHS), help=f"comma list from {','.join(PATHS)}")
    ap.add_argument("--tokens", type=int, default=37)
    ap.add_argument("--channels", type=int, default=256)
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", default=None)
    ap.add_argument("--verbose", action="store_true", help="print each row's launches and stream bytes by launch")
    args = ap.parse_args(argv)
    import triton

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    meta = {"date": time.strftime("%Y-%m-%d", time.gmtime()), "where": "CPU, Triton interpreter",
            "T": args.tokens, "C": args.channels, "dtype": args.dtype, "torch": torch.__version__,
            "triton": triton.__version__}
    rows: list[dict] = []
    for path in args.paths.split(","):
        for n in (int(v) for v in args.streams.split(",")):
            new = count_path(path, n, args.tokens, args.channels, dtype)
            rows += new
            for r in new:
                print(f"{r['path']:9s} n={r['n']} {r['pass']:8s} {r['units']:6.2f} C·e/token  floor {r['floor']:3d}  "
                      f"x{r['x_floor']:.2f}  coeff {r['coeff_bytes_per_token']:5.0f} B/token  "
                      f"launches {r['triton']:g} triton + {r['torch']:g} torch", flush=True)
                if args.verbose and r["pass"] != "fwd+bwd":
                    print("    ", r["kernels"])
                    print("    ", {k: round(v, 2) for k, v in r["stream_by_launch"].items()})
            if args.json:  # rows as they finish: a killed run keeps what it measured
                write_atomic(args.json, json.dumps({"meta": meta, "rows": rows}, indent=1))
            if args.markdown:
                write_atomic(args.markdown, format_markdown(rows, meta))
    return rows


if __name__ == "__main__":
    main()
