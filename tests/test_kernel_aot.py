"""sm_90 resources of every coefficient kernel as a real launch compiles it, without a GPU.

``kernels.aot`` compiles the kernels a launch at (T, n, C = 4096) runs: the coeffs forward (at
decode shapes its split-K part and finish kernels), backward dh, backward x with the boundary's
EXTRA terms, the boundary kernel (backward recompute flags on; split-K and its finish kernel
at decode shapes) and the boundary backward's mix kernel (dX' and site l's post_res backward), with the constexprs, warps and stages their launchers use on CUDA and the
16-byte divisibility attributes of the launch (Triton's bundled ptxas), then reads registers,
spills and shared memory with cuobjdump and counts wgmma instructions in the PTX. Asserted
(machine-independent facts of the compile and of the launch grid): no spills (stack and local
0), at most 255 registers, shared memory within sm_90's 227 KiB, for n <= 4 in bf16 and fp32, at
T = 16384, 256 and a decode T = 8 (T then loses its divisibility; n = 3 in fp32, where the
coeffs backward kernels spilled on triton 3.9 before their n_pad = 4 tiles shrank, at both);
the boundary's projection on wgmma with >= 2 CTAs per SM (registers x threads and shared memory
against an SM's 64 K registers and 228 KiB); at T <= 256 the coeffs forward and the boundary launch >= 64 CTAs
(split-K, for the 132 SMs of an H100 / H200; the coeffs forward 48 at n = 3, its split's
least share), the boundary's finish (h_in) kernel >= 16. At n = 8 (bf16 T = 16384, fp32 T = 8)
only the backward's kernels are asserted spill-free: coeffs dh and x, the mix kernel (n = 6: dh
and x).
Skipped unless triton's NVIDIA backend and its CUDA tools are importable. Each case runs in a
subprocess (the test process may have TRITON_INTERPRET=1) and takes ~6-15 s on one core (cold cache).
The full table (n = 1 ... 8, both dtypes, triton 3.6 and 3.9): benchmarks/bench_aot.py.
"""
import json
import os
import subprocess
import sys

import pytest

SCRIPT = """
import json, sys
from mhc_compile.kernels import aot
n, dtype, T, which = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
res = aot.compile_boundary(n, dtype, T=T) if which != "coeffs" else {}
if which != "boundary":
    res.update(aot.compile_coeffs(n, dtype, T=T))
print("AOT" + json.dumps(res))
"""
BOUNDARY = {"_boundary_fwd_kernel", "_boundary_bwd_mix_kernel"}
COEFFS = {"_coeffs_fwd_kernel", "_coeffs_bwd_dh_kernel", "_coeffs_bwd_x_kernel"}
SPLIT_B = {"_boundary_fwd_kernel", "_finish_kernel(boundary)", "_boundary_bwd_mix_kernel"}
SPLIT_C = {"_coeffs_part_kernel", "_finish_kernel(coeffs)", "_coeffs_bwd_dh_kernel", "_coeffs_bwd_x_kernel"}


def _nvidia_tools() -> bool:
    try:
        import triton
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        return False
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return os.path.exists(tool)


def _compile(n: int, dtype: str, T: int, which: str) -> dict:
    """{kernel name: aot.resources} of the launch at (T, n, C = 4096), compiled in a subprocess."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(n), dtype, str(T), which], env=env,
                          capture_output=True, text=True, timeout=600)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("AOT{")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][3:])


@pytest.mark.slow
@pytest.mark.skipif(not _nvidia_tools(), reason="triton's sm_90 compiler path (NVIDIA backend, cuobjdump) is not importable")
@pytest.mark.parametrize("n,dtype,T,which", [
    (4, "bf16", 16384, "all"), (4, "fp32", 16384, "all"), (4, "bf16", 8, "all"), (4, "fp32", 256, "all"),
    (3, "bf16", 16384, "all"), (3, "fp32", 16384, "all"), (3, "fp32", 8, "all"), (2, "fp32", 16384, "all"),
    (2, "bf16", 16384, "boundary"), (1, "bf16", 16384, "all")])
def test_sm90_no_spills(n, dtype, T, which):
    res = _compile(n, dtype, T, which)
    decode = T <= 256
    assert set(res) == (SPLIT_B if decode else BOUNDARY) | (set() if which != "all" else SPLIT_C if decode else COEFFS)
    for name, r in res.items():
        assert r["stack"] == 0 and r["local"] == 0, (name, r, "register spills")
        assert r["regs"] <= 255, (name, r)
        assert 0 < r["shared"] <= 227 * 1024, (name, r)
    # the boundary's projection on tensor cores (wgmma), >= 2 CTAs resident per SM
    b = res["_boundary_fwd_kernel"]
    assert b["wgmma"] > 0 and b["ctas_per_sm"] >= 2, b
    if decode:  # split-K fills the GPU at decode shapes
        assert b["grid_ctas"] >= 64 and res["_finish_kernel(boundary)"]["grid_ctas"] >= 16, res
        if which == "all":  # each split takes >= 4 K blocks of 64 columns: 48 CTAs at n = 3
            assert res["_coeffs_part_kernel"]["grid_ctas"] >= min(64, n * 4096 // (4 * 64)), res
    print(json.dumps(res))


@pytest.mark.slow
@pytest.mark.skipif(not _nvidia_tools(), reason="triton's sm_90 compiler path (NVIDIA backend, cuobjdump) is not importable")
@pytest.mark.parametrize("n,dtype,T,which", [(8, "bf16", 16384, "all"), (8, "fp32", 8, "all"),
                                             (6, "bf16", 16384, "coeffs"), (6, "fp32", 8, "coeffs")])
def test_sm90_n8_backward_tiles_no_spills(n, dtype, T, which):
    """n_pad = 8: the backward's 16-token tiles spill nothing: the gx kernel's and the mix
    kernel's (32-token tiles spilled 56-760 B) and the dh kernel's, its own grid (with the
    forward's 32-token tiles triton 3.6 spilled 24 B in bf16 at n = 6 and 8)."""
    res = _compile(n, dtype, T, which)
    names = ["_coeffs_bwd_dh_kernel", "_coeffs_bwd_x_kernel"] + (["_boundary_bwd_mix_kernel"] if which == "all" else [])
    for name in names:
        r = res[name]
        assert r["stack"] == 0 and r["local"] == 0 and r["regs"] <= 255, (name, r, "register spills")
        assert 0 < r["shared"] <= 227 * 1024, (name, r)
