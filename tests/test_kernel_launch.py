"""The launch arguments of every Triton kernel, CUDA configuration included, built on CPU.

No kernel here has run on a GPU in CI, and the code that picks their GPU blocks, warps, stages
and ``tl.dot`` precision only runs there. These tests run each launcher with the GPU
configuration switched on (``on_gpu`` patched to True) and the kernels replaced by recorders,
and bind every recorded launch to its kernel's own signature: the same positional arguments
and constexprs as the kernel declares, none missing, none unknown, and tile sizes ``tl.dot``
accepts. ``kernels.aot`` compiles from the same ``launch_config`` functions
(tests/test_kernel_aot.py::test_sm90_no_spills). Also: ``ops``
is the one place that sends float64 to the reference, and the launchers refuse it.
"""
import inspect

import pytest
import torch

from mhc_compile import ops, reference
from mhc_compile.config import KERNELS
from mhc_compile.kernels import _common, boundary, boundary_bwd, coeffs, post_res, pre, split_k

LAUNCH_OPTIONS = ("num_warps", "num_stages")


def constexprs(kernel) -> set:
    # JITFunction and InterpretedFunction both keep the Python function as .fn
    return {k for k, p in inspect.signature(kernel.fn).parameters.items() if "constexpr" in str(p.annotation)}


class Recorder:
    """Stands in for a ``@triton.jit`` kernel: records ``kernel[grid](*args, **kwargs)``."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((grid, args, kwargs))

    def check(self):
        """Every launch binds to the kernel's signature with all constexprs given by name."""
        assert self.launches, f"{self.kernel.fn.__name__} was not launched"
        sig = inspect.signature(self.kernel.fn)
        for grid, args, kwargs in self.launches:
            consts = {k: v for k, v in kwargs.items() if k not in LAUNCH_OPTIONS}
            assert set(consts) == constexprs(self.kernel), self.kernel.fn.__name__
            sig.bind(*args, **consts)  # TypeError on a missing, extra or unknown argument
            assert all(isinstance(g, int) and g >= 1 for g in grid)
        return self.launches


@pytest.fixture
def gpu_launches(monkeypatch):
    """Patch every launcher onto its GPU configuration and every kernel with a Recorder."""
    monkeypatch.delenv("MHC_DOT_PRECISION", raising=False)
    for mod in (_common, coeffs, boundary, boundary_bwd):
        monkeypatch.setattr(mod, "on_gpu", lambda device: True)
    recs = {}
    for mod, names in ((coeffs, ("_coeffs_fwd_kernel", "_coeffs_part_kernel", "_coeffs_bwd_dh_kernel",
                              "_coeffs_bwd_x_kernel", "_finish_kernel")),
                       (boundary, ("_boundary_fwd_kernel", "_finish_kernel")),
                       (boundary_bwd, ("_boundary_bwd_mix_kernel",)), (pre, ("_pre_fwd_kernel", "_pre_bwd_kernel")),
                       (post_res, ("_post_res_fwd_kernel", "_post_res_bwd_kernel"))):
        for name in names:
            key = f"{name}({mod.__name__.rsplit('.', 1)[-1]})" if name == "_finish_kernel" else name
            recs[key] = Recorder(getattr(mod, name))
            monkeypatch.setattr(mod, name, recs[key])
    return recs


def _boundary_inputs(T, n, C, dtype=torch.bfloat16):
    x, h_out = torch.randn(T, n, C).to(dtype), torch.randn(T, C).to(dtype)
    p = reference.init_site_params(n, C, 0)
    return [x, h_out, torch.rand(T, n), torch.rand(T, n, n), p["phi"], p["alpha"], p["b_pre"], p["b_post"], p["b_res"]]


@pytest.mark.parametrize("n", [1, 3, 4, 8])
@pytest.mark.parametrize("variant", ["mhc", "hc"])
def test_coefficient_kernels_gpu_launch_arguments(gpu_launches, n, variant):
    T, C = 5, 24  # few enough chunks that no launch splits K (test_split_k_gpu_launch_arguments)
    ins = _boundary_inputs(T, n, C)
    x, params = ins[0], ins[4:]
    gc = [torch.randn(T, n), torch.randn(T, n), torch.randn(T, n, n)]
    coeffs.coeffs_forward(x, *params, 20, 1e-6, variant)
    coeffs.coeffs_backward(*gc, x, *params, 20, 1e-6, variant)
    gb = [torch.randn(T, n, C).to(x.dtype), *gc, torch.randn(T, C).to(x.dtype)]
    boundary.boundary_forward(*ins, 20, 1e-6, variant)
    boundary.boundary_backward(*gb, *ins, 20, 1e-6, variant)  # recompute X', dh, the mix pass, gphi

    consts, x_consts, warps = coeffs.launch_config(n, variant, gpu=True)
    for _, _, kw in gpu_launches["_coeffs_fwd_kernel"].check():
        assert kw == dict(consts, num_warps=warps)
    dh = [dict(kw) for _, _, kw in gpu_launches["_coeffs_bwd_dh_kernel"].check()]
    assert [(kw.pop("GP"), kw.pop("GHP"), kw.pop("WRITE_HP")) for kw in dh] == [(True, False, False), (True, True, True)]
    assert all(kw == dict(coeffs.dh_consts(consts), num_warps=warps) for kw in dh)
    extras = [(kw["GADD"], kw["GPRE"], kw["GMIX"], kw["GX"]) for _, _, kw in gpu_launches["_coeffs_bwd_x_kernel"].check()]
    assert extras == [(False, False, False, True), (False, False, False, False)]
    assert consts["DOT_P"] == "tf32x3" and consts["HC"] == (variant == "hc")
    # tl.dot needs every dimension >= 16: (BT, BK) x (BK, W), and (BT, NP * BC) x (NP * BC, W)
    assert min(consts["BT"], consts["BK"], consts["W"], x_consts["NP"] * x_consts["BC"]) >= 16
    bconsts, bwarps, stages = boundary.launch_config(n, C, variant, gpu=True)
    launches = gpu_launches["_boundary_fwd_kernel"].check()
    assert [(kw["WRITE_HIN"], kw["GHP"]) for _, _, kw in launches] == [(True, False), (False, False)]
    for _, _, kw in launches:
        assert kw["num_warps"] == bwarps == (4 if n <= 4 else 8) and kw["num_stages"] == stages == 2
        assert kw["DOT_P"] == "tf32x3"
    assert bconsts["BT"] >= 16 and bconsts["NP"] * bconsts["BC"] >= 16
    for _, _, kw in gpu_launches["_boundary_bwd_mix_kernel"].check():
        assert kw["BT"] >= 16 and kw["NP"] * kw["BC"] >= 16 and kw["DOT_P"] == "tf32x3"


@pytest.mark.parametrize("n", [1, 3, 4])
def test_split_k_gpu_launch_arguments(gpu_launches, n):
    """Decode shapes on the GPU configuration: the coeffs forward and the boundary launch their
    split-K kernels (grid (token blocks, S)) and the finish kernel, with every argument bound."""
    T, C = 3, 1000
    ins = _boundary_inputs(T, n, C)
    coeffs.coeffs_forward(ins[0], *ins[4:], 20, 1e-6, "mhc")
    boundary.boundary_forward(*ins, 20, 1e-6, "mhc")
    boundary.boundary_forward(*ins, 20, 1e-6, "mhc", write_h_in=False, g_h_in=ins[1])
    consts, _, _ = coeffs.launch_config(n, "mhc", gpu=True)
    sms = _common.num_sms(torch.device("cpu"))
    tb, S, _ = coeffs.launch_grid(T, n * C, consts, sms)
    assert S > 1 and [g for g, _, _ in gpu_launches["_coeffs_part_kernel"].check()] == [(tb, S)]
    assert [g for g, _, _ in gpu_launches["_finish_kernel(coeffs)"].check()] == [(1, 1)]
    bconsts, _, _ = boundary.launch_config(n, C, "mhc", gpu=True)
    tb, S, _ = boundary.launch_grid(T, C, bconsts, sms)
    launches = gpu_launches["_boundary_fwd_kernel"].check()
    assert S > 1 and [(g, kw["SPLIT"]) for g, _, kw in launches] == [((tb, S), True)] * 2
    fin = gpu_launches["_finish_kernel(boundary)"].check()
    fconsts, _ = split_k.finish_config(n, "mhc", True, bconsts["BC"])
    ftb, fs, _ = boundary.hin_grid(T, C, fconsts, sms)
    assert fs > 1 and [(g, kw["HIN"], kw["GHP"]) for g, _, kw in fin] == [((ftb, fs), True, False), ((ftb, 1), False, True)]


@pytest.mark.parametrize("static", [False, True])
def test_mix_kernels_gpu_launch_arguments(gpu_launches, static):
    T, n, C = 7, 3, 300
    x, g = torch.randn(T, n, C, dtype=torch.bfloat16), torch.randn(T, C, dtype=torch.bfloat16)
    rows = 1 if static else T
    hp, hpost, hres = torch.rand(rows, n), torch.rand(rows, n), torch.rand(rows, n, n)
    pre.pre_forward(x, hp)
    pre.pre_backward(g, x, hp)
    post_res.post_res_forward(x, g, hpost, hres)
    post_res.post_res_backward(x, x, g, hpost, hres)
    for name in ("_pre_fwd_kernel", "_pre_bwd_kernel", "_post_res_fwd_kernel", "_post_res_bwd_kernel"):
        for grid, _, kw in gpu_launches[name].check():
            bwd = "bwd" in name
            assert (kw["BLOCK_T"], kw["BLOCK_C"], kw["num_warps"]) == _common.mix_blocks(
                T, n, C, torch.device("cuda"), 2, backward=bwd)
            assert kw["num_warps"] == 4


def test_interpreter_launch_config_is_the_small_one():
    consts, x_consts, warps = coeffs.launch_config(4, "mhc", gpu=False)
    assert (consts["BT"], consts["BK"], warps, consts["DOT_P"]) == (16, 32, 1, "ieee")
    assert set(x_consts) | {"GADD", "GPRE", "GMIX", "GX"} == constexprs(coeffs._coeffs_bwd_x_kernel)
    assert set(coeffs.dh_consts(consts)) | {"GP", "GHP", "WRITE_HP"} == constexprs(coeffs._coeffs_bwd_dh_kernel)
    bconsts, bwarps, _ = boundary.launch_config(4, 100, "hc", gpu=False)
    assert (bconsts["BT"], bconsts["BC"], bwarps, bconsts["HC"]) == (16, 16, 1, True)
    assert set(bconsts) | {"WRITE_HIN", "GHP", "SPLIT"} == constexprs(boundary._boundary_fwd_kernel)


def test_ops_is_the_one_place_that_picks(monkeypatch):
    """float64 (and a boundary with h_out in another dtype) never reaches the coefficient
    kernels, whatever ``kernels`` says; float32 with kernels="triton" does; the launchers refuse
    float64 themselves; the kernels setting is validated against config.KERNELS."""
    calls = []

    def spy(name, real):
        def f(*a, **k):
            calls.append(name)
            return real(*a, **k)
        return f

    for mod, name in ((coeffs, "coeffs_forward"), (coeffs, "coeffs_backward"),
                      (boundary, "boundary_forward"), (boundary, "boundary_backward")):
        monkeypatch.setattr(mod, name, spy(name, getattr(mod, name)))
    T, n, C = 2, 2, 3
    ins64 = [t.double().requires_grad_(True) for t in _boundary_inputs(T, n, C, torch.float64)]
    outs = ops.boundary(*ins64, iters=3, kernels="triton")
    sum(o.sum() for o in outs).backward()
    hp, ho, hr = ops.coeffs(ins64[0], *ins64[4:], iters=3, kernels="triton")
    (hp.sum() + hr.sum()).backward()
    mixed = _boundary_inputs(T, n, C, torch.float32)
    mixed[1] = mixed[1].to(torch.float16)
    ops.boundary(*mixed, iters=3, kernels="triton")
    assert calls == []
    ins32 = [t.float() for t in ins64]
    ops.coeffs(ins32[0], *ins32[4:], iters=3, kernels="triton")
    ops.boundary(*ins32, iters=3, kernels="triton")
    assert calls == ["coeffs_forward", "boundary_forward"]
    with pytest.raises(TypeError):
        coeffs.coeffs_forward(ins64[0].detach(), *ins32[4:], 3, 1e-6, "mhc")
    with pytest.raises(TypeError):
        boundary.boundary_forward(*mixed, 3, 1e-6, "mhc")
    assert KERNELS == ("auto", "triton", "reference")
    with pytest.raises(ValueError, match="kernels="):
        ops.use_triton(ins32[0], "cuda")
