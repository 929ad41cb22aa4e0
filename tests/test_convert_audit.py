"""Audit tests for mhc_compile.convert (issue 3) that the family tests do not pin down: channel-first
tensors mix over C at each spatial position (not across positions), the capture error says why
(model, exception) and what to try, gradients reach every original parameter too, and the
caller's model keeps its outputs, mode and graph after a convert."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import mhc_compile
from mhc_compile import MHCCaptureError, MHCConfig
from tests._convert_checks import main_output, mhc_op_counts, mhc_params, one_thread, rel_err  # noqa: F401
from tests.models.zoo import FAMILIES, tiny_gpt, token_inputs


class _Pointwise(nn.Module):
    """Residual 1x1 convolutions: everything except mHC itself is local to a spatial position."""

    def __init__(self, c=6):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(c, c, 1) for _ in range(3))

    def forward(self, x):
        for conv in self.convs:
            x = x + torch.tanh(conv(x))
        return x


def test_channel_first_mixes_over_c_at_each_position():
    torch.manual_seed(0)
    model, c, n = _Pointwise().eval(), 6, 3
    x = torch.randn(2, c, 4, 5)
    cm = mhc_compile.convert(model, MHCConfig(streams=n), (x,))
    assert cm.mhc_report.num_sites == 3 and all(s.feature_axis == 1 and s.channels == c for s in cm.mhc_report.sites)
    # the projection reads the n*C features of one position
    assert cm.get_parameter("convs.0.mhc.phi").shape[0] == n * c
    # leave the preserving init: random coefficients make every stream and channel matter
    with torch.no_grad():
        for p in mhc_params(cm).values():
            p.add_(0.5 * torch.randn_like(p))
        y = cm(x)
        assert rel_err(y, model(x)) > 1e-3  # the perturbation is visible
        x2 = x.clone()
        x2[:, :, 2, 3] += torch.randn(2, c)
        d = (cm(x2) - y).abs().amax(dim=1)  # (N, H, W)
    assert d[:, 2, 3].min() > 1e-3  # the perturbed position changes
    d[:, 2, 3] = 0
    assert d.max() == 0.0, d.max()  # ... and no other position does (mixing is per position)


def test_capture_error_says_why_and_what_to_try():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x):
            h = self.lin(x)
            return x + h if h.sum() > 0 else x - h

    with pytest.raises(MHCCaptureError) as info:
        mhc_compile.convert(DataDependent(), MHCConfig(), (torch.randn(2, 8),))
    msg = str(info.value)
    assert "DataDependent" in msg  # which model
    assert "data-dependent" in msg.lower()  # why: the underlying export error is quoted
    assert "What to try" in msg and "backend='mhc'" in msg and "torch.where" in msg
    assert info.value.__cause__ is not None


@pytest.mark.parametrize("name", ["gpt", "resnet_basic"])
def test_gradients_reach_every_parameter(name):
    """Every parameter that gets a gradient in the original model gets a nonzero one after convert,
    and so does every new mHC parameter within 3 optimizer steps (checked in test_convert)."""
    build, ex, _, _, _ = FAMILIES[name]
    torch.manual_seed(0)
    model = build()
    inputs = ex()
    cm = mhc_compile.convert(model, MHCConfig(streams=4), inputs)
    main_output(model(*inputs)).square().mean().backward()
    want = {k for k, p in model.named_parameters() if p.grad is not None and p.grad.abs().max() > 0}
    assert len(want) == len(list(model.parameters()))  # the zoo models use every parameter
    main_output(cm(*inputs)).square().mean().backward()
    got = {k for k, p in cm.named_parameters() if p.grad is not None and p.grad.abs().max() > 0}
    assert want <= got, sorted(want - got)


def test_convert_leaves_the_callers_model_working_and_in_its_mode():
    model = tiny_gpt().train()
    snapshot = copy.deepcopy(model)
    x = token_inputs(2, 8)
    cm = mhc_compile.convert(model, MHCConfig(streams=2), x)
    assert model.training  # mode untouched
    assert all(a is not b for a, b in zip(model.parameters(), cm.parameters()))  # no shared storage
    with torch.no_grad():
        for p in cm.parameters():
            p.add_(1.0)  # training the converted model must not move the caller's weights
    model.eval(), snapshot.eval()
    with torch.no_grad():
        assert torch.equal(model(*x), snapshot(*x))
    assert type(model).forward is type(snapshot).forward and "forward" not in vars(model)


@pytest.mark.parametrize("name,boundaries", [("gpt", 3), ("encdec", 8), ("convnext", 1), ("resnet_basic", 0)])
def test_boundary_kernel_emitted_for_every_adjacent_pair(name, boundaries):
    """Two sites with nothing stream-wise between them fuse into one mhc::boundary: sites - chains
    boundaries per model (GPT, encoder-decoder, ConvNeXt); post-activation ResNet has a ReLU between
    its sites, so none, and every site keeps its own coeffs + post_res."""
    build, ex, _, n_sites, n_chains = FAMILIES[name]
    torch.manual_seed(0)
    model = build()
    cm = mhc_compile.convert(model, MHCConfig(streams=3), ex(), form="whole-graph")
    counts = mhc_op_counts(cm, *ex())
    assert counts["boundary"] == boundaries
    if boundaries:
        assert boundaries == n_sites - n_chains
    assert counts["boundary"] + counts["coeffs"] == n_sites
    assert counts["boundary"] + counts["post_res"] == n_sites
    # stream-carrying blocks fuse inside a block; a chain crossing into the next block pays a
    # separate post_res + coeffs there (the boundary op cannot span two modules' forwards)
    blocks = mhc_compile.convert(model, MHCConfig(streams=3), ex())
    crossings = len(blocks.mhc_report.blocks) - n_chains if boundaries else 0
    counts = mhc_op_counts(blocks, *ex())
    assert counts["boundary"] == boundaries - crossings
    assert counts["boundary"] + counts["coeffs"] == n_sites
