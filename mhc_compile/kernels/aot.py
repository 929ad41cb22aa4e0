"""Ahead-of-time compilation of the coefficient kernels for a CUDA target, without a GPU.

Owns the tooling that proves the GPU launch configurations compile (Triton's bundled ptxas) and
fit in shared memory: :func:`compile_kernel` for any ``@triton.jit`` kernel, and
:func:`compile_coeffs` / :func:`compile_boundary`, which compile the three coeffs kernels and
the boundary kernel with exactly the constexprs, warps and stages their launchers use on CUDA
(``coeffs.launch_config`` / ``boundary.launch_config`` with ``gpu=True``). Used by
tests/test_kernel_coeffs.py in a subprocess; needs TRITON_INTERPRET unset (jitted, not
interpreted, functions). Nothing here runs at model time.
"""
from __future__ import annotations

import triton

from . import boundary, coeffs


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


def compile_kernel(fn, ptr_types: dict, scalars: dict, consts: dict, num_warps: int, num_stages: int = 3, arch: int = 90):
    """Compile a ``@triton.jit`` kernel for CUDA ``sm_<arch>``; returns the compiled kernel
    (``.metadata.shared``, ``.asm["cubin"]``). See :func:`signature` for the argument types."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=fn, signature=signature(fn, ptr_types, scalars, consts), constexprs=consts)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "num_stages": num_stages})


def compile_coeffs(n: int, dtype: str = "bf16", variant: str = "mhc", arch: int = 90) -> dict:
    """The three coeffs kernels for ``n`` streams with their CUDA launch configuration (x in
    ``dtype``); returns {kernel name: shared memory bytes}."""
    consts, x_consts, warps = coeffs.launch_config(n, variant, gpu=True)
    xt = "*" + dtype
    out = {}
    for fn, kconsts, ptrs in (
        (coeffs._coeffs_fwd_kernel, consts, {"x_ptr": xt}),
        (coeffs._coeffs_bwd_dh_kernel, consts, {"x_ptr": xt}),
        (coeffs._coeffs_bwd_x_kernel, dict(x_consts, EXTRA=True), {"x_ptr": xt, "gx_ptr": xt, "gadd_ptr": xt, "ghin_ptr": xt}),
    ):
        k = compile_kernel(fn, ptrs, {"eps": "fp32"}, kconsts, warps, 3, arch)
        out[fn.__name__] = k.metadata.shared
    return out


def compile_boundary(n: int, dtype: str = "bf16", variant: str = "mhc", arch: int = 90, C: int = 4096) -> dict:
    """The boundary kernel for ``n`` streams of ``C`` channels with its CUDA launch
    configuration (backward recompute flags on); returns {kernel name: shared memory bytes}."""
    consts, warps, stages = boundary.launch_config(n, C, variant, gpu=True)
    xt = "*" + dtype
    ptrs = {"x_ptr": xt, "hout_ptr": xt, "xn_ptr": xt, "hin_ptr": xt, "ghin_ptr": xt}
    fn = boundary._boundary_fwd_kernel
    k = compile_kernel(fn, ptrs, {"eps": "fp32"}, dict(consts, WRITE_HIN=True, GHP=True), warps, stages, arch)
    return {fn.__name__: k.metadata.shared}
