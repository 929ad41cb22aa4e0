"""A chain's two ends on the CPU: ``ops.expand`` / ``ops.collapse`` and ``kernels_cpu/ends.cpp``.

The kernels match the reference (the expansion bit for bit, a copy; the sum over the streams in stream
order, the mean that sum divided by n, rounded once) for every float dtype, n = 1..8, odd shapes, non-contiguous input and two threads. The
ops take them only in an eager CPU call that needs no gradient, with ``kernels="auto"``: a gradient,
the reference kernels, a learned collapse and ``torch.compile`` keep aten's ops. In a converted TinyGPT
(blocks form) at perturbed mHC parameters the eval forward runs each once and matches the same
model with the aten ends; their outputs come from the kernels' output cache.
"""
import pytest
import torch

from mhc_compile import MHCConfig, convert, kernels_cpu, ops, reference
from mhc_compile.kernels_cpu import launch
from mhc_compile.models import TinyGPT
from tests._convert_checks import compiled_no_grad
from tests._invariants import perturb_mhc

pytestmark = pytest.mark.skipif(not kernels_cpu.available(), reason=f"CPU kernels not built: {kernels_cpu.build_error()}")

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _rand(*shape, dtype, seed):
    return (3 * torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) + 1).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead", [(1,), (7,), (2, 33)])
@pytest.mark.parametrize("n", [1, 3, 4, 8])
def test_expand_kernel_gives_the_reference_bits(dtype, lead, n):
    x = _rand(*lead, 13, dtype=dtype, seed=n)
    out = launch.expand_forward(x, n)
    assert out.shape == (*lead, n, 13) and out.is_contiguous()
    assert torch.equal(out, reference.expand(x, n))
    xt = _rand(13, *lead, dtype=dtype, seed=n + 1).movedim(0, -1)  # not contiguous
    assert torch.equal(launch.expand_forward(xt, n), reference.expand(xt, n))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead", [(1,), (7,), (2, 33)])
@pytest.mark.parametrize("n", [1, 3, 4, 8])
@pytest.mark.parametrize("mode", ["mean", "sum"])
def test_collapse_kernel_matches_the_reference(dtype, lead, n, mode):
    x = _rand(*lead, n, 13, dtype=dtype, seed=n)
    out = launch.collapse_forward(x, mode == "mean")
    ref = reference.collapse(x, mode)
    assert out.shape == ref.shape == (*lead, 13) and out.dtype == dtype
    # the streams added in order in the compute type, rounded once: aten's sum, up to how it pairs the terms
    exact = reference.collapse(x.double(), mode)
    tol = {torch.float64: 1e-13, torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype]
    assert ((out.double() - exact).abs() <= tol * (1 + exact.abs())).all()
    assert ((out.double() - ref.double()).abs() <= tol * (1 + exact.abs())).all()
    if n <= 4 and len(lead) == 2:  # several tokens and few streams: aten adds them in order too
        assert torch.equal(out, ref)
    xt = x.transpose(-1, -2).contiguous().transpose(-1, -2)  # not contiguous
    assert torch.equal(launch.collapse_forward(xt, mode == "mean"), out)


def test_ends_kernels_on_two_threads_split_tokens_the_same():
    old = torch.get_num_threads()
    x, xs = _rand(3000, 40, dtype=torch.float32, seed=0), _rand(3000, 4, 40, dtype=torch.float32, seed=1)
    try:
        torch.set_num_threads(2)
        two = launch.expand_forward(x, 4), launch.collapse_forward(xs, True)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(two[0], reference.expand(x, 4))
    assert torch.equal(two[1], reference.collapse(xs, "mean"))


@pytest.fixture
def calls(monkeypatch):
    """Counts the launches of the two kernels (each still runs)."""
    seen = {"expand": 0, "collapse": 0}

    def counted(name, fn):
        def run(*args):
            seen[name] += 1
            return fn(*args)
        return run

    monkeypatch.setattr(launch, "expand_forward", counted("expand", launch.expand_forward))
    monkeypatch.setattr(launch, "collapse_forward", counted("collapse", launch.collapse_forward))
    return seen


def test_ops_take_the_kernels_only_in_an_eager_call_without_gradient(calls):
    x = _rand(5, 6, dtype=torch.float32, seed=0)
    with torch.no_grad():
        s = ops.expand(x, 4)
        out = ops.collapse(s, "mean")
    assert calls == {"expand": 1, "collapse": 1} and torch.equal(out, reference.collapse(reference.expand(x, 4)))

    # a gradient: aten's ops, and the gradient is theirs
    xg = x.clone().requires_grad_()
    ops.collapse(ops.expand(xg, 4) * torch.arange(4.0).view(4, 1), "sum").sum().backward()
    assert calls == {"expand": 1, "collapse": 1}
    assert torch.equal(xg.grad, torch.full_like(x, 6.0))

    # the reference kernels, a learned collapse: aten's ops
    with torch.no_grad():
        ops.collapse(ops.expand(x, 4, "reference"), "mean", None, "reference")
        learned = ops.collapse(s, "learned", torch.zeros(4))
    assert calls == {"expand": 1, "collapse": 1}
    assert torch.allclose(learned, 2 * x)  # sum_i sigmoid(0) x


def test_ends_outputs_come_from_the_output_cache():
    old = kernels_cpu.set_output_cache_limit(64)
    try:
        x, xs = _rand(300, 64, dtype=torch.float32, seed=0), _rand(300, 4, 64, dtype=torch.float32, seed=1)
        for run in (lambda: launch.expand_forward(x, 4), lambda: launch.collapse_forward(xs, False)):
            first = run()  # >= 64 KiB: through the cache
            ptr = first.data_ptr()
            del first
            hits = kernels_cpu.output_cache_stats()["hits"]
            again = run()
            assert again.data_ptr() == ptr and kernels_cpu.output_cache_stats()["hits"] == hits + 1
    finally:
        kernels_cpu.set_output_cache_limit(old)


def _gpt(seed=0):
    torch.manual_seed(seed)
    model = TinyGPT(vocab=61, dim=24, layers=2, heads=2, max_len=16).eval()
    ids = torch.randint(0, 61, (2, 16), generator=torch.Generator().manual_seed(seed))
    return model, ids


def test_converted_gpt_eval_runs_each_end_once_and_matches_the_aten_ends(calls, monkeypatch):
    model, ids = _gpt()
    conv = perturb_mhc(convert(model, MHCConfig(streams=4), (ids,)), seed=1).eval()
    src = "\n".join(src for b in conv.blocks for src in b.__dict__["_mhc_carry"].source.values())
    assert "mhc_compile_ops_expand(x, 4, 'auto')" in src and "mhc_compile_ops_collapse(" in src
    with torch.no_grad():
        out = conv(ids)
    assert calls == {"expand": 1, "collapse": 1}
    monkeypatch.setattr(launch, "expand_forward", reference.expand)
    monkeypatch.setattr(launch, "collapse_forward", lambda x, mean: reference.collapse(x, "mean" if mean else "sum"))
    with torch.no_grad():
        aten_ends = conv(ids)
    torch.testing.assert_close(out, aten_ends, rtol=1e-6, atol=1e-6)
    ref = perturb_mhc(convert(model, MHCConfig(streams=4, kernels="reference"), (ids,)), seed=1).eval()
    with torch.no_grad():
        torch.testing.assert_close(out, ref(ids), rtol=1e-5, atol=1e-5)
        assert (out - model(ids)).abs().max() > 1e-3  # perturbed: not the original


def test_compiled_gpt_eval_traces_the_aten_ends(calls):
    model, ids = _gpt(1)
    conv = perturb_mhc(convert(model, MHCConfig(streams=4), (ids,)), seed=2).eval()
    out, targets, _ = compiled_no_grad(conv, ids)
    assert calls == {"expand": 0, "collapse": 0}
    assert not any("expand_fwd" in str(t) or "collapse_fwd" in str(t) for t in targets)
    with torch.no_grad():
        torch.testing.assert_close(out, conv(ids), rtol=1e-5, atol=1e-5)
