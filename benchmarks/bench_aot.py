"""sm_90 resources of every coefficient kernel, compiled ahead of time without a GPU (no timing).

Owns the resource tables of docs/kernels_coeffs.md ("Compiled for H100 without a GPU"). For each
n, x dtype and T it compiles, with ``kernels.aot`` (the launchers' CUDA constexprs, warps, stages
and a real launch's 16-byte divisibility, Triton's bundled ptxas), the kernels a launch at
(T, n, C = 4096) runs: the boundary kernel (and at decode shapes its split-K finish kernel), the
boundary backward's mix kernel, the coeffs forward (at decode shapes the split-K part and finish
kernels), the coeffs backward dh and x kernels; it records registers, stack and local (spill)
bytes, shared memory, wgmma instructions, CTAs per SM on sm_90 and the grid's CTAs (132 SMs).

One run covers the triton of the interpreter that runs it; ``--compare`` puts two runs' JSON
(e.g. triton 3.9 and 3.6) side by side as markdown, cells "first / second" where they differ.
Rows are written (atomically) as they finish, so a killed run keeps what it compiled.

Usage (TRITON_INTERPRET must be unset; ~25 s per case on one core):
  python benchmarks/bench_aot.py --json aot39.json
  PYTHONPATH=$PWD /work/venv-tr36/bin/python benchmarks/bench_aot.py --json aot36.json
  python benchmarks/bench_aot.py --compare aot39.json aot36.json --markdown aot.md
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchio import write_atomic  # noqa: E402

# column order of the tables: (kernel name as kernels.aot reports it, column title)
KERNELS = [("_coeffs_fwd_kernel", "coeffs fwd"), ("_coeffs_part_kernel", "coeffs fwd part"),
           ("_finish_kernel(coeffs)", "coeffs finish"), ("_coeffs_bwd_dh_kernel", "bwd dh"),
           ("_coeffs_bwd_x_kernel", "bwd x"), ("_boundary_fwd_kernel", "boundary"),
           ("_finish_kernel(boundary)", "boundary finish"), ("_boundary_bwd_mix_kernel", "boundary bwd mix")]


def run(streams, dtypes, tokens, C: int, out: str) -> list:
    """Compile every case; rows {n, dtype, T, C, triton, kernels: {name: aot.resources}}."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("unset TRITON_INTERPRET: this script compiles for sm_90")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import triton

    from mhc_compile.kernels import aot

    rows = []
    for T in tokens:
        for n in streams:
            for dtype in dtypes:
                res = aot.compile_boundary(n, dtype, T=T, C=C)
                res.update(aot.compile_coeffs(n, dtype, T=T, C=C))
                rows.append(dict(n=n, dtype=dtype, T=T, C=C, triton=triton.__version__, kernels=res))
                print(json.dumps(rows[-1]), flush=True)
                if out:
                    write_atomic(out, json.dumps(rows, indent=1))
    return rows


def _pair(a, b, fmt=str) -> str:
    if b is None or a == b:
        return fmt(a)
    return f"{fmt(a)} / {fmt(b)}"


def cell(r1: dict, r2, decode: bool) -> str:
    """One kernel's cell: registers, spills (bold), shared memory, wgmma, CTAs/SM (, grid CTAs)."""
    g = (lambda k: r2[k]) if r2 else (lambda k: None)
    parts = [_pair(r1["regs"], g("regs")) + " reg"]
    s1, s2 = r1["stack"] + r1["local"], (r2["stack"] + r2["local"] if r2 else None)
    if s1 or s2:
        parts.append(f"**spill {_pair(s1, s2)} B**")
    parts.append(_pair(r1["shared"], g("shared"), lambda v: f"{v / 1024:.0f}") + " KiB")
    if r1["wgmma"] or (r2 and r2["wgmma"]):
        parts.append(_pair(r1["wgmma"], g("wgmma")) + " wgmma")
    parts.append(_pair(r1["ctas_per_sm"], g("ctas_per_sm")) + "/SM")
    if decode:
        parts.append("grid " + _pair(r1["grid_ctas"], g("grid_ctas")))
    return ", ".join(parts)


def markdown(rows1: list, rows2=None) -> str:
    """One table per T: a row per (n, dtype), a column per kernel the launch runs."""
    other = {(r["n"], r["dtype"], r["T"]): r for r in rows2 or []}
    vers = rows1[0]["triton"] + (f" / {rows2[0]['triton']}" if rows2 else "")
    lines = []
    for T in sorted({r["T"] for r in rows1}):
        rows = [r for r in rows1 if r["T"] == T]
        names = [(k, t) for k, t in KERNELS if any(k in r["kernels"] for r in rows)]
        decode = any("_finish_kernel(boundary)" in r["kernels"] for r in rows)
        lines += ["", f"T = {T}, C = {rows[0]['C']} (triton {vers}):", "",
                  "| n, x | " + " | ".join(t for _, t in names) + " |", "|---" * (len(names) + 1) + "|"]
        for r in sorted(rows, key=lambda r: (r["n"], r["dtype"])):
            o = other.get((r["n"], r["dtype"], r["T"]))
            cells = []
            for k, _ in names:
                if k not in r["kernels"]:
                    cells.append("")
                else:
                    cells.append(cell(r["kernels"][k], o["kernels"].get(k) if o else None, decode))
            lines.append(f"| {r['n']}, {r['dtype']} | " + " | ".join(cells) + " |")
    return "\n".join(lines).lstrip("\n") + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, nargs="+", default=[1, 2, 3, 4, 8])
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"])
    p.add_argument("--tokens", type=int, nargs="+", default=[16384, 8])
    p.add_argument("--channels", type=int, default=4096)
    p.add_argument("--json", default="", help="write the rows here (after each case)")
    p.add_argument("--compare", nargs="+", default=None, metavar="JSON",
                   help="no compile: markdown of one run's JSON, or two side by side")
    p.add_argument("--markdown", default="", help="write the markdown table here")
    args = p.parse_args()
    if args.compare:
        runs = [json.load(open(f)) for f in args.compare[:2]]
        text = markdown(runs[0], runs[1] if len(runs) > 1 else None)
    else:
        text = markdown(run(args.streams, args.dtypes, args.tokens, args.channels, args.json))
    print(text)
    if args.markdown:
        write_atomic(args.markdown, text)


if __name__ == "__main__":
    main()
