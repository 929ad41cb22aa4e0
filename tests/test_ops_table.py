"""ops/table.py, the one table of mHC ops: it covers every registered ``mhc::`` op, its paths
resolve, its fakes match the reference, and the rewrite, recompute and diagnostics read it
instead of lists of their own."""
import ast
import inspect

import pytest
import torch

import mhc_compile.diagnostics as diagnostics
import mhc_compile.passes.recompute as recompute
import mhc_compile.passes.rewrite as rewrite
from mhc_compile import reference as R
from mhc_compile.ops.table import OPS, STREAM_OPS


def _registered_mhc_ops() -> set:
    names = getattr(torch._C, "_dispatch_get_all_op_names", None)
    if names is not None:
        return {n for n in names() if n.startswith("mhc::")}
    return {str(s.name) for s in torch._C._jit_get_all_schemas() if str(s.name).startswith("mhc::")}


def test_table_covers_every_registered_mhc_op():
    import mhc_compile.ops  # noqa: F401  (registers the ops)

    expected = {op.qualname for op in OPS.values()} | {op.qualname + "_backward" for op in OPS.values()}
    assert _registered_mhc_ops() == expected
    assert set(STREAM_OPS) == {"post_res", "boundary"}
    assert OPS["boundary"].stream_out == 0 and OPS["post_res"].stream_out == 0 and OPS["pre"].stream_out is None


@pytest.mark.parametrize("name", list(OPS))
def test_entry_paths_resolve_and_saved_inputs_match_the_backward(name):
    op = OPS[name]
    for impl in ("reference", "triton", "cpu"):
        for backward in (False, True):
            assert callable(op.function(impl, backward))
    # the reference backward returns one gradient per saved input, named like the forward's inputs
    params = list(inspect.signature(op.function("reference")).parameters)
    assert all(s in params for s in op.saved), (op.saved, params)
    # saved outputs are outputs, taken by the backward op's schema as optional arguments
    bwd_args = {a.name: a for a in op.op(backward=True).default._schema.arguments}
    for out, arg in op.saved_outputs:
        assert out in op.outputs and arg in bwd_args and bwd_args[arg].default_value is None, (out, arg)
    assert op.backward_kernels and all(callable(f) for f in op.backward_launchers())


def test_boundary_and_pre_entries_name_the_two_pass_backward():
    """The boundary saves X' for its backward, served by the coeffs dh pass on X', the mix pass
    (dX' and site l's post_res backward) and the gphi pass; pre's backward is its own kernel or,
    through the site mailbox, the coeffs dh (dH_pre) and gx (dX) passes."""
    from mhc_compile.kernels import boundary_bwd, coeffs, pre

    assert OPS["boundary"].saved_outputs == (("x", "x_next"),)
    assert OPS["boundary"].backward_launchers() == (coeffs.dh_pass, boundary_bwd.post_res_pass, coeffs.x_pass)
    assert OPS["pre"].backward_launchers() == (pre.pre_backward, coeffs.dh_pass, coeffs.x_pass)
    assert all(not op.saved_outputs for name, op in OPS.items() if name != "boundary")


def _inputs(name, g):
    n, c, lead = 3, 5, (2, 4)
    x = torch.randn(*lead, n, c, generator=g)
    p = {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in R.init_site_params(n, c, 1).items()}
    coeff = (p["phi"], p["alpha"], p["b_pre"], p["b_post"], p["b_res"])
    h_pre, h_post, h_res = R.coeffs(x, *coeff, iters=20, eps=1e-6, variant="mhc", dynamic=True)
    h_out = torch.randn(*lead, c, generator=g)
    args = {"coeffs": (x, *coeff), "pre": (x, h_pre), "post_res": (x, h_out, h_post, h_res),
            "boundary": (x, h_out, h_post, h_res, *coeff)}[name]
    scalars = (20, 1e-6, "mhc") if name in ("coeffs", "boundary") else ()
    return args, scalars


@pytest.mark.parametrize("name", list(OPS))
def test_fake_outputs_match_the_op_and_the_reference(name):
    """At perturbed parameters: the op equals its reference function, and its fake (meta) outputs
    have the reference's shapes and dtypes; its backward gives one gradient per saved input."""
    op = OPS[name]
    args, scalars = _inputs(name, torch.Generator().manual_seed(0))
    ref_fn = op.function("reference")
    ref = ref_fn(*args, iters=20, eps=1e-6, variant="mhc", dynamic=True) if name == "coeffs" else ref_fn(*args, *scalars)
    ref = ref if isinstance(ref, tuple) else (ref,)
    got = op.op()(*args, *scalars, "reference")
    got = got if isinstance(got, tuple) else (got,)
    fake = op.op()(*(a.to("meta") for a in args), *scalars, "reference")
    fake = fake if isinstance(fake, tuple) else (fake,)
    assert len(ref) == len(got) == len(fake) == len(op.outputs)
    for r, o, f in zip(ref, got, fake):
        torch.testing.assert_close(o, r, rtol=1e-6, atol=1e-6)
        assert f.shape == r.shape and f.dtype == r.dtype
    grads = op.op(backward=True)(*(torch.ones_like(r) for r in ref), *args, *scalars, "reference")
    assert len(grads) == len(op.saved)


_READERS = {"passes/rewrite.py": rewrite, "passes/recompute.py": recompute, "diagnostics.py": diagnostics}


@pytest.mark.parametrize("path", list(_READERS))
def test_rewrite_recompute_and_diagnostics_read_the_table(path):
    """No list of op names, output names or torch.ops.mhc attributes of their own (a name appears
    only as a key into the table): they import OPS from ops/table.py."""
    tree = ast.parse(inspect.getsource(_READERS[path]))
    imports = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and (n.module or "").endswith("ops.table")]
    assert any("OPS" in [a.name for a in n.names] for n in imports), path
    own = set(OPS) | {o for op in OPS.values() for o in op.outputs} | {f"mhc_{o}" for op in OPS.values() for o in op.outputs}
    keys = {id(n.slice) for n in ast.walk(tree)  # OPS["pre"]: a look-up in the table
            if isinstance(n, ast.Subscript) and isinstance(n.value, ast.Name) and n.value.id == "OPS"}
    literals = {n.value for n in ast.walk(tree)
                if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in keys}
    assert not literals & own, (path, literals & own)
    mhc_attrs = [n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Attribute)
                 and n.value.attr == "ops" and getattr(n, "attr", "") == "mhc"]
    assert not mhc_attrs, path
    assert recompute.MHC_FORWARD_OPS == tuple(OPS)
