"""Ahead-of-time compilation of the coefficient kernels for a CUDA target, without a GPU.

Owns the tooling that proves the GPU launch configurations compile (Triton's bundled ptxas) and
fit: :func:`compile_kernel` for any ``@triton.jit`` kernel, :func:`resources` (registers, spills,
shared memory from ``cuobjdump``), and :func:`compile_coeffs` / :func:`compile_boundary`, which
compile the three coeffs kernels, the boundary kernel and the boundary backward's mix kernel with exactly the constexprs, warps and
stages their launchers use on CUDA (``coeffs.launch_config`` / ``boundary.launch_config`` with
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

from . import boundary, boundary_bwd, coeffs


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


def resources(kernel) -> dict:
    """Registers per thread, stack and local (spill) bytes and shared memory of a compiled
    kernel, from ``cuobjdump -res-usage`` (Triton's bundled CUDA tools) on its cubin."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        out = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if m is None:
        raise RuntimeError(f"cuobjdump -res-usage printed no resource line: {out[:500]}")
    return {"regs": int(m.group(1)), "stack": int(m.group(2)), "local": int(m.group(4)),
            "shared": kernel.metadata.shared}


def _launch_ints(n: int, T: int, C: int, bt: int, bk: int, sms: int = 132) -> dict:
    """The int arguments the coefficient launchers pass for T tokens, n streams, C channels."""
    tblocks = triton.cdiv(T, bt)
    kblocks = triton.cdiv(n * C, bk)
    splits = max(1, min(tblocks, triton.cdiv(4 * sms, kblocks), 32))
    return dict(T=T, K=n * C, J=2 * n + n * n, C=C, iters=20, tblocks=tblocks, splits=splits,
                stride_post=n, stride_res=n * n)


def compile_coeffs(n: int, dtype: str = "bf16", variant: str = "mhc", arch: int = 90, T: int = 16384, C: int = 4096) -> dict:
    """The three coeffs kernels for ``n`` streams with their CUDA launch configuration and the
    divisibility a launch at (T, n, C) in ``dtype`` has; returns {kernel name: :func:`resources`}."""
    consts, x_consts, warps = coeffs.launch_config(n, variant, gpu=True)
    ints = _launch_ints(n, T, C, consts["BT"], consts["BK"])
    xt = "*" + dtype
    out = {}
    for fn, kconsts, ptrs in (
        (coeffs._coeffs_fwd_kernel, consts, {"x_ptr": xt}),
        (coeffs._coeffs_bwd_dh_kernel, dict(coeffs.dh_consts(consts), GP=True, GHP=True, WRITE_HP=True),
         {"x_ptr": xt, "ghin_ptr": xt}),
        (coeffs._coeffs_bwd_x_kernel, dict(x_consts, GADD=True, GPRE=True, GMIX=True, GX=True),
         {"x_ptr": xt, "gx_ptr": xt, "gadd_ptr": xt, "ghin_ptr": xt, "gmix_ptr": xt}),
    ):
        kints = ints if fn is not coeffs._coeffs_bwd_x_kernel else _launch_ints(
            n, T, C, x_consts["BT"], x_consts["NP"] * x_consts["BC"])
        k = compile_kernel(fn, ptrs, {"eps": "fp32"}, kconsts, warps, 3, arch, kints)
        out[fn.__name__] = resources(k)
    return out


def compile_boundary(n: int, dtype: str = "bf16", variant: str = "mhc", arch: int = 90, T: int = 16384, C: int = 4096) -> dict:
    """The boundary kernel for ``n`` streams of ``C`` channels with its CUDA launch
    configuration (backward recompute flags on) and a launch's divisibility at (T, n, C);
    returns {kernel name: :func:`resources`}."""
    consts, warps, stages = boundary.launch_config(n, C, variant, gpu=True)
    xt = "*" + dtype
    ptrs = {"x_ptr": xt, "hout_ptr": xt, "xn_ptr": xt, "hin_ptr": xt, "ghin_ptr": xt}
    fn = boundary._boundary_fwd_kernel
    ints = _launch_ints(n, T, C, consts["BT"], consts["BC"])
    k = compile_kernel(fn, ptrs, {"eps": "fp32"}, dict(consts, WRITE_HIN=True, GHP=True), warps, stages, arch, ints)
    out = {fn.__name__: resources(k)}
    # the backward's second pass (dX' and site l's post_res backward), C split as a launch at (T, C)
    blocks, mwarps = boundary_bwd.mix_config(n, gpu=True)
    mconsts = dict(N=n, NP=consts["NP"], W=consts["W"], DOT_P=consts["DOT_P"], GADD=True, GMIX=True, **blocks)
    fn = boundary_bwd._boundary_bwd_mix_kernel
    ptrs = {"x_ptr": xt, "hout_ptr": xt, "xn_ptr": xt, "gxn_ptr": xt, "ghin_ptr": xt, "gmix_ptr": xt, "gx_ptr": xt,
            "gho_ptr": xt}
    tblocks = triton.cdiv(T, blocks["BT"])
    cblocks = triton.cdiv(C, blocks["BC"])
    chunk = triton.cdiv(cblocks, max(1, min(cblocks, triton.cdiv(2 * 132, tblocks), 8))) * blocks["BC"]
    k = compile_kernel(fn, ptrs, {}, mconsts, mwarps, 3, arch, dict(ints, C_CHUNK=chunk))
    out[fn.__name__] = resources(k)
    return out
