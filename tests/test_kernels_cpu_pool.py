"""The CPU kernels' output cache (mhc_compile/kernels_cpu/pool.h).

Large outputs (stream-sized) come from a cache of freed buffers. What must hold: a buffer still in
use is never handed out again (a kept output keeps its values while later calls run), freed
buffers are reused (hits counted), the budget bounds what is kept (0: nothing), release returns
it, cached outputs are ordinary tensors (resize, autograd), and a bad MHC_CPU_POOL_MB is a clear
error.
"""
import os
import subprocess
import sys

import pytest
import torch

from mhc_compile import kernels_cpu, ops
from mhc_compile import reference as R

pytestmark = pytest.mark.skipif(not kernels_cpu.available(), reason=f"CPU kernels not built: {kernels_cpu.build_error()}")

T, N, C = 67, 4, 320  # T * N * C * 4 bytes = 343 KB: over the cache's 64 KiB floor


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, N, C, generator=g)
    h_out = torch.randn(T, C, generator=g)
    h_post = torch.rand(T, N, generator=g) * 2
    h_res = torch.softmax(torch.randn(T, N, N, generator=g), -1)
    return x, h_out, h_post, h_res


def _post_res(args):
    return torch.ops.mhc_cpu.post_res_fwd(*args)


@pytest.fixture
def limit():
    old = kernels_cpu.set_output_cache_limit(1024)
    kernels_cpu.release_cached_memory()
    yield
    kernels_cpu.set_output_cache_limit(old)


def test_freed_outputs_are_reused_and_kept_outputs_are_never_handed_out_again(limit):
    a, b = _inputs(0), _inputs(1)
    want_a = R.post_res_mix(*a)
    want_b = R.post_res_mix(*b)
    kept = _post_res(a)
    before = kernels_cpu.output_cache_stats()
    for _ in range(5):  # each output freed at once: the same buffer comes back
        out = _post_res(b)
        torch.testing.assert_close(out, want_b, rtol=1e-5, atol=1e-5)
        del out
    after = kernels_cpu.output_cache_stats()
    assert after["hits"] - before["hits"] == 4  # the first call of the loop allocated, the next four reused
    assert after["misses"] - before["misses"] == 1
    assert after["cached_bytes"] == T * N * C * 4 + (-(T * N * C * 4) % 4096)  # one buffer, rounded to pages
    torch.testing.assert_close(kept, want_a, rtol=1e-5, atol=1e-5)  # untouched by the five later calls


def test_budget_zero_keeps_nothing_and_release_returns_what_is_kept(limit):
    out = _post_res(_inputs(0))
    del out
    kept = kernels_cpu.output_cache_stats()["cached_bytes"]
    assert kept >= T * N * C * 4
    assert kernels_cpu.set_output_cache_limit(0) == 1024
    hits = kernels_cpu.output_cache_stats()["hits"]
    for _ in range(3):
        out = _post_res(_inputs(2))
        del out
    stats = kernels_cpu.output_cache_stats()
    assert stats["hits"] == hits and stats["budget_bytes"] == 0
    assert stats["cached_bytes"] == kept  # what was kept stays until released
    assert kernels_cpu.release_cached_memory() == kept
    assert kernels_cpu.output_cache_stats()["cached_bytes"] == 0


def test_budget_bounds_the_cache(limit):
    kernels_cpu.set_output_cache_limit(1)  # 1 MiB: three 344 KB buffers fit, a fourth does not
    outs = [_post_res(_inputs(i)) for i in range(6)]
    del outs
    assert 0 < kernels_cpu.output_cache_stats()["cached_bytes"] <= 1 << 20


def test_cached_outputs_are_ordinary_tensors(limit):
    args = _inputs(3)
    out = _post_res(args)
    want = out.clone()
    out.resize_(T * 2, N, C)  # grows through the cache's allocator, keeps the first half
    torch.testing.assert_close(out[:T], want)
    out.resize_(5)
    assert out.shape == (5,)
    # through the op and autograd at perturbed parameters: gradients equal the reference's
    x, h_out, h_post, h_res = (t.double().requires_grad_() for t in args)
    got = ops.post_res(x, h_out, h_post, h_res, "auto")
    ref = R.post_res_mix(x, h_out, h_post, h_res)
    g = torch.randn(got.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    grads = torch.autograd.grad(got, (x, h_out, h_post, h_res), g)
    want_grads = torch.autograd.grad(ref, (x, h_out, h_post, h_res), g)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("value", ["lots", "-5", "1.5"])
def test_a_bad_pool_size_in_the_environment_is_a_clear_error(value):
    code = "from mhc_compile import kernels_cpu; kernels_cpu.available()"
    env = {**os.environ, "MHC_CPU_POOL_MB": value}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "MHC_CPU_POOL_MB" in proc.stderr and "whole number of megabytes" in proc.stderr


def test_the_limit_setter_rejects_bad_values():
    for bad in (-1, 1.5, True, "8"):
        with pytest.raises(ValueError, match="whole number of megabytes"):
            kernels_cpu.set_output_cache_limit(bad)
