"""Ahead-of-time compilation of the coefficient kernels for a CUDA target, without a GPU.

Owns the tooling that proves the GPU launch configurations compile (Triton's bundled ptxas) and
fit: :func:`compile_kernel` for any ``@triton.jit`` kernel, :func:`resources` (registers, spills,
shared memory from ``cuobjdump``), and :func:`compile_coeffs` / :func:`compile_boundary`, which
compile the coeffs kernels, the boundary kernel (with the split-K finish kernel at decode
shapes) and the boundary backward's mix kernel with exactly the constexprs, warps and stages their launchers use on CUDA (``coeffs.launch_config`` / ``boundary.launch_config`` with
``gpu=True``) and the 16-byte divisibility attributes a real launch at (T, n, C) has (pointers
and the int arguments that are multiples of 16; an int equal to 1, which a launch would make a
constant, is not reproduced). Used by tests/test_kernel_aot.py and tests/test_kernel_coeffs.py in
a subprocess; needs TRITON_INTERPRET unset. Nothing here runs at model time.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from typing import Optional

import triton

from . import boundary, boundary_bwd, coeffs, split_k


def signature(fn, ptr_types: dict, scalars: dict, consts: dict) -> dict:
    """Triton signature of kernel ``fn``: "constexpr" for its constexpr parameters (all of which
    ``consts`` must give), ``ptr_types`` per pointer (default ``*fp32``) and ``scalars`` per
    other argument (default ``i32``)."""
    sig = {}
    for p in fn.params:
        if p.is_constexpr:
            if p.name not in consts:
                raise ValueError(f"{fn.__name__}: no value for constexpr {p.name}")
            sig[p.name] = "constexpr"
        elif p.name.endswith("_ptr"):
            sig[p.name] = ptr_types.get(p.name, "*fp32")
        else:
            sig[p.name] = scalars.get(p.name, "i32")
    return sig


def launch_attrs(fn, ints: dict) -> dict:
    """The divisibility a real launch specialises on: 16 for every pointer (torch's allocations are
    16-byte aligned) and for every int argument in ``ints`` whose value is a multiple of 16."""
    attrs = {}
    for i, p in enumerate(fn.params):
        if p.is_constexpr:
            continue
        if p.name.endswith("_ptr") or (p.name in ints and ints[p.name] % 16 == 0):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return attrs


def compile_kernel(fn, ptr_types: dict, scalars: dict, consts: dict, num_warps: int, num_stages: int = 3, arch: int = 90,
                   ints: Optional[dict] = None):
    """Compile a ``@triton.jit`` kernel for CUDA ``sm_<arch>``; returns the compiled kernel
    (``.metadata.shared``, ``.asm["cubin"]``). See :func:`signature` for the argument types;
    ``ints``: the int arguments' values of the launch to reproduce (their divisibility by 16,
    see :func:`launch_attrs`); None compiles without any divisibility attribute."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    attrs = None if ints is None else launch_attrs(fn, ints)
    src = ASTSource(fn=fn, signature=signature(fn, ptr_types, scalars, consts), constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "num_stages": num_stages})


# sm_90 (H100 / H200) per-SM limits: registers, shared memory (228 KiB, 1 KiB reserved per CTA),
# threads, resident CTAs; and the SM count of an H100 SXM / H200 (the grids of the launch plans).
SM90 = dict(regs=65536, smem=228 * 1024, smem_reserved=1024, threads=2048, ctas=32, sms=132)


def ctas_per_sm(regs: int, shared: int, num_warps: int) -> int:
    """CTAs of a kernel resident on one sm_90 SM: registers are allocated per warp in units of
    256, shared memory per CTA plus 1 KiB reserved; also the thread and 32-CTA caps."""
    per_warp = triton.cdiv(regs * 32, 256) * 256
    by_regs = (SM90["regs"] // per_warp) // num_warps
    by_smem = SM90["smem"] // (shared + SM90["smem_reserved"])
    return min(by_regs, by_smem, SM90["threads"] // (32 * num_warps), SM90["ctas"])


def resources(kernel, grid: tuple = (1,)) -> dict:
    """Registers per thread, stack and local (spill) bytes, shared memory, warps, the number of
    wgmma (Hopper tensor-core MMA) instructions in its PTX, CTAs per SM (:func:`ctas_per_sm`) of a
    compiled kernel (``cuobjdump -res-usage``, Triton's bundled CUDA tools, on its cubin), and the
    CTAs of the launch's ``grid``."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        out = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if m is None:
        raise RuntimeError(f"cuobjdump -res-usage printed no resource line: {out[:500]}")
    regs, shared, warps = int(m.group(1)), kernel.metadata.shared, kernel.metadata.num_warps
    ctas = 1
    for g in grid:
        ctas *= g
    return {"regs": regs, "stack": int(m.group(2)), "local": int(m.group(4)), "shared": shared,
            "warps": warps, "wgmma": kernel.asm["ptx"].count("wgmma.mma_async"),
            "ctas_per_sm": ctas_per_sm(regs, shared, warps), "grid_ctas": ctas}


def _launch_ints(n: int, T: int, C: int, bt: int, bk: int, sms: int = SM90["sms"], split: int = 0) -> dict:
    """The int arguments the coefficient launchers pass for T tokens, n streams, C channels
    (``split``: a split-K launch's channels / flat columns per split)."""
    tblocks = triton.cdiv(T, bt)
    kblocks = triton.cdiv(n * C, bk)
    splits = max(1, min(tblocks, triton.cdiv(4 * sms, kblocks), 32))
    return dict(T=T, K=n * C, J=2 * n + n * n, C=C, iters=20, tblocks=tblocks, splits=splits,
                stride_post=n, stride_res=n * n, CSPLIT=split or C, KSPLIT=split, S=1)


def compile_coeffs(n: int, dtype: str = "bf16", variant: str = "mhc", arch: int = 90, T: int = 16384, C: int = 4096) -> dict:
    """The coeffs kernels a launch at (T, n, C) in ``dtype`` runs (forward: the one-pass kernel,
    or at decode shapes the split-K part and finish kernels; backward: dh and x), with their CUDA
    launch configuration and divisibility; returns {kernel name: :func:`resources`}."""
    consts, x_consts, warps = coeffs.launch_config(n, variant, gpu=True)
    tblocks, S, ksplit = coeffs.launch_grid(T, n * C, consts, SM90["sms"])
    ints = _launch_ints(n, T, C, consts["BT"], consts["BK"], split=ksplit)
    xt = "*" + dtype
    x_ints = _launch_ints(n, T, C, x_consts["BT"], x_consts["NP"] * x_consts["BC"])
    x_grid = (triton.cdiv(C, x_consts["BC"]), x_ints["splits"])
    dconsts = coeffs.dh_consts(consts)
    runs = [(coeffs._coeffs_bwd_dh_kernel, dict(dconsts, GP=True, GHP=True, WRITE_HP=True),
             {"x_ptr": xt, "ghin_ptr": xt}, ints, (triton.cdiv(T, dconsts["BT"]),)),
            (coeffs._coeffs_bwd_x_kernel, dict(x_consts, GADD=True, GPRE=True, GMIX=True, GX=True),
             {"x_ptr": xt, "gx_ptr": xt, "gadd_ptr": xt, "ghin_ptr": xt, "gmix_ptr": xt}, x_ints, x_grid)]
    if S == 1:
        runs.insert(0, (coeffs._coeffs_fwd_kernel, consts, {"x_ptr": xt}, ints, (tblocks,)))
    else:
        pconsts = {k: consts[k] for k in ("N", "NP", "W", "BT", "BK", "DOT_P")}
        fconsts, fwarps = split_k.finish_config(n, variant, True, 16)
        runs.insert(0, (coeffs._coeffs_part_kernel, pconsts, {"x_ptr": xt}, ints, (tblocks, S)))
    out = {}
    for fn, kconsts, ptrs, kints, grid in runs:
        k = compile_kernel(fn, ptrs, {"eps": "fp32"}, kconsts, warps, 3, arch, kints)
        out[fn.__name__] = resources(k, grid)
    if S > 1:
        k = compile_kernel(split_k._finish_kernel, {}, {"eps": "fp32"}, dict(fconsts, GHP=False, HIN=False),
                           fwarps, 3, arch, dict(ints, S=S))
        out["_finish_kernel(coeffs)"] = resources(k, (triton.cdiv(T, fconsts["BT"]), 1))
    return out


def compile_boundary(n: int, dtype: str = "bf16", variant: str = "mhc", arch: int = 90, T: int = 16384, C: int = 4096) -> dict:
    """The boundary kernel a launch at (T, n, C) in ``dtype`` runs, with its CUDA launch
    configuration (backward recompute flags on) and divisibility, and at decode shapes (split-K)
    the finish kernel; returns {kernel name: :func:`resources`}."""
    consts, warps, stages = boundary.launch_config(n, C, variant, gpu=True)
    tblocks, S, csplit = boundary.launch_grid(T, C, consts, SM90["sms"])
    xt = "*" + dtype
    ptrs = {"x_ptr": xt, "hout_ptr": xt, "xn_ptr": xt, "hin_ptr": xt, "ghin_ptr": xt}
    fn = boundary._boundary_fwd_kernel
    ints = _launch_ints(n, T, C, consts["BT"], consts["BC"], split=csplit)
    k = compile_kernel(fn, ptrs, {"eps": "fp32"}, dict(consts, WRITE_HIN=True, GHP=True, SPLIT=S > 1),
                       warps, stages, arch, ints)
    out = {fn.__name__: resources(k, (tblocks, S))}
    if S > 1:
        fconsts, fwarps = split_k.finish_config(n, variant, True, consts["BC"])
        ftb, fs, hsplit = boundary.hin_grid(T, C, fconsts, SM90["sms"])
        k = compile_kernel(split_k._finish_kernel, {"xn_ptr": xt, "hin_ptr": xt}, {"eps": "fp32"},
                           dict(fconsts, GHP=True, HIN=True), fwarps, 3, arch, dict(ints, S=S, CSPLIT=hsplit))
        out["_finish_kernel(boundary)"] = resources(k, (ftb, fs))
    # the backward's second pass (dX' and site l's post_res backward), C split as
    # boundary_bwd.post_res_pass splits it on SM90["sms"] SMs
    blocks, mwarps = boundary_bwd.mix_config(n, gpu=True)
    mconsts = dict(N=n, NP=consts["NP"], W=consts["W"], DOT_P=consts["DOT_P"], GADD=True, GMIX=True, **blocks)
    fn = boundary_bwd._boundary_bwd_mix_kernel
    ptrs = {"x_ptr": xt, "hout_ptr": xt, "xn_ptr": xt, "gxn_ptr": xt, "ghin_ptr": xt, "gmix_ptr": xt, "gx_ptr": xt,
            "gho_ptr": xt}
    mtblocks = triton.cdiv(T, blocks["BT"])
    cblocks = triton.cdiv(C, blocks["BC"])
    chunk = triton.cdiv(cblocks, max(1, min(cblocks, triton.cdiv(2 * SM90["sms"], mtblocks), 8))) * blocks["BC"]
    k = compile_kernel(fn, ptrs, {}, mconsts, mwarps, 3, arch, dict(ints, C_CHUNK=chunk))
    out[fn.__name__] = resources(k, (mtblocks, triton.cdiv(C, chunk)))
    return out
