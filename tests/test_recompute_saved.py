"""What the compiled path saves for backward with recompute on (docs/recompute.md, issue #24).

A GPT through ``torch.compile(backend="mhc")`` (inner aot_eager, the min-cut partitioner) at
perturbed mHC parameters: with recompute the gradients equal those without (1e-5), and the saved
tensors hold exactly the scheme's n-stream X: one per later block start (the chain's first X is
replayed from the embedding), counted with ``saved_tensors_hooks`` (a count, machine-independent).
"""
from __future__ import annotations

import pytest
import torch

import mhc_compile
from mhc_compile.passes import recompute as RC
from tests.models.zoo import tiny_gpt, token_inputs

N, C, LAYERS = 4, 16, 4


def _run(recompute: bool):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = tiny_gpt(c=C, layers=LAYERS).train()
    (idx,) = token_inputs(2, 8)
    compiled = torch.compile(model, backend="mhc", options={"streams": N, "inner": "aot_eager", "recompute": recompute})
    n_records = len(RC.last_records())
    mhc_compile.materialize(compiled, idx)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # perturbed mHC parameters: away from the identity-like init
        for name, p in model.named_parameters():
            if "mhc" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    shapes, seen = [], set()

    def pack(t):
        if not isinstance(t, torch.nn.Parameter) and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = compiled(idx)
    weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    (out * weight).sum().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    plans = [p for r in RC.last_records()[n_records:] for p in r.chains] if recompute else []
    streams = sum(1 for sh in shapes if sh[-2:] == (N, C))
    return out.detach(), grads, streams, plans


def test_gpt_recompute_saves_the_schemes_streams_and_keeps_gradients():
    out_off, g_off, streams_off, _ = _run(False)
    out_on, g_on, streams_on, plans = _run(True)
    (plan,) = plans
    sites = 2 * LAYERS
    assert plan.length == sites and plan.block == RC.recompute_block_size(N, sites) == 2
    assert plan.starts == [0, 2, 4, 6] and plan.start_from_input
    assert plan.kept_streams == 3
    assert streams_on == plan.kept_streams          # X at block starts 2, 4, 6 only
    assert streams_off == sites                     # without recompute: every site's X
    torch.testing.assert_close(out_on, out_off, rtol=1e-5, atol=1e-5)
    assert g_on.keys() == g_off.keys() and sum("mhc" in k for k in g_on) >= 5 * sites
    for k, g in g_off.items():
        assert g.abs().sum() > 0 or "mhc" not in k, k
        torch.testing.assert_close(g_on[k], g, rtol=1e-5, atol=1e-5, msg=k)


@pytest.mark.parametrize("block", [1, 3, 8])
def test_override_keeps_one_stream_per_later_block_start(block):
    """MHCConfig.recompute_block: ceil(L/L_r) - 1 saved X for any L_r (block 1: every X but the
    first; block L: none)."""
    import math

    from mhc_compile.config import MHCConfig
    from tests.test_recompute import Chain, _run as run_chain, _streams

    torch.manual_seed(0)
    n, c, L = 3, 8, 8
    model = Chain(L=L, n=n, c=c, fused=True)
    x = torch.randn(2, 5, c, requires_grad=True)
    on = run_chain(model, x, MHCConfig(streams=n, recompute_block=block))
    (plan,) = on["record"].chains
    assert plan.kept_streams == math.ceil(L / block) - 1
    assert _streams(on["shapes"], n, c) == plan.kept_streams
