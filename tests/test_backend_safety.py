"""Issue #13 item 3: the backend refuses graphs that would give a silently wrong model."""
from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import mhc_compile
from mhc_compile.backend import MHCBackendError
from tests._convert_checks import one_thread, rel_err  # noqa: F401
from tests.models.zoo import tiny_gpt, token_inputs

OPTS = {"streams": 2, "inner": "aot_eager"}


def _raises_backend_error(fn, match):
    """Dynamo wraps errors raised while compiling in BackendCompilerFailed; run-time ones are ours."""
    with pytest.raises(Exception) as info:
        fn()
    err = info.value
    while err is not None and not isinstance(err, MHCBackendError):
        err = err.__cause__ or getattr(err, "inner_exception", None)
    assert isinstance(err, MHCBackendError), repr(info.value)
    assert match in str(err), str(err)


def test_second_instance_of_a_compiled_class_is_refused():
    torch._dynamo.reset()
    x = token_inputs(2, 8)
    a, b = tiny_gpt(), tiny_gpt()
    ca = torch.compile(a, backend="mhc", options=OPTS)
    want = ca(*x)
    cb = torch.compile(b, backend="mhc", options=OPTS)
    _raises_backend_error(lambda: cb(*x), "reused the graph compiled for one TinyGPT")
    assert not mhc_compile.backend.mhc_parameters(b), "the second model got no mHC parameters of its own"
    assert torch.equal(ca(*x), want)  # the first model is untouched and still runs


def test_per_block_compile_is_refused():
    torch._dynamo.reset()
    model = tiny_gpt()
    for i, blk in enumerate(model.blocks):
        model.blocks[i] = torch.compile(blk, backend="mhc", options=OPTS)
    _raises_backend_error(lambda: model(*token_inputs(2, 8)), "reused the graph compiled for one GPTBlock")


def test_parameters_reassigned_in_place_still_run():
    """load_state_dict(assign=True) swaps the parameter objects of the same model: not a new instance."""
    torch._dynamo.reset()
    x = token_inputs(2, 8)
    model = tiny_gpt()
    compiled = torch.compile(model, backend="mhc", options=OPTS)
    mhc_compile.materialize(compiled, *x)
    with torch.no_grad():
        before = compiled(*x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)
    with torch.no_grad():
        assert rel_err(compiled(*x), before) < 1e-6


class _Checkpointed(torch.nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, h):
        return checkpoint(self.block, h, use_reentrant=False)


def test_residuals_inside_checkpointed_blocks_are_refused():
    torch._dynamo.reset()
    model = tiny_gpt()
    for i, blk in enumerate(model.blocks):
        model.blocks[i] = _Checkpointed(blk)
    compiled = torch.compile(model, backend="mhc", options=OPTS)
    _raises_backend_error(lambda: compiled(*token_inputs(2, 8)), "activation-checkpointed regions")


@pytest.mark.parametrize("per_block", [True, False])
def test_fully_sharded_model_is_refused(per_block, tmp_path):
    """fully_shard per block (or at the root), then torch.compile(backend="mhc"): the backend
    would create unsharded mHC parameters outside every FSDP unit, and per-block units cut the
    streams. It raises MHCBackendError pointing at convert-then-shard."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard


    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch._dynamo.reset()
        model = tiny_gpt().train()
        mesh = init_device_mesh("cpu", (1,))
        if per_block:
            for block in model.blocks:
                fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        compiled = torch.compile(model, backend="mhc", options={"streams": 4, "kernels": "reference"})
        with pytest.raises(Exception, match="fully_shard") as info:
            compiled(*token_inputs())
        assert "MHCBackendError" in repr(info.value) or isinstance(info.value, MHCBackendError)
    finally:
        torch._dynamo.reset()
        dist.destroy_process_group()


def test_block_compiled_on_its_own_is_refused():
    """torch.compile(block, backend="mhc") on a child of a model (even the first, whose graph
    is not reused) would give that block its own chain: refused, pointing at convert."""
    torch._dynamo.reset()
    model = tiny_gpt()
    compiled = torch.compile(model.blocks[0], backend="mhc", options={"kernels": "reference", "inner": "aot_eager"})
    with pytest.raises(Exception, match="compiled on its own") as info:
        compiled(torch.randn(2, 8, 32))
    assert "MHCBackendError" in repr(info.value) or isinstance(info.value, MHCBackendError)
    torch._dynamo.reset()
    whole = torch.compile(model, backend="mhc", options={"kernels": "reference", "inner": "aot_eager"})
    whole(*token_inputs())  # the whole model (held only by the compile wrapper) is fine
