"""sm_90 resources of every coefficient kernel as a real launch compiles it, without a GPU.

``kernels.aot`` compiles the coeffs kernels (forward, backward dh, backward x with the boundary's
EXTRA terms) and the boundary kernel (backward recompute flags on) with the constexprs, warps and
stages their launchers use on CUDA and the 16-byte divisibility attributes of a launch at
(T, n, C = 4096) (Triton's bundled ptxas), then reads registers, spills and shared memory with
cuobjdump. Asserted: no spills (stack and local 0), at most 255 registers, shared memory within
sm_90's 227 KiB, for n <= 4 in bf16 and fp32, at T = 16384 and at a decode T = 8 (T then loses its
divisibility). Skipped unless triton's NVIDIA backend and its CUDA tools are importable. Each case
runs in a subprocess (the test process may have TRITON_INTERPRET=1) and takes ~30 s on one core.
"""
import json
import os
import subprocess
import sys

import pytest

SCRIPT = """
import json, sys
from mhc_compile.kernels import aot
n, dtype, T = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
res = {**aot.compile_coeffs(n, dtype, T=T), **aot.compile_boundary(n, dtype, T=T)}
print("AOT" + json.dumps(res))
"""


def _nvidia_tools() -> bool:
    try:
        import triton
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        return False
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return os.path.exists(tool)


@pytest.mark.slow
@pytest.mark.skipif(not _nvidia_tools(), reason="triton's sm_90 compiler path (NVIDIA backend, cuobjdump) is not importable")
@pytest.mark.parametrize("n,dtype,T", [(4, "bf16", 16384), (4, "fp32", 16384), (4, "bf16", 8),
                                       (3, "bf16", 16384), (2, "fp32", 16384), (1, "bf16", 16384)])
def test_sm90_no_spills(n, dtype, T):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(n), dtype, str(T)], env=env,
                          capture_output=True, text=True, timeout=600)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("AOT{")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    res = json.loads(lines[-1][3:])
    assert set(res) == {"_coeffs_fwd_kernel", "_coeffs_bwd_dh_kernel", "_coeffs_bwd_x_kernel", "_boundary_fwd_kernel",
                        "_boundary_bwd_mix_kernel"}
    for name, r in res.items():
        assert r["stack"] == 0 and r["local"] == 0, (name, r, "register spills")
        assert r["regs"] <= 255, (name, r)
        assert 0 < r["shared"] <= 227 * 1024, (name, r)
    print(json.dumps(res))
