"""Kernel benchmark for mhc-compile: each fused op alone and one whole residual site.

Owns the kernel-level timing harness (DESIGN.md section 3, "Numbers to beat"). In one run it
times, side by side,

  triton    the fused Triton kernels, reached through ``mhc_compile.ops`` with kernels="triton"
            (forward op and ``*_backward`` op timed separately);
  eager     the plain-torch spec ``mhc_compile.reference`` under autograd;
  inductor  ``torch.compile`` (inductor) of the same reference functions;
  liger     Liger-Kernel's ``LigerMHC`` (whole site only), if ``liger_kernel`` is importable;

for the ops coeffs, pre, post_res, boundary (post_res of site l + coeffs + pre of site l+1) and
a whole site (coeffs + pre + post_res, forward plus backward, branch f = identity).

Bandwidth. It first measures the device's copy bandwidth (a large device-to-device copy,
bytes read + written) and reports, for each row, the bytes the op must move at minimum, the
achieved GB/s and that as a fraction of the copy bandwidth, and the byte floor time
(bytes / copy bandwidth). Byte formulas, per token, with e = element size of x (2 for bf16),
coefficients fp32 (4 bytes), n streams, C channels:

  coeffs    fwd  read x nCe                             write H (2n+n^2)*4
            bwd  read dH (2n+n^2)*4 + x nCe             write dx nCe
  pre       fwd  read x nCe + H_pre 4n                  write h_in Ce                  = (n+1)Ce + 4n
            bwd  read g Ce + x nCe + H_pre 4n           write gx nCe + dH_pre 4n       = (2n+1)Ce + 8n
  post_res  fwd  read x nCe + h_out Ce + H 4(n+n^2)     write x' nCe                   = (2n+1)Ce + 4(n+n^2)
            bwd  read g nCe + x nCe + h_out Ce + H      write gx nCe + gh_out Ce + dH  = (3n+2)Ce + 8(n+n^2)
  boundary  fwd  read x nCe + h_out Ce + H_l            write x_next nCe + h_in Ce + H_l+1 = (2n+2)Ce + ...
            bwd  read g_x' nCe + g_h_in Ce + x nCe + h_out Ce (+ dH_l+1)
                                                        write gx nCe + gh_out Ce (+ dH_l)  = (3n+3)Ce + ...
  site      fwd+bwd  (2n+2)Ce forward + (3n+3)Ce backward = (5n+5)Ce   (DESIGN.md: the byte floor)

plus, once per call (not per token), phi nC(2n+n^2)*4 read in every pass that uses it and its
gradient written in the backward. Floors ignore the L2-resident re-reads a kernel may do.

Timing: CUDA-graph replay (``do_bench_cudagraph``, median) where a callable can be captured, else
``do_bench`` (field ``timer``); on CPU the median of a few wall-clock runs (``--quick``). Rows are
written as they finish, triton/eager rows first, so a killed run keeps what it measured.
``vs_triton`` = t_impl / t_triton of the same row (above 1: Triton faster); ``x_floor`` = t / floor.

Usage (H100):
  python benchmarks/bench_kernels.py                                  # full sweep, bf16
  python benchmarks/bench_kernels.py --ops site --streams 4 --markdown out.md --json out.json
  python benchmarks/bench_kernels.py --quick                          # tiny CPU smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchio import write_atomic  # noqa: E402

OPS = ("coeffs", "pre", "post_res", "boundary", "site")
IMPLS = ("triton", "eager", "inductor", "liger")
ITERS, EPS = 20, 1e-6


# ============================================================================ arguments
def _int_list(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v]


def _str_list(choices):
    def parse(s: str) -> list[str]:
        vals = [v for v in s.split(",") if v]
        bad = [v for v in vals if v not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {','.join(choices)}")
        return vals

    return parse


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=None, help="tokens T (default 16384; 64 with --quick)")
    p.add_argument("--channels", type=_int_list, default=None, help="comma list of C (default 1024,2048,4096)")
    p.add_argument("--streams", type=_int_list, default=None, help="comma list of n (default 2,4,8)")
    p.add_argument("--ops", type=_str_list(OPS), default=list(OPS), help=f"comma list from {','.join(OPS)}")
    p.add_argument("--impls", type=_str_list(IMPLS), default=None,
                   help="comma list from triton,eager,inductor,liger (default all; --quick: triton,eager)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--device", default=None, help="cuda or cpu (default cuda if available, cpu with --quick)")
    p.add_argument("--quick", action="store_true", help="tiny shapes on CPU (Triton interpreter): a smoke run, not a measurement")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warmup in ms (CUDA)")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time in ms (CUDA)")
    p.add_argument("--cpu-reps", type=int, default=3, help="timed runs per row on CPU")
    p.add_argument("--no-cudagraph", action="store_true", help="time with do_bench only (no CUDA graph replay)")
    p.add_argument("--cases", default=None,
                   help="comma list of NxC or NxC@T (e.g. 4x1024,2x1024,4x4096@8: T tokens instead of --tokens, "
                        "decode shapes, where the coefficient kernels split K) measured in this order; overrides "
                        "--streams/--channels. All triton and eager rows come first, then liger, then inductor")
    p.add_argument("--copy-mib", type=int, default=None, help="size of the bandwidth copy (default 1024 MiB on CUDA, 16 on CPU)")
    p.add_argument("--json", default=None, help="write the rows and the setup as JSON to this path")
    p.add_argument("--markdown", default=None, help="write the rows as a markdown table to this path")
    args = p.parse_args(argv)
    if args.quick:
        args.tokens = args.tokens or 64
        args.channels = args.channels or [32]
        args.streams = args.streams or [2, 4]
        args.impls = args.impls or ["triton", "eager"]
        args.device = args.device or "cpu"
        args.dtype = "fp32" if args.device == "cpu" else args.dtype  # numpy/interpreter: no bf16 on CPU
    args.tokens = args.tokens or 16384
    args.channels = args.channels or [1024, 2048, 4096]
    args.streams = args.streams or [2, 4, 8]
    args.impls = args.impls or list(IMPLS)
    return args


def parse_case(spec: str, tokens: int) -> tuple[int, int, int]:
    """(n, C, T) from "NxC" (T = ``tokens``) or "NxC@T"."""
    nc, _, t = spec.partition("@")
    n, C = (int(v) for v in nc.split("x"))
    return n, C, int(t) if t else tokens


# ============================================================================ timing
def make_timer(device, args) -> Callable[[Callable[[], object]], float]:
    """A function fn -> median milliseconds per call. On CUDA, fn is replayed from a CUDA graph
    (``do_bench_cudagraph``: kernel time without Python launch overhead) when it can be captured,
    else timed with ``do_bench``; ``timer.used`` names the last method."""
    if device.type == "cuda":
        import torch
        from triton.testing import do_bench, do_bench_cudagraph

        def cuda_time(fn):
            if not args.no_cudagraph:
                try:
                    ms = float(do_bench_cudagraph(fn, rep=args.rep, return_mode="median"))
                    cuda_time.used = "cudagraph"
                    return ms
                except Exception as e:  # capture refused (a host sync, an allocator limit): plain timing
                    torch.cuda.synchronize()
                    print(f"cuda graph capture failed ({type(e).__name__}): timing without graphs", file=sys.stderr)
            cuda_time.used = "do_bench"
            return float(do_bench(fn, warmup=args.warmup, rep=args.rep, return_mode="median"))

        cuda_time.used = "do_bench"
        return cuda_time

    def cpu_time(fn):
        fn()  # warm (compilation, interpreter caches)
        times = []
        for _ in range(max(1, args.cpu_reps)):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    cpu_time.used = "wall"
    return cpu_time


def copy_bandwidth(device, mib: int, timer) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read + written."""
    import torch

    numel = mib * (1 << 20) // 2
    src = torch.empty(numel, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


# ============================================================================ byte floors
def op_bytes(op: str, pas: str, T: int, n: int, C: int, e: int) -> int:
    """Minimum bytes moved (inputs read once, outputs written once); see the module docstring."""
    J = 2 * n + n * n
    phi = n * C * J * 4
    per_token = {
        ("coeffs", "fwd"): n * C * e + J * 4,
        ("coeffs", "bwd"): 2 * n * C * e + J * 4,
        ("pre", "fwd"): (n + 1) * C * e + 4 * n,
        ("pre", "bwd"): (2 * n + 1) * C * e + 8 * n,
        ("post_res", "fwd"): (2 * n + 1) * C * e + 4 * (n + n * n),
        ("post_res", "bwd"): (3 * n + 2) * C * e + 8 * (n + n * n),
        ("boundary", "fwd"): (2 * n + 2) * C * e + 4 * (n + n * n) + 4 * J,
        ("boundary", "bwd"): (3 * n + 3) * C * e + 8 * (n + n * n) + 4 * J,
        ("site", "fwd+bwd"): (5 * n + 5) * C * e,
    }[(op, pas)]
    once = {"coeffs": {"fwd": phi, "bwd": 2 * phi}, "boundary": {"fwd": phi, "bwd": 2 * phi}, "site": {"fwd+bwd": 3 * phi}}
    return T * per_token + once.get(op, {}).get(pas, 0)


# ============================================================================ cases
class Case:
    """Inputs of one (op, n, C) configuration and, per implementation, the callables to time."""

    def __init__(self, T, n, C, dtype, device):
        import torch

        from mhc_compile import reference

        self.T, self.n, self.C = T, n, C
        gen = torch.Generator(device="cpu").manual_seed(0)
        self.x = torch.randn(T, n, C, generator=gen).to(device=device, dtype=dtype)
        self.h_out = torch.randn(T, C, generator=gen).to(device=device, dtype=dtype)
        p = reference.init_site_params(n, C, 0, init="paper", generator=gen)
        self.params = {k: v.to(device) for k, v in p.items()}
        with torch.no_grad():
            self.h_pre, self.h_post, self.h_res = reference.coeffs(self.x, **self.params, iters=ITERS, eps=EPS)
        self.coeff_args = [self.params[k] for k in ("phi", "alpha", "b_pre", "b_post", "b_res")]


def _ref_fns():
    """The plain-torch spec of each op as f(*inputs) -> tensor or tuple (differentiable)."""
    from mhc_compile import reference as R

    def coeffs(x, phi, alpha, bp, bo, br):
        return R.coeffs(x, phi, alpha, bp, bo, br, iters=ITERS, eps=EPS)

    def boundary(x, h_out, h_post, h_res, phi, alpha, bp, bo, br):
        x_next = R.post_res_mix(x, h_out, h_post, h_res)
        hp, ho, hr = R.coeffs(x_next, phi, alpha, bp, bo, br, iters=ITERS, eps=EPS)
        return x_next, hp, ho, hr, R.pre_mix(x_next, hp)

    def site(x, phi, alpha, bp, bo, br):
        hp, ho, hr = R.coeffs(x, phi, alpha, bp, bo, br, iters=ITERS, eps=EPS)
        return R.post_res_mix(x, R.pre_mix(x, hp), ho, hr)

    return {"coeffs": coeffs, "pre": R.pre_mix, "post_res": R.post_res_mix, "boundary": boundary, "site": site}


def _triton_fns():
    """The same ops through mhc_compile.ops with kernels='triton'."""
    import torch

    from mhc_compile import ops

    def coeffs(x, phi, alpha, bp, bo, br):
        return torch.ops.mhc.coeffs(x, phi, alpha, bp, bo, br, ITERS, EPS, "mhc", "triton")

    def boundary(x, h_out, h_post, h_res, phi, alpha, bp, bo, br):
        return ops.boundary(x, h_out, h_post, h_res, phi, alpha, bp, bo, br, ITERS, EPS, kernels="triton")

    def site(x, phi, alpha, bp, bo, br):
        hp, ho, hr = coeffs(x, phi, alpha, bp, bo, br)
        return torch.ops.mhc.post_res(x, torch.ops.mhc.pre(x, hp, "triton"), ho, hr, "triton")

    return {
        "coeffs": coeffs,
        "pre": lambda x, h: torch.ops.mhc.pre(x, h, "triton"),
        "post_res": lambda x, ho, hp, hr: torch.ops.mhc.post_res(x, ho, hp, hr, "triton"),
        "boundary": boundary,
        "site": site,
    }


def _inputs(case: Case, op: str) -> list:
    if op in ("coeffs", "site"):
        return [case.x, *case.coeff_args]
    if op == "pre":
        return [case.x, case.h_pre]
    if op == "post_res":
        return [case.x, case.h_out, case.h_post, case.h_res]
    if op == "boundary":
        return [case.x, case.h_out, case.h_post, case.h_res, *case.coeff_args]
    raise ValueError(op)


def _as_tuple(y):
    return y if isinstance(y, tuple) else (y,)


def _autograd_callables(fn, inputs):
    """(fwd, bwd) for a differentiable fn: fwd under no_grad; bwd = autograd.grad over a kept graph."""
    import torch

    leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in inputs]

    def fwd():
        with torch.no_grad():
            return fn(*inputs)

    state = {}

    def bwd():
        if "y" not in state:
            y = _as_tuple(fn(*leaves))
            state["y"] = y
            state["g"] = [torch.randn_like(t) for t in y]
        return torch.autograd.grad(state["y"], leaves, state["g"], retain_graph=True, allow_unused=True)

    def fwd_bwd():
        y = _as_tuple(fn(*leaves))
        if "g1" not in state:
            state["g1"] = [torch.randn_like(t) for t in y]
        return torch.autograd.grad(y, leaves, state["g1"], allow_unused=True)

    return fwd, bwd, fwd_bwd


def _triton_backward_op(case: Case, op: str):
    """The Triton backward kernel alone (the ops' *_backward entry points), or None to use autograd."""
    import torch

    x = case.x
    if op == "pre":
        g = torch.randn_like(case.h_out)
        return lambda: torch.ops.mhc.pre_backward(g, x, case.h_pre, "triton")
    if op == "post_res":
        g = torch.randn_like(x)
        return lambda: torch.ops.mhc.post_res_backward(g, x, case.h_out, case.h_post, case.h_res, "triton")
    if op == "coeffs":
        gs = [torch.randn_like(t) for t in (case.h_pre, case.h_post, case.h_res)]
        return lambda: torch.ops.mhc.coeffs_backward(*gs, x, *case.coeff_args, ITERS, EPS, "mhc", "triton")
    return None


def _liger_site(case: Case):
    """LigerMHC around nn.Identity as (fwd, fwd_bwd) callables; raises ImportError without liger_kernel."""
    import torch
    from liger_kernel.transformers.mhc import LigerMHC  # optional dependency

    m = LigerMHC(torch.nn.Identity(), hc=case.n, c=case.C, tmax=ITERS, rms_eps=EPS,
                 phi_dtype=case.x.dtype, allow_fp32=case.x.dtype == torch.float32).to(case.x.device)
    leaf = case.x.detach().requires_grad_()
    params = list(m.parameters())
    g = torch.randn_like(case.x)

    def fwd_bwd():
        return torch.autograd.grad(m(leaf), [leaf, *params], g, allow_unused=True)

    return fwd_bwd


def _error(e: Exception) -> str:
    """One short line for the table; the traceback with MHC_BENCH_DEBUG=1."""
    if os.environ.get("MHC_BENCH_DEBUG"):
        traceback.print_exc()
    msg = " ".join(str(e).split())
    if "): " in msg and msg.startswith(tuple("abcdefghijklmnopqrstuvwxyz_")):
        msg = msg.split("): ", 1)[1]  # drop torch.library's "op (with implementation in <module ...>)" prefix
    return f"{type(e).__name__}: {msg}"[:200]


def run_case(op: str, case: Case, impls, timer, copy_bw: float, elem: int) -> list[dict]:
    import torch

    refs, rows = _ref_fns(), []
    passes = ("fwd+bwd",) if op == "site" else ("fwd", "bwd")
    times: dict = {}
    for impl in impls:
        if impl == "liger" and op != "site":
            continue
        try:
            inputs = _inputs(case, op)
            if impl == "liger":
                calls = {"fwd+bwd": _liger_site(case)}
            else:
                if impl == "triton":
                    fn = _triton_fns()[op]
                elif impl == "eager":
                    fn = refs[op]
                else:  # inductor; a fresh Dynamo cache per case so no recompile limit is hit
                    torch._dynamo.reset()
                    fn = torch.compile(refs[op], dynamic=False)
                fwd, bwd, fwd_bwd = _autograd_callables(fn, inputs)
                calls = {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd_bwd}
                if impl == "triton":
                    kernel_bwd = _triton_backward_op(case, op)
                    if kernel_bwd is not None:
                        calls["bwd"] = kernel_bwd
        except Exception as e:  # report, keep going: one missing kernel must not hide the others
            for pas in passes:
                times[(impl, pas)] = _error(e)
            continue
        for pas in passes:
            try:
                times[(impl, pas)] = (timer(calls[pas]), timer.used)
            except Exception as e:
                times[(impl, pas)] = _error(e)
    for pas in passes:
        nbytes = op_bytes(op, pas, case.T, case.n, case.C, elem)
        floor_ms = nbytes / copy_bw * 1e3
        for impl in impls:
            if (impl, pas) not in times:
                continue
            t = times[(impl, pas)]
            row = {"op": op, "pass": pas, "T": case.T, "n": case.n, "C": case.C, "impl": impl,
                   "bytes": nbytes, "floor_ms": floor_ms, "vs_triton": None}
            if isinstance(t, tuple):
                ms, used = t
                gbps = nbytes / (ms * 1e-3) / 1e9
                row.update(ms=ms, timer=used, gbps=gbps, frac_copy=gbps * 1e9 / copy_bw, x_floor=ms / floor_ms, error=None)
            else:
                row.update(ms=None, timer=None, gbps=None, frac_copy=None, x_floor=None, error=t)
            rows.append(row)
    return rows


def link_triton(rows: list[dict]) -> list[dict]:
    """Fill ``vs_triton`` (t_impl / t_triton of the same op, pass, T, n, C) where both were measured."""
    tri = {(r["op"], r["pass"], r["T"], r["n"], r["C"]): r["ms"] for r in rows if r["impl"] == "triton" and r["ms"]}
    for r in rows:
        t = tri.get((r["op"], r["pass"], r["T"], r["n"], r["C"]))
        r["vs_triton"] = r["ms"] / t if (t and r["ms"]) else None
    return rows


# ============================================================================ output
COLUMNS = [("op", "{}"), ("pass", "{}"), ("T", "{}"), ("n", "{}"), ("C", "{}"), ("impl", "{}"), ("ms", "{:.4f}"),
           ("GB/s", "{:.0f}"), ("%copy", "{:.1%}"), ("x_floor", "{:.2f}"), ("vs_triton", "{:.2f}")]
_KEYS = {"GB/s": "gbps", "%copy": "frac_copy"}


def _cells(row: dict) -> list[str]:
    out = []
    for name, fmt in COLUMNS:
        v = row.get(_KEYS.get(name, name))
        out.append("-" if v is None else fmt.format(v))
    if row.get("error"):
        out[6] = "error"
    return out


def format_table(rows: list[dict]) -> str:
    head = [c for c, _ in COLUMNS]
    body = [_cells(r) for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)] if body else [len(h) for h in head]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(cells, widths)) for cells in body]
    errors = [f"  {r['op']}/{r['pass']}/n={r['n']}/C={r['C']}/{r['impl']}: {r['error']}" for r in rows if r.get("error")]
    if errors:
        lines += ["errors:"] + errors
    return "\n".join(lines)


def format_markdown(rows: list[dict], meta: dict) -> str:
    head = [c for c, _ in COLUMNS]
    lines = [f"Device: {meta['device']}; copy bandwidth {meta['copy_gbps']:.0f} GB/s; T={meta['tokens']} (column T per row), "
             f"dtype {meta['dtype']}; torch {meta['torch']}, triton {meta['triton']}; {meta['date']}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


# ============================================================================ main
def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.device == "cpu" and "triton" in args.impls:
        # Triton on CPU is the interpreter; it must be chosen before triton is imported.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu" and not args.quick:
        print("warning: no CUDA device; CPU timings are not kernel measurements (use --quick)", file=sys.stderr)
    if "liger" in args.impls:
        try:
            import liger_kernel  # noqa: F401
        except ImportError:
            args.impls = [i for i in args.impls if i != "liger"]
            print("liger_kernel not importable: skipping the LigerMHC comparison", file=sys.stderr)
    timer = make_timer(device, args)
    copy_mib = args.copy_mib or (1024 if device.type == "cuda" else 16)
    copy_bw = copy_bandwidth(device, copy_mib, timer)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "copy_gbps": copy_bw / 1e9, "tokens": args.tokens, "dtype": args.dtype, "torch": torch.__version__,
            "triton": triton_version, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "interpreter": os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")}
    print(f"# {meta['device']}: copy bandwidth {copy_bw / 1e9:.0f} GB/s (read + write, {copy_mib} MiB); "
          f"T={args.tokens} {args.dtype}; impls {','.join(args.impls)}", flush=True)

    if args.cases:
        cases = [parse_case(c, args.tokens) for c in args.cases.split(",") if c]
    else:
        cases = [(n, C, args.tokens) for C in args.channels for n in args.streams]
    groups = [g for g in (["triton", "eager"], ["liger"], ["inductor"]) if any(i in args.impls for i in g)]
    rows: list[dict] = []
    for group in groups:  # the fused kernels first: a run cut short keeps their rows
        impls = [i for i in args.impls if i in group]
        for n, C, T in cases:
            case = Case(T, n, C, dtype, device)
            for op in args.ops:
                new = run_case(op, case, impls, timer, copy_bw, case.x.element_size())
                rows.extend(new)
                link_triton(rows)
                print(format_table(new), flush=True)  # progress; the full table follows at the end
                if args.json:  # every finished row on disk: a killed run keeps what it measured
                    write_atomic(args.json, json.dumps({"meta": meta, "rows": rows}, indent=1))
                if args.markdown:
                    write_atomic(args.markdown, format_markdown(rows, meta))
            del case
            if device.type == "cuda":
                torch.cuda.empty_cache()

    print()
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    main()
