"""Fused Triton ``pre`` and ``post_res`` kernels (forward and backward) against the float64 reference.

On CPU the kernels run in the Triton interpreter (conftest sets TRITON_INTERPRET=1), so shapes
are tiny: n in {1, 2, 3, 4, 8}, C including 1 and values that are not a multiple of the block,
T = 1, and static (one-row) coefficients. Error bounds are stated against the float64 reference
computed from the same (already rounded) inputs:

* fp32 outputs: |err| <= 1e-6 * S, where S is the same mix applied to |inputs| (the scale of the
  summed terms; fp32 accumulation of <= 8 terms errs by a few 1e-7 of it).
* fp16 outputs: one final rounding, |err| <= 2^-11 |ref| + 1e-6 * S + 2^-24.
* bf16 outputs in the interpreter: |err| <= 2^-7 |ref| + 1e-6 * S (it truncates to bf16).
* coefficient gradients (fp32, summed over C and tokens): |err| <= 4e-6 * S.

GPU tests (marked ``gpu``) repeat this in bf16 (|err| <= 2^-8 |ref| + 1e-5 * S) on larger shapes,
and poison every output with NaN to prove each element is written.
"""
import pytest
import torch

from mhc_compile import ops, reference
from mhc_compile.kernels import _common as common_mod
from mhc_compile.kernels.post_res import post_res_backward, post_res_forward
from mhc_compile.kernels.pre import pre_backward, pre_forward

EPS32 = 1e-6
EPS_COEF = 4e-6
HALF_ULP = {torch.float32: 0.0, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
TINY = {torch.float32: 1e-30, torch.float16: 2.0**-24, torch.bfloat16: 1e-30}


# The CPU interpreter converts fp32 -> bf16 by truncation, not round-to-nearest-even as the GPU
# does (checked: triton 3.9), so one bf16 rounding there errs by up to 2^-7 relative.
INTERP_ROUND = {torch.float32: 0.0, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-7}


def assert_close_scaled(got, ref, scale, dtype, what, coef=False, acc_eps=EPS32):
    """|got - ref| <= half_ulp(dtype) |ref| + acc_eps * scale (+ tiny); coefficient grads: 4e-6 * scale."""
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    assert torch.isfinite(got).all(), what
    err = (got.double() - ref).abs()
    rounding = HALF_ULP if got.is_cuda else INTERP_ROUND
    if coef:
        bound = EPS_COEF * scale + 1e-30
    else:
        bound = rounding[dtype] * ref.abs() + acc_eps * scale + TINY[dtype]
    worst = (err - bound).max().item()
    assert worst <= 0, f"{what}: max err {err.max().item():.3g} exceeds bound by {worst:.3g}"


def make_pre(T, n, C, static, dtype, device="cpu"):
    x = torch.randn(T, n, C, device=device).to(dtype)
    h = torch.rand(1 if static else T, n, device=device)
    g = torch.randn(T, C, device=device).to(dtype)
    return x, h, g


def ref_pre(x, h, g):
    """float64 forward, grads, and the scales S of each (same math on |inputs|)."""
    x64, h64 = x.double().requires_grad_(), h.double().requires_grad_()
    y = reference.pre_mix(x64, h64)
    gx, gh = torch.autograd.grad(y, (x64, h64), g.double())
    ax, ah, ag = x.double().abs(), h.double().abs(), g.double().abs()
    s_y = reference.pre_mix(ax, ah)
    s_gx = ah.unsqueeze(-1) * ag.unsqueeze(-2).expand_as(ax)
    s_gh = (ax * ag.unsqueeze(-2)).sum(-1)
    if h.shape[0] == 1:
        s_gh = s_gh.sum(0, keepdim=True)
    return (y.detach(), gx, gh), (s_y, s_gx, s_gh)


def make_post(T, n, C, post_static, res_static, dtype, device="cpu"):
    x = torch.randn(T, n, C, device=device).to(dtype)
    ho = torch.randn(T, C, device=device).to(dtype)
    hp = 2 * torch.rand(1 if post_static else T, n, device=device)
    hr = torch.rand(1 if res_static else T, n, n, device=device)
    g = torch.randn(T, n, C, device=device).to(dtype)
    return x, ho, hp, hr, g


def ref_post(x, ho, hp, hr, g):
    ins = [t.double().requires_grad_() for t in (x, ho, hp, hr)]
    y = reference.post_res_mix(*ins)
    grads = torch.autograd.grad(y, ins, g.double())
    ax, aho, ahp, ahr, ag = (t.double().abs() for t in (x, ho, hp, hr, g))
    s_y = reference.post_res_mix(ax, aho, ahp, ahr)
    s_gx = ahr.transpose(-1, -2).expand(x.shape[0], -1, -1) @ ag
    s_gho = (ahp.unsqueeze(-1) * ag).sum(-2)
    s_ghp = (ag * aho.unsqueeze(-2)).sum(-1)
    s_ghr = ag @ ax.transpose(-1, -2)
    if hp.shape[0] == 1:
        s_ghp = s_ghp.sum(0, keepdim=True)
    if hr.shape[0] == 1:
        s_ghr = s_ghr.sum(0, keepdim=True)
    return (y.detach(), *grads), (s_y, s_gx, s_gho, s_ghp, s_ghr)


# (T, n, C, static) -- tiny for the interpreter; C=37/40 cross the interpreter's 32-wide C block
PRE_CASES = [
    (1, 1, 1, False),
    (5, 3, 37, False),
    (3, 8, 40, True),
    (8, 4, 33, False),
    (2, 2, 5, True),
    (1, 8, 3, True),  # T = 1 with a one-row coefficient
    (3, 6, 21, False),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T,n,C,static", PRE_CASES)
def test_pre_kernel(T, n, C, static, dtype):
    x, h, g = make_pre(T, n, C, static, dtype)
    (y, gx, gh), (s_y, s_gx, s_gh) = ref_pre(x, h, g)
    out = pre_forward(x, h)
    assert out.dtype == dtype and out.is_contiguous()
    assert_close_scaled(out, y, s_y, dtype, "h_in")
    kgx, kgh = pre_backward(g, x, h)
    assert kgx.dtype == dtype and kgh.dtype == torch.float32 and kgh.shape == h.shape
    assert_close_scaled(kgx, gx, s_gx, dtype, "grad x")
    assert_close_scaled(kgh, gh, s_gh, dtype, "grad h_pre", coef=True)


# (T, n, C, post_static, res_static)
POST_CASES = [
    (1, 1, 1, False, False),
    (5, 3, 37, False, False),
    (3, 8, 40, True, True),
    (4, 4, 33, True, False),
    (6, 2, 9, False, True),
    (1, 3, 17, True, True),
    (2, 5, 19, False, False),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T,n,C,post_static,res_static", POST_CASES)
def test_post_res_kernel(T, n, C, post_static, res_static, dtype):
    x, ho, hp, hr, g = make_post(T, n, C, post_static, res_static, dtype)
    refs, scales = ref_post(x, ho, hp, hr, g)
    out = post_res_forward(x, ho, hp, hr)
    assert out.dtype == dtype and out.is_contiguous()
    assert_close_scaled(out, refs[0], scales[0], dtype, "x'")
    gx, gho, ghp, ghr = post_res_backward(g, x, ho, hp, hr)
    assert gx.dtype == dtype and gho.dtype == dtype
    assert ghp.dtype == torch.float32 and ghr.dtype == torch.float32
    assert ghp.shape == hp.shape and ghr.shape == hr.shape
    assert_close_scaled(gx, refs[1], scales[1], dtype, "grad x")
    assert_close_scaled(gho, refs[2], scales[2], dtype, "grad h_out")
    assert_close_scaled(ghp, refs[3], scales[3], dtype, "grad h_post", coef=True)
    assert_close_scaled(ghr, refs[4], scales[4], dtype, "grad h_res", coef=True)


@pytest.mark.parametrize("static", [False, True])
def test_backward_loops_over_C_in_one_program(monkeypatch, static):
    """One program per token block walks all of C (3 blocks of 32, tail masked) and accumulates
    the coefficient gradients across iterations; also the split path's partial sums agree."""
    monkeypatch.setattr(common_mod, "c_splits", lambda *a: 1)  # mix_bwd_grid of pre and post_res
    T, n, C = 3, 3, 70
    x, h, g = make_pre(T, n, C, static, torch.float32)
    (_, gx, gh), (_, s_gx, s_gh) = ref_pre(x, h, g)
    kgx, kgh = pre_backward(g, x, h)
    assert_close_scaled(kgx, gx, s_gx, torch.float32, "grad x")
    assert_close_scaled(kgh, gh, s_gh, torch.float32, "grad h_pre", coef=True)
    x, ho, hp, hr, g = make_post(T, n, C, static, static, torch.float32)
    refs, scales = ref_post(x, ho, hp, hr, g)
    for got, ref, s, what in zip(post_res_backward(g, x, ho, hp, hr), refs[1:], scales[1:], ("gx", "gho", "ghp", "ghr")):
        assert_close_scaled(got, ref, s, torch.float32, what, coef=what in ("ghp", "ghr"))


def test_every_output_element_written_cpu():
    """NaN-poisoned preallocated outputs: any element a kernel skipped would stay NaN."""
    T, n, C = 5, 3, 37
    x, h, g = make_pre(T, n, C, False, torch.float32)
    out = torch.full((T, C), float("nan"))
    gx = torch.full((T, n, C), float("nan"))
    assert torch.isfinite(pre_forward(x, h, out=out)).all()
    assert torch.isfinite(pre_backward(g, x, h, gx=gx)[0]).all()
    x, ho, hp, hr, g = make_post(T, n, C, False, False, torch.float32)
    out = torch.full((T, n, C), float("nan"))
    gx = torch.full((T, n, C), float("nan"))
    gho = torch.full((T, C), float("nan"))
    assert torch.isfinite(post_res_forward(x, ho, hp, hr, out=out)).all()
    res = post_res_backward(g, x, ho, hp, hr, gx=gx, gh_out=gho)
    assert all(torch.isfinite(r).all() for r in res)


def test_bad_coefficient_rows_rejected():
    x = torch.randn(4, 2, 8)
    with pytest.raises(ValueError):
        pre_forward(x, torch.rand(3, 2))
    with pytest.raises(ValueError):
        post_res_forward(x, torch.randn(4, 8), torch.rand(4, 2), torch.rand(2, 2, 2))


@pytest.mark.parametrize("static", [False, True])
def test_ops_autograd_with_triton_kernels(static):
    """torch.ops.mhc.pre / post_res with kernels='triton' (leading dims (2, 3)) through autograd."""
    B, S, n, C = 2, 3, 4, 19
    x = torch.randn(B, S, n, C)
    lead = (1, 1) if static else (B, S)
    hp_pre = torch.rand(*lead, n)
    hp = 2 * torch.rand(*lead, n)
    hr = torch.rand(*lead, n, n)
    w = torch.randn(C)

    def site(x_, hpre_, hp_, hr_, pre, post_res):
        h_in = pre(x_, hpre_)
        h_out = torch.tanh(h_in) * w.to(h_in.dtype)
        return post_res(x_, h_out, hp_, hr_)

    leaves = [t.clone().requires_grad_() for t in (x, hp_pre, hp, hr)]
    y = site(
        *leaves,
        lambda *a: torch.ops.mhc.pre(*a, "triton"),
        lambda *a: torch.ops.mhc.post_res(*a, "triton"),
    )
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, g)
    # float64 reference: the plain-torch spec under ordinary autograd
    leaves64 = [t.double().requires_grad_() for t in (x, hp_pre, hp, hr)]
    y64 = site(*leaves64, reference.pre_mix, reference.post_res_mix)
    grads64 = torch.autograd.grad(y64, leaves64, g.double())
    assert y.shape == x.shape
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    for got, ref, leaf in zip(grads, grads64, leaves):
        assert got.shape == leaf.shape and got.dtype == leaf.dtype
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=2e-5)


def test_compiled_graph_with_triton_kernels():
    """torch.compile (aot_eager: fake-tensor tracing, then the real kernels) of pre -> f -> post_res
    forward and backward, fullgraph: the fake impls' shapes/strides agree with what the kernels return."""
    T, n, C = 4, 3, 24
    x = torch.randn(2, T, n, C)
    hpre, hp, hr = torch.rand(2, T, n), 2 * torch.rand(2, T, n), torch.rand(1, 1, n, n)

    def site(x_, a, b, c):
        h_in = torch.ops.mhc.pre(x_, a, "triton")
        return torch.ops.mhc.post_res(x_, torch.sin(h_in), b, c, "triton")

    compiled = torch.compile(site, backend="aot_eager", fullgraph=True)
    leaves = [t.clone().requires_grad_() for t in (x, hpre, hp, hr)]
    y = compiled(*leaves)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, g)
    leaves64 = [t.double().requires_grad_() for t in (x, hpre, hp, hr)]
    y64 = reference.post_res_mix(leaves64[0], torch.sin(reference.pre_mix(leaves64[0], leaves64[1])), *leaves64[2:])
    grads64 = torch.autograd.grad(y64, leaves64, g.double())
    assert y.is_contiguous() and y.shape == x.shape
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    for got, ref in zip(grads, grads64):
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=2e-5)


def test_gradcheck_float64_through_ops():
    """float64 inputs accumulate in float64 inside the kernels: torch.autograd.gradcheck passes."""
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    h_pre = torch.rand(2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: ops.pre(a, b, kernels="triton"), (x, h_pre))
    ho = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    hp = torch.rand(1, 3, dtype=torch.float64, requires_grad=True)
    hr = torch.rand(2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: ops.post_res(*a, kernels="triton"), (x, ho, hp, hr))


# ============================================================================ GPU (bf16)
GPU_CASES = [(1, 1, 1), (257, 3, 1000), (64, 4, 2048), (300, 8, 777), (1024, 2, 4096)]


@pytest.mark.gpu
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("T,n,C", GPU_CASES)
def test_pre_kernel_bf16_cuda(T, n, C, static):
    dtype = torch.bfloat16
    x, h, g = make_pre(T, n, C, static, dtype, "cuda")
    (y, gx, gh), (s_y, s_gx, s_gh) = ref_pre(x, h, g)
    out = pre_forward(x, h, out=torch.full((T, C), float("nan"), dtype=dtype, device="cuda"))
    assert_close_scaled(out, y, s_y, dtype, "h_in", acc_eps=1e-5)
    kgx, kgh = pre_backward(g, x, h, gx=torch.full_like(x, float("nan")))
    assert_close_scaled(kgx, gx, s_gx, dtype, "grad x", acc_eps=1e-5)
    assert_close_scaled(kgh, gh, s_gh, dtype, "grad h_pre", coef=True)


@pytest.mark.gpu
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("T,n,C", GPU_CASES)
def test_post_res_kernel_bf16_cuda(T, n, C, static):
    dtype = torch.bfloat16
    x, ho, hp, hr, g = make_post(T, n, C, static, static, dtype, "cuda")
    refs, scales = ref_post(x, ho, hp, hr, g)
    out = post_res_forward(x, ho, hp, hr, out=torch.full_like(x, float("nan")))
    assert_close_scaled(out, refs[0], scales[0], dtype, "x'", acc_eps=1e-5)
    got = post_res_backward(g, x, ho, hp, hr, gx=torch.full_like(x, float("nan")), gh_out=torch.full_like(ho, float("nan")))
    for k, what in enumerate(("gx", "gho", "ghp", "ghr")):
        coef = what in ("ghp", "ghr")
        assert_close_scaled(got[k], refs[k + 1], scales[k + 1], dtype, what, coef=coef, acc_eps=1e-5)


@pytest.mark.gpu
def test_ops_auto_dispatch_cuda_bf16():
    """kernels='auto' on CUDA reaches the Triton kernels and matches the reference path."""
    x = torch.randn(4, 128, 4, 512, device="cuda", dtype=torch.bfloat16)
    h = torch.rand(4, 128, 4, device="cuda")
    a = ops.pre(x, h, kernels="auto")
    b = ops.pre(x, h, kernels="reference")
    torch.testing.assert_close(a.float(), b.float(), rtol=2**-7, atol=1e-2)


# ============================================================================ sm_90 compile (no GPU needed)
_AOT_SCRIPT = r'''
import json, os, re, subprocess, sys, tempfile
import torch, triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from mhc_compile.kernels import pre, post_res
from mhc_compile.kernels._common import mix_blocks, next_power_of_2

tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
out = {}
for n in (1, 3, 8):
    C, np_ = 1024, next_power_of_2(n)
    bf = {"x_ptr", "g_ptr", "ho_ptr", "out_ptr", "gx_ptr", "gho_ptr"}
    for fn, bwd in ((pre._pre_fwd_kernel, False), (pre._pre_bwd_kernel, True),
                    (post_res._post_res_fwd_kernel, False), (post_res._post_res_bwd_kernel, True)):
        bt, bc, warps = mix_blocks(16384, n, C, torch.device("cuda"), 2, backward=bwd)
        consts = dict(N=n, N_PAD=np_, BLOCK_T=bt, BLOCK_C=bc, ACC=tl.float32)
        for flag in ("H_STATIC", "POST_STATIC", "RES_STATIC"):
            if flag in fn.arg_names:
                consts[flag] = False
        if "WRITE_GX" in fn.arg_names:
            consts["WRITE_GX"] = True  # the heavier variant
        sig, attrs = {}, {}
        for i, a in enumerate(fn.arg_names):
            if a in consts:
                sig[a] = "constexpr"
            elif a.endswith("_ptr"):
                sig[a] = "*bf16" if a in bf else "*fp32"
                attrs[(i,)] = [["tt.divisibility", 16]]
            else:
                sig[a] = "i32"
                if a in ("C", "C_CHUNK"):
                    attrs[(i,)] = [["tt.divisibility", 16]]
        try:
            src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()}, attrs=attrs)
        except TypeError as e:  # this triton's AOT API differs from 3.9's
            print("AOTSKIP", e)
            sys.exit(0)
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
        with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
            f.write(k.asm["cubin"])
        res = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res)
        # the (n_pad, BLOCK_T, BLOCK_C) stream tile's layout: 8 bf16 (16 bytes) per thread along C,
        # and no threads or warps along the stream axis (n-way reductions stay in a thread)
        lay = re.search(r"sizePerThread = \[1, 1, 8\], threadsPerWarp = \[(\d+), \d+, \d+\], warpsPerCTA = \[(\d+),", k.asm["ttgir"])
        out[f"{fn.__name__}/n={n}"] = {"regs": int(m.group(1)), "stack": int(m.group(2)), "local": int(m.group(4)),
                                       "vector16": lay is not None,
                                       "stream_in_thread": lay is not None and lay.group(1) == "1" and lay.group(2) == "1"}
print("AOT" + json.dumps(out))
'''


def test_kernels_compile_for_sm90_without_spills():
    """Compile the four kernels ahead of time for an H100 (sm_90, bf16, C=1024, n = 1, 3, 8) with
    the launch blocks the wrappers use on CUDA: no register spills (stack 0), the stream tiles
    get 16-byte vector accesses along C (8 bf16 per thread), and the stream axis lives inside
    each thread (no cross-warp reductions for the n-way mixes) -- checks that need no GPU."""
    import json
    import os
    import subprocess
    import sys

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        pytest.skip("triton's bundled CUDA tools are not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    if "AOTSKIP" in proc.stdout:
        pytest.skip("triton's ahead-of-time compile API differs: " + proc.stdout.strip()[:200])
    lines = [l for l in proc.stdout.splitlines() if l.startswith("AOT{")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    usage = json.loads(lines[-1][3:])
    assert len(usage) == 12
    for name, u in usage.items():
        assert u["stack"] == 0 and u["local"] == 0, (name, u)
        assert u["regs"] <= 255, (name, u)
        assert u["vector16"], (name, "stream tile not vectorised to 16 bytes")
        assert u["stream_in_thread"], (name, "stream axis split across threads or warps")
