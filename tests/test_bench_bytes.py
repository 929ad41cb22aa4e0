"""The byte counter (benchmarks/bytecount.py) and the exact per-site byte and launch counts of the
current kernel design (benchmarks/bench_bytes.py), at n = 4 through the Triton interpreter.

The counts are exact for a design: a change that moves more (or fewer) bytes must update these
numbers and the table in docs/benchmarks.md together."""
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                                reason="counts interpreted Triton launches (TRITON_INTERPRET=1)")


def _load(name):
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bytecount():
    return _load("bytecount")


@pytest.fixture(scope="module")
def bench():
    return _load("bench_bytes")


def test_counter_hooks_triton_interpreter(bytecount):
    """Canary for the private triton internals the counter wraps: a masked copy kernel moves
    exactly the bytes of its active lanes, the launch is counted, and a torch op between kernels
    is counted with its inputs and outputs (a view is not)."""
    import triton
    import triton.language as tl

    @triton.jit
    def copy_kernel(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=m), mask=m)

    T, C = 5, 8
    src = torch.randn(T * C)
    dst = torch.empty_like(src)
    with bytecount.ByteCounter(T, C) as t:
        copy_kernel[(triton.cdiv(T * C, 16),)](src, dst, T * C, BLOCK=16)  # 48 lanes, 40 active
        (dst.view(T, C) * 2).reshape(-1)
    assert torch.equal(src, dst)
    assert t.triton == 1 and t.torch == 1
    assert t.kernels == ["triton:copy_kernel", "torch:mul"]
    assert t.stream == 2 * 40 * 4 + 2 * 40 * 4  # kernel: read + write; mul: input + output
    assert t.coeff == 0 and t.per_call == 0


def test_counter_classifies_tensors(bytecount):
    t = bytecount.Tally(T=7, C=16)
    t.add(7 * 16 * 3, 100, "a")   # stream-sized (3 C per token)
    t.add(7 * 4, 10, "b")         # per-token coefficient
    t.add(16 * 24, 1, "c")        # per-call (a phi)
    assert (t.stream, t.coeff, t.per_call) == (100, 10, 1)
    assert t.units(2) == pytest.approx(100 / (7 * 16 * 2))


# per site at n = 4 (bf16): stream bytes per token in units of C*e, Triton launches, torch ops.
# floor: forward 2n+2 = 10, backward 3n+3 = 15.
# Before the site mailbox (mhc_compile/site_grad.py) the backward was site 59 / 4 / 12, boundary
# 44 / 4 / 10 and block2 51.5 / 4 / 11.5: autograd's two adds of dX (6n), pre's and post_res's
# own dX (2n) and the gx kernel's n reloads of g_hin (n - 1) are gone. Then site 32 / 4 / 10,
# boundary 41 / 4 / 10, block2 36.5 / 4 / 10.5; the two-pass backward (pre's dH_pre from the coeffs
# dh kernel's pass over X; the boundary from its saved X', dX' never written; site 2's post_res
# handing its mix's gradient to the boundary) gave boundary 28 and block2 28; the boundary's mix
# pass recomputing X' from the X and h_out it reads (no read of X', n >= 4) gives these.
EXPECTED = {
    "site": {"fwd": (18, 3, 0), "bwd": (28, 3, 9)},
    "boundary": {"fwd": (14, 1, 0), "bwd": (24, 3, 7)},
    "block2": {"fwd": (16, 2, 0), "bwd": (26, 3, 8.5)},
}


@pytest.mark.parametrize("path", sorted(EXPECTED))
def test_bytes_per_site_n4(bench, path):
    rows = {r["pass"]: r for r in bench.count_path(path, 4, T=37, C=64)}
    got = {p: (rows[p]["units"], rows[p]["triton"], rows[p]["torch"]) for p in ("fwd", "bwd")}
    assert got == EXPECTED[path], (got, rows["bwd"]["kernels"])
    assert rows["fwd+bwd"]["floor"] == 25


def test_converted_model_runs_the_block2_path(bench, bytecount, monkeypatch):
    """What bench_bytes counts as `block2` is what a converted pre-norm GPT's blocks run: the same
    Triton launches, in order, forward and backward, per layer, and the site mailbox joins each
    layer's first-site dX (the boundary's and pre's hand-overs) and its second site's dX' (its post_res hands
    its mix's gradient to the boundary)."""
    import mhc_compile
    from mhc_compile import MHCConfig, site_grad
    from mhc_compile.models import TinyGPT

    handed = []
    orig = site_grad.SiteGrad.add
    monkeypatch.setattr(site_grad.SiteGrad, "add", lambda self, **kw: (handed.append(kw), orig(self, **kw))[1])
    layers, T = 2, 8
    model = TinyGPT(vocab=64, dim=32, layers=layers, heads=2, max_len=16)
    idx = torch.randint(0, 64, (1, T))
    converted = mhc_compile.convert(model, MHCConfig(streams=4, kernels="triton"), (idx,))
    with bytecount.ByteCounter(T, 32) as fwd:
        out = converted(idx)
    with bytecount.ByteCounter(T, 32) as bwd:
        out.float().square().sum().backward()
    joined = len(handed)
    rows = {r["pass"]: r for r in bench.count_path("block2", 4, T=T, C=32)}

    def triton(kernels):
        return [k for k in kernels if k.startswith("triton:")]

    assert triton(fwd.kernels) == triton(rows["fwd"]["kernels"]) * layers
    assert triton(bwd.kernels) == triton(rows["bwd"]["kernels"]) * layers
    assert joined == 3 * layers
