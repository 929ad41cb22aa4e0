"""Canary tests for mhc_compile._torch_internals: every private torch API the backend relies on.

Each test exercises one helper against the installed torch with a real Dynamo compile and
fails loudly (with the name of the helper) when a torch upgrade moves or renames what it uses.
The supported range is torch 2.11 to 2.15 (``torch>=2.11,<2.16``); these canaries ran on 2.11.0,
2.13.0, 2.14.1 and 2.15.0 (docs/compat.md).
"""
import operator

import torch
from torch import nn

from mhc_compile import _torch_internals as ti
from mhc_compile.passes import nodes


class _Block(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.lin = nn.Linear(c, c)

    def forward(self, x):
        return x + self.lin(x)


class _Net(nn.Module):
    def __init__(self, brk=False):
        super().__init__()
        self.blocks = nn.ModuleList([_Block(), _Block()])
        self.brk = brk

    def forward(self, x):
        x = self.blocks[0](x)
        if self.brk:
            torch._dynamo.graph_break()
        return self.blocks[1](x)


def _capture(model, *inputs):
    """Compile ``model`` with a backend that records what the internals report for each graph."""
    seen = []

    def backend(gm, example_inputs):
        scope = ti.current_frame_scope()
        seen.append(dict(
            gm=gm,
            scope=scope,
            sources=list(ti.graph_tensor_sources(gm, example_inputs)),
            break_after=ti.graph_break_after(gm),
            adds=[nodes.module_path(n) for n in gm.graph.nodes if n.target is operator.add],
        ))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=backend)(*inputs)
    return seen


def test_frame_scope_and_param_sources_resolve_the_root_module():
    net = _Net()
    (g,) = _capture(net, torch.randn(2, 8))
    assert g["scope"] is not None, "InstructionTranslator.current_tx() no longer gives the frame being compiled"
    f_locals, f_globals, code = g["scope"]
    assert code == "forward"
    params = {id(p) for p in net.parameters()}
    found = [(t, s) for t, s in g["sources"] if id(t) in params]
    assert len(found) == 4, "graph_tensor_sources must yield the user's real Parameter objects with their sources"
    for tensor, source in found:
        root = ti.resolve_root_module(source, f_locals, f_globals)
        assert root is not None and root[0] is net, f"cannot resolve {ti.source_name(source)} to the root module"
        assert ti.source_name(root[1]) == "L['self']"


def test_graph_break_reason_and_resume_function_name():
    net = _Net(brk=True)
    first, second = _capture(net, torch.randn(2, 8))
    assert first["break_after"] is not None and "graph_break" in first["break_after"]
    assert "test_torch_internals.py" in first["break_after"], "user_stack of compile_subgraph_reason changed"
    assert second["break_after"] is None
    assert ti.resumed_after_break(second["scope"][2]) is not None, "resume functions no longer named torch_dynamo_resume_in_*"
    assert ti.resumed_after_break(first["scope"][2]) is None


def test_nn_module_stack_paths():
    """Dynamo's nn_module_stack spellings, read by the code detection and the backend run."""
    (g,) = _capture(_Net(), torch.randn(2, 8))
    assert g["adds"] == ["blocks.0", "blocks.1"], g["adds"]
    assert nodes.normalize_path("L['self'].blocks.0.attn") == "blocks.0.attn"
    assert nodes.normalize_path("L['self']") == ""
    assert nodes.normalize_path("L['self']._modules['blocks']._modules['0']") == "blocks.0"
    assert nodes.normalize_path("blocks.0.attn.mhc") == "blocks.0.attn.mhc"


def test_param_sources_are_accepted_by_aot_autograd():
    """A parameter added to a Dynamo graph module needs an entry in _param_name_to_source."""
    net = _Net()
    extra = nn.Parameter(torch.full((8,), 2.0))

    def backend(gm, example_inputs):
        gm.register_parameter("mhc_extra", extra)
        out = next(n for n in gm.graph.nodes if n.op == "output")
        (ret,) = out.args[0]
        with gm.graph.inserting_before(out):
            g = gm.graph.get_attr("mhc_extra")
            m = gm.graph.call_function(operator.mul, (ret, g))
        out.args = ((m,),)
        gm.recompile()
        missing = ti.graph_param_names_without_source(gm)
        assert [n for n, _ in missing] == ["mhc_extra"]
        f_locals, f_globals, _ = ti.current_frame_scope()
        ti.register_param_sources(gm, {"mhc_extra": ti.attr_source(ti.synthetic_source("x"), "a.b")})
        assert ti.graph_param_names_without_source(gm) == []
        return ti.inner_compiler("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    x = torch.randn(2, 8)
    out = torch.compile(net, backend=backend)(x)
    torch.testing.assert_close(out, net(x) * 2.0)
    out.sum().backward()
    assert extra.grad is not None and extra.grad.abs().sum() > 0, "AOTAutograd no longer lifts get_attr params"


def test_inner_compilers_and_backend_registry():
    for name in ("eager", "aot_eager", "inductor"):
        assert callable(ti.inner_compiler(name))
    assert "mhc" in ti.registered_backends(), "entry point torch_dynamo_backends:mhc not found (pip install -e .)"


def test_ddp_helpers_and_unwrap():
    assert ti.active_ddp_module() is None
    old = torch._dynamo.config.optimize_ddp
    try:
        torch._dynamo.config.optimize_ddp = False
        assert ti.ddp_optimizer_enabled() is False
        torch._dynamo.config.optimize_ddp = True
        assert ti.ddp_optimizer_enabled() is True
    finally:
        torch._dynamo.config.optimize_ddp = old
    net = _Net()
    inner, prefix = ti.unwrap_module(torch.compile(net, backend="eager"))
    assert inner is net and prefix == "_orig_mod"


# ----------------------------------------------------------------------------- moved helpers
def test_op_namespace_and_schema_name():
    import mhc_compile.ops  # noqa: F401  (registers mhc::)

    assert ti.op_namespace(torch.ops.aten.add.Tensor) == "aten"
    assert ti.op_schema_name(torch.ops.aten.add.Tensor) == "aten::add"
    assert ti.op_namespace(torch.ops.mhc.pre.default) == "mhc", "torch._ops.OpOverload.namespace changed"
    assert ti.op_schema_name(torch.ops.mhc.pre.default) == "mhc::pre"
    assert ti.op_namespace(operator.add) is None and ti.op_schema_name(operator.add) == ""
    assert ti.op_namespace(torch.ops.aten.add) is None  # the packet, not an overload


def test_dispatch_mode_base_sees_aten_calls():
    seen = []

    class Mode(ti.dispatch_mode_base()):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    x = torch.ones(3, requires_grad=True)
    with Mode():
        y = (x * 2).sum()
    assert torch.ops.aten.mul.Tensor in seen and torch.ops.aten.sum.default in seen, seen
    assert y.item() == 6.0


def test_at_backward_end_runs_after_the_pass():
    order = []

    class F(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            order.append(("queued", ti.at_backward_end(lambda: order.append("end"))))
            return g * 2

    x = torch.ones(3, requires_grad=True)
    (F.apply(x) * 3).sum().backward()
    assert order == [("queued", True), "end"] and x.grad.tolist() == [6.0] * 3
    assert ti.at_backward_end(lambda: order.append("never")) is False  # outside a backward pass
    assert order[-1] == "end"


def _mm_count_in_backward(tag: bool) -> int:
    """Compile (x @ w).tanh().sum() with AOTAutograd + the min-cut partitioner; with ``tag`` the mm
    and tanh are tagged MUST_RECOMPUTE through set_recompute_tag, so the backward replays the mm."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition
    from torch.utils.checkpoint import CheckpointPolicy

    graphs = {}

    def keep(name):
        def compiler(gm, example_inputs):
            graphs[name] = gm
            return make_boxed_func(gm.forward)
        return compiler

    def tagger(graph):
        for n in graph.nodes:
            if n.op == "call_function" and n.target in (torch.ops.aten.mm.default, torch.ops.aten.tanh.default):
                if ti.recompute_tag(n) is None:
                    ti.set_recompute_tag(n, CheckpointPolicy.MUST_RECOMPUTE, 0)

    backend = aot_autograd(fw_compiler=keep("fw"), bw_compiler=keep("bw"),
                           partition_fn=min_cut_rematerialization_partition)
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(8, 8, requires_grad=True)
    torch._dynamo.reset()
    fn = torch.compile(lambda a, b: (a @ b).tanh().sum(), backend=backend)
    if tag:
        with ti.joint_graph_hook(tagger, "canary-tagger"):
            out = fn(x, w)
    else:
        out = fn(x, w)
    out.backward()
    torch.testing.assert_close(w.grad, x.detach().t() @ (1 - torch.tanh(x.detach() @ w.detach()) ** 2))
    return sum(1 for n in graphs["bw"].graph.nodes if n.target is torch.ops.aten.mm.default)


def test_recompute_tags_are_honoured_by_the_min_cut_partitioner():
    plain, tagged = _mm_count_in_backward(False), _mm_count_in_backward(True)
    assert plain == 2, plain  # dx and dw
    assert tagged == 3, (plain, tagged)  # + the forward mm replayed: meta["recompute"]/["ac_graph_id"] honoured


def test_export_size_guards_are_readable_and_evaluated():
    """ExportedProgram._guards_code: Python expressions over L['name'].size()[i]."""
    class Fixed(nn.Module):
        def forward(self, img):  # a fixed number of 2x2 patches: (H/2)*(W/2) == 16
            b = img.shape[0]
            return img.reshape(b, 3, -1, 4).reshape(b, 3, 16, -1)

    auto = torch.export.Dim.AUTO
    img = torch.randn(2, 3, 8, 8)
    ep = torch.export.export(Fixed(), (img,), dynamic_shapes=({0: auto, 2: auto, 3: auto},), strict=False)
    assert isinstance(getattr(ep, "_guards_code", None), (list, tuple)), "ExportedProgram._guards_code is gone"
    assert ti.export_guards_failing(ep, {"img": [2, 3, 8, 8]}) == []
    failing = ti.export_guards_failing(ep, {"img": [4, 3, 16, 16]})
    assert failing and all("size()" in g for g in failing), failing
    assert ti.export_guards_failing(ep, {"img": [4, 3, 8, 8]}) == []  # batch is free


def test_checkpoint_regions_reach_the_backend_as_a_tagged_body():
    """torch.utils.checkpoint under Dynamo: tag_activation_checkpoint(body get_attr, *args)."""
    from torch.utils.checkpoint import checkpoint

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return checkpoint(lambda h: h + self.lin(h), x, use_reentrant=False)

    bodies = []

    def backend(gm, example_inputs):
        bodies.extend(b for b in (ti.checkpoint_body(gm, n) for n in gm.graph.nodes) if b is not None)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(Net(), backend=backend)(torch.randn(2, 4))
    assert len(bodies) == 1, "checkpoint regions no longer arrive as tag_activation_checkpoint(body, ...)"
    assert any(n.target in (operator.add, torch.ops.aten.add.Tensor, torch.add) for n in bodies[0].graph.nodes)


def test_fake_mode_and_propagate_record_shapes_without_compute():
    """blocks.trace: a real module run on fake inputs records each node's shape and dtype, and
    its real parameters and buffers are not touched (a BatchNorm in training mode included)."""
    gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6)).train())
    before = gm.get_buffer("1.running_mean").clone()
    mode = ti.fake_mode()
    with mode:
        x = mode.from_tensor(torch.randn(3, 4))
    ti.fake_propagate(gm, mode, x)
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    assert tuple(out.meta["val"].shape) == (3, 6) and out.meta["val"].dtype == torch.float32
    assert torch.equal(gm.get_buffer("1.running_mean"), before)


def test_fx_patches_reverted_lets_a_module_run_inside_a_trace():
    """blocks.trace: inside torch.fx tracing, a leaf module called on real values under
    fx_patches_reverted() runs for real and adds no node to the graph being traced; without it
    the call would go through the tracer's patched Module.__call__."""
    lin = torch.nn.Linear(4, 4)
    seen = {}

    class Root(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, x):
            with ti.fx_patches_reverted():
                seen["out"] = self.lin(torch.ones(2, 4))
            return self.lin(x)

    gm = torch.fx.symbolic_trace(Root())
    assert isinstance(seen["out"], torch.Tensor) and not isinstance(seen["out"], torch.fx.Proxy)
    assert [n.op for n in gm.graph.nodes] == ["placeholder", "call_module", "output"]


def test_is_pytree_container_knows_registered_types():
    """blocks.trace rebuilds a block's ModelOutput-like return through the pytree registry."""
    import collections
    import dataclasses

    import torch.utils._pytree as pytree

    @dataclasses.dataclass
    class Out:
        x: torch.Tensor

    pytree.register_dataclass(Out)
    assert ti.is_pytree_container(Out(torch.ones(1)))
    assert ti.is_pytree_container({"a": 1}) and ti.is_pytree_container((1, 2))
    assert not ti.is_pytree_container(collections.namedtuple("P", "a")(1)) and not ti.is_pytree_container(torch.ones(1))


def test_forward_hooks_suspended_silences_and_restores_every_hook():
    """blocks.carry traces a block again mid-forward: the hook dicts it clears must be the ones
    nn.Module runs, and they must come back."""
    seq = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
    calls = []
    seq.register_forward_hook(lambda m, a, o: calls.append("post"))
    seq[0].register_forward_pre_hook(lambda m, a, k: calls.append("pre-kw"), with_kwargs=True)
    seq[0].register_forward_hook(lambda m, a, k, o: calls.append("post-kw"), with_kwargs=True, always_call=True)
    with ti.forward_hooks_suspended(seq):
        seq(torch.ones(1, 2))
    assert calls == []
    seq(torch.ones(1, 2))
    assert sorted(calls) == ["post", "post-kw", "pre-kw"]


def test_compiled_call_suspended_runs_the_plain_call():
    """blocks.trace: a block compiled with module.compile() is traced again with torch.fx."""
    lin = torch.nn.Linear(2, 2)
    lin.compile(backend="eager")
    assert lin.__dict__.get("_compiled_call_impl") is not None, "module.compile() no longer sets _compiled_call_impl"
    with ti.compiled_call_suspended(lin):
        gm = torch.fx.symbolic_trace(torch.nn.Sequential(lin))
        assert [n.op for n in gm.graph.nodes] == ["placeholder", "call_module", "output"]
    assert lin.__dict__.get("_compiled_call_impl") is not None


def test_module_call_is_plain_sees_every_kind_of_hook():
    """ops.post_res_norm runs a LayerNorm's math itself only when calling the module would run just its
    forward: every hook nn.Module runs (its own, global, forward and backward), an instance forward and
    module.compile() must each make the probe False, and removing them True again."""
    import torch.nn.modules.module as mm

    ln = torch.nn.LayerNorm(4)
    assert ti.module_call_is_plain(ln)
    for name in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks"):
        assert isinstance(getattr(mm, name), dict), f"nn.Module no longer keeps {name}"
    registrations = [
        lambda: ln.register_forward_hook(lambda m, a, o: None),
        lambda: ln.register_forward_pre_hook(lambda m, a: None),
        lambda: ln.register_forward_hook(lambda m, a, k, o: None, with_kwargs=True, always_call=True),
        lambda: ln.register_full_backward_hook(lambda m, gi, go: None),
        lambda: ln.register_full_backward_pre_hook(lambda m, go: None),
        lambda: mm.register_module_forward_hook(lambda m, a, o: None),
        lambda: mm.register_module_forward_pre_hook(lambda m, a: None),
        lambda: mm.register_module_full_backward_hook(lambda m, gi, go: None),
    ]
    for register in registrations:
        handle = register()
        assert not ti.module_call_is_plain(ln)
        handle.remove()
        assert ti.module_call_is_plain(ln)
    ln.forward = lambda x: x
    assert not ti.module_call_is_plain(ln)
    del ln.forward
    ln.compile(backend="eager")
    assert not ti.module_call_is_plain(ln)


def test_the_supported_range_is_named_alike_everywhere():
    """pyproject's pin, this module's docstring and _torch_internals' docstring name one range,
    and the installed torch is inside it."""
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[1]
    pin = re.search(r'"torch>=([0-9.]+),<([0-9.]+)"', (root / "pyproject.toml").read_text())
    assert pin, "pyproject.toml pins torch as torch>=A,<B"
    low, high = pin.groups()
    last = f"{high.split('.')[0]}.{int(high.split('.')[1]) - 1}"
    assert f"torch>={low},<{high}" in ti.__doc__ and f"{low} to {last}" in ti.__doc__
    assert f"torch>={low},<{high}" in __doc__ and f"{low} to {last}" in __doc__
    version = tuple(int(p) for p in re.match(r"(\d+)\.(\d+)", torch.__version__).groups())
    as_tuple = lambda v: tuple(int(p) for p in v.split(".")[:2])  # noqa: E731
    assert as_tuple(low) <= version < as_tuple(high), (torch.__version__, low, high)


def test_exporting_tells_export_from_compile_inside_a_dynamo_trace():
    """``exporting()`` is True under ``torch.export`` (strict, where Dynamo traces it, and non-strict) and
    False in eager mode and inside a ``torch.compile`` trace, in either order (no guard mixes them up)."""
    from mhc_compile._torch_internals import exporting

    def f(x):
        return x + (1 if exporting() else 2)

    class M(nn.Module):
        def forward(self, x):
            return f(x)

    x = torch.zeros(1)
    torch._dynamo.reset()
    assert f(x).item() == 2 and not exporting()
    assert torch.compile(f, backend="eager", fullgraph=True)(x).item() == 2
    for strict in (True, False):
        assert torch.export.export(M(), (x,), strict=strict).module()(x).item() == 1
    assert torch.compile(f, backend="eager", fullgraph=True)(x).item() == 2
    torch._dynamo.reset()
    assert torch.export.export(M(), (x,), strict=True).module()(x).item() == 1
    assert torch.compile(M(), backend="eager", fullgraph=True)(x).item() == 2
    torch._dynamo.reset()
