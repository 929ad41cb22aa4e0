"""Seeded random-shape sweep of every Triton kernel (coeffs, pre, post_res, boundary), forward and
backward, in the interpreter on CPU, fp32 and fp16, reusing the per-kernel checkers and their stated
bounds (tests/test_kernel_coeffs.py, test_kernels_mix.py, test_kernel_boundary.py). Shapes are drawn
from a fixed seed; the edge cases n=1, n=3, C=1 and C not a multiple of any power-of-two block are
always in the draw."""
import random

import pytest
import torch

from tests import test_kernel_boundary as KB
from tests import test_kernel_coeffs as KC
from tests import test_kernels_mix as KM


def _shapes(seed, count=4):
    rng = random.Random(seed)
    fixed = [(1, 1, 1), (3, 3, 1), (2, 3, 45)]  # n=1 and C=1; n=3 and C=1; n=3 and C odd > 32
    drawn = [(rng.randint(1, 9), rng.randint(1, 8), rng.choice([1, 2, 3, 5, 7, 17, 33, 47])) for _ in range(count)]
    return fixed + drawn


SHAPES = _shapes(2026)
DTYPES = [torch.float32, torch.float16]


def test_the_draw_covers_the_edge_cases():
    assert {1, 3} <= {n for _, n, _ in SHAPES}
    assert 1 in {c for _, _, c in SHAPES}
    assert any(c > 32 and c % 2 for _, _, c in SHAPES)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,n,C", SHAPES)
def test_random_shapes_every_kernel_forward_and_backward(T, n, C, dtype):
    variant = "hc" if (T + n + C) % 3 == 0 else "mhc"
    static = (T + C) % 2 == 0
    KC.check_case(T, n, C, dtype, variant, 20)

    x, h, g = KM.make_pre(T, n, C, static, dtype)
    (y, gx, gh), (s_y, s_gx, s_gh) = KM.ref_pre(x, h, g)
    KM.assert_close_scaled(KM.pre_forward(x, h), y, s_y, dtype, "h_in")
    kgx, kgh = KM.pre_backward(g, x, h)
    KM.assert_close_scaled(kgx, gx, s_gx, dtype, "grad x")
    KM.assert_close_scaled(kgh, gh, s_gh, dtype, "grad h_pre", coef=True)

    x, ho, hp, hr, g = KM.make_post(T, n, C, static, not static, dtype)
    refs, scales = KM.ref_post(x, ho, hp, hr, g)
    KM.assert_close_scaled(KM.post_res_forward(x, ho, hp, hr), refs[0], scales[0], dtype, "x'")
    for i, (got, what) in enumerate(zip(KM.post_res_backward(g, x, ho, hp, hr), ("x", "h_out", "h_post", "h_res"))):
        KM.assert_close_scaled(got, refs[i + 1], scales[i + 1], dtype, "grad " + what, coef=i >= 2)

    KB.test_kernel_matches_float64_reference(T, n, C, dtype, variant, static)
