"""Split-K paths of the coefficient kernels (decode shapes), in the Triton interpreter.

On a GPU, a launch with fewer token blocks than SMs shares each token block's reduction over nC
among S programs (``_common.reduction_splits``) and sums their fp32 partials in
``kernels/split_k.py``'s finish kernel. The interpreter never picks it by itself (no SMs), so
these tests force S with ``splits=`` and compare every output with ``reference`` in float64,
at random (perturbed) parameters, across n, odd C (a split's channel range and the last chunk
masked), static and per-token coefficients, fp32 and fp16: the coeffs forward
(``_coeffs_part_kernel``), the boundary forward with its h_in pass spread over the S finish
programs, and the boundary's backward recompute (``write_h_in=False``, the sum_c g_h_in X'
partials). The grids the GPU picks at T = 8 and 256 are asserted in tests/test_kernel_aot.py.
Also the two-MMA tf32 split of the projection for 16-bit x (``coeff_common.dot_acc``).
"""
import pytest
import torch

from mhc_compile import reference as R
from mhc_compile.kernels import boundary, coeffs
from mhc_compile.kernels.boundary import boundary_forward
from mhc_compile.kernels.coeffs import coeffs_forward

from test_kernel_boundary import LOWP_TOL, NAMES_OUT, TOL, assert_close, make_inputs, out_grads, reference

CASES = [
    # T, n, C, dtype, variant, static, splits
    (5, 4, 37, torch.float32, "mhc", False, 3),
    (3, 3, 45, torch.float16, "hc", False, 4),
    (20, 2, 33, torch.float32, "mhc", True, 2),  # two token blocks
    (2, 1, 71, torch.float16, "mhc", False, 2),
    (4, 8, 19, torch.float32, "mhc", False, 2),
]


@pytest.mark.parametrize("T,n,C,dtype,variant,static,splits", CASES)
def test_boundary_split_k_matches_float64_reference(T, n, C, dtype, variant, static, splits):
    inputs = make_inputs(T, n, C, dtype, static)
    consts, _, _ = boundary.launch_config(n, C, variant, gpu=False)
    assert boundary.launch_grid(T, C, consts, 0, splits)[1] > 1  # really split
    out = boundary_forward(*inputs, 20, 1e-6, variant, splits=splits)
    o64, _ = reference(inputs, out_grads(T, n, C, dtype), 20, variant, torch.float64)
    onat, _ = reference(inputs, out_grads(T, n, C, dtype), 20, variant, None)
    for name, a, b, c in zip(NAMES_OUT, out, o64, onat):
        assert a.shape == c.shape and a.dtype == c.dtype, name
        assert_close(name, a, b, c, LOWP_TOL[dtype] if name in ("x_next", "h_in") else TOL)
    # the backward's recompute: X' and the coefficients again, and sum_c g_h_in X' from the partials
    g_hin = torch.randn(T, C, generator=torch.Generator().manual_seed(3)).to(dtype)
    rec = boundary_forward(*inputs, 20, 1e-6, variant, write_h_in=False, g_h_in=g_hin, splits=splits)
    for name, a, b in zip(NAMES_OUT[:4], rec, out):
        assert torch.equal(a, b), name
    ghp64 = (g_hin.double()[:, None, :] * out[0].double()).sum(-1)
    torch.testing.assert_close(rec[5].double(), ghp64, rtol=0, atol=1e-5 * ghp64.abs().max().item())


@pytest.mark.parametrize("T,n,C,dtype,variant,static,splits", CASES)
def test_coeffs_split_k_matches_float64_reference(T, n, C, dtype, variant, static, splits):
    x, *params = (make_inputs(T, n, C, dtype)[i] for i in (0, 4, 5, 6, 7, 8))
    consts, _, _ = coeffs.launch_config(n, variant, gpu=False)
    assert coeffs.launch_grid(T, n * C, consts, 0, splits)[1] > 1
    out = coeffs_forward(x, *params, 20, 1e-6, variant, splits=splits)
    o64 = R.coeffs(x.double(), *(p.double() for p in params), iters=20, eps=1e-6, variant=variant, dynamic=True)
    onat = R.coeffs(x.float(), *params, iters=20, eps=1e-6, variant=variant, dynamic=True)
    for name, a, b, c in zip(("h_pre", "h_post", "h_res"), out, o64, onat):
        assert a.dtype == torch.float32 and a.shape == b.shape
        assert_close(name, a, b, c, TOL)
    whole = coeffs_forward(x, *params, 20, 1e-6, variant, splits=1)
    for a, b in zip(out, whole):  # the same math; only the fp32 summation order differs
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype,splits", [(torch.float16, 1), (torch.bfloat16, 2)])
def test_two_mma_tf32_split_of_16bit_x(monkeypatch, dtype, splits):
    """With the GPU's DOT_P = "tf32x3", 16-bit x takes ``coeff_common.dot_acc``'s two-MMA split
    x hi(phi) + x (phi - hi(phi)) in both forward kernels. The interpreter ignores the precision, so
    this proves the split's algebra and that the kernels trace it: the outputs still match the
    reference in float64."""
    monkeypatch.setenv("MHC_DOT_PRECISION", "tf32x3")
    T, n, C = 5, 3, 37
    inputs = make_inputs(T, n, C, dtype)
    assert boundary.launch_config(n, C, "mhc", gpu=False)[0]["DOT_P"] == "tf32x3"
    out = boundary_forward(*inputs, 20, 1e-6, "mhc", splits=splits)
    o64, _ = reference(inputs, out_grads(T, n, C, dtype), 20, "mhc", torch.float64)
    onat, _ = reference(inputs, out_grads(T, n, C, dtype), 20, "mhc", None)
    for name, a, b, c in zip(NAMES_OUT, out, o64, onat):
        assert_close(name, a, b, c, LOWP_TOL[dtype] if name in ("x_next", "h_in") else TOL)
    x, params = inputs[0], inputs[4:]
    got = coeffs_forward(x, *params, 20, 1e-6, "mhc", splits=splits)
    c64 = R.coeffs(x.double(), *(p.double() for p in params), iters=20, eps=1e-6, variant="mhc", dynamic=True)
    cnat = R.coeffs(x.float(), *params, iters=20, eps=1e-6, variant="mhc", dynamic=True)
    for name, a, b, c in zip(("h_pre", "h_post", "h_res"), got, c64, cnat):
        assert_close(name, a, b, c, TOL)
