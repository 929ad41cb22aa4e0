"""Shared test helpers: checks for converted models (test_convert, test_hf_models, test_cli, test_io,
test_detect) and the ``one_thread`` fixture.

``one_thread`` is an autouse fixture: a test module activates it by importing it
(``from tests._convert_checks import one_thread  # noqa: F401``)."""
from __future__ import annotations

import copy
import io
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode



def rel_err(out, ref) -> float:
    out, ref = main_output(out), main_output(ref)
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-12)).item()


def main_output(out):
    """The main tensor of a model's output: itself, ``.logits``, ``.last_hidden_state``, or the first tensor."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    if isinstance(out, dict):
        return next(v for v in out.values() if isinstance(v, torch.Tensor))
    if isinstance(out, (list, tuple)):
        return main_output(out[0])
    raise TypeError(type(out))


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one torch thread is ~10x faster than two on a busy 2-core CI machine (and immune
    to a test elsewhere that left more threads set)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def mhc_params(model) -> dict:
    return {k: p for k, p in model.named_parameters() if ".mhc" in k or k.startswith("mhc")}


class _GrabStreams(TorchDispatchMode):
    def __init__(self, streams: list):
        super().__init__()
        self.streams = streams

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.mhc.post_res.default:
            self.streams.append(out.detach())
        elif func is torch.ops.mhc.boundary.default:
            self.streams.append(out[0].detach())
        return out


class _RecordOps(TorchDispatchMode):
    def __init__(self, counts: Counter):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "mhc":
            self.counts[func._opname] += 1
        return func(*args, **(kwargs or {}))


def mhc_op_counts(model, *inputs, **kwargs) -> Counter:
    """How often one forward of ``model`` runs each ``mhc::`` op ('coeffs', 'boundary', ...)."""
    counts: Counter = Counter()
    with torch.no_grad(), _RecordOps(counts):
        model(*inputs, **kwargs)
    return counts


def mhc_ops_run(model, *inputs, **kwargs) -> set:
    """Names of the ``mhc::`` ops one forward of ``model`` runs."""
    return set(mhc_op_counts(model, *inputs, **kwargs))


class StreamGrabber:
    """Runs a converted model (any form: blocks, whole graph, a GraphModule) and keeps every
    stream tensor (..., n, C) after each site: the outputs of the ``mhc::post_res`` and
    ``mhc::boundary`` ops, seen by a dispatch mode."""

    def __init__(self, model):
        self.model = model
        self.streams = []

    def run(self, *inputs, **kwargs):
        with _GrabStreams(self.streams):
            return self.model(*inputs, **kwargs)


def stream_spread(gm, inputs) -> float:
    """max over sites of max|X_i - mean_i X| / max|X|: 0 when the n streams are identical."""
    grab = StreamGrabber(gm)
    with torch.no_grad():
        grab.run(*inputs)
    assert grab.streams, "no stream tensors found in the converted graph"
    return max(((x - x.mean(-2, keepdim=True)).abs().max() / x.abs().max()).item() for x in grab.streams)


def loss_of(out) -> torch.Tensor:
    t = main_output(out)
    return (t.float() - 0.5).pow(2).mean()


def train_steps(gm, inputs, steps=10, lr=1e-2):
    """Adam steps on a fixed batch; returns (losses, names of mHC params with nonzero grad in the first 3 steps)."""
    params = mhc_params(gm)
    opt = torch.optim.Adam(gm.parameters(), lr=lr)
    got_grad = set()
    losses = []
    for step in range(steps):
        opt.zero_grad()
        loss = loss_of(gm(*inputs))
        loss.backward()
        losses.append(loss.item())
        if step < 3:
            for k, p in params.items():
                if p.grad is not None and p.grad.abs().max().item() > 0:
                    got_grad.add(k)
        opt.step()
    return losses, got_grad


def check_training_breaks_symmetry(gm, inputs):
    """Streams identical at init; 10 Adam steps on a copy lower the loss, give every mHC parameter
    a gradient and make the streams differ. Returns the trained copy."""
    assert stream_spread(gm, inputs) < 1e-5
    trained = copy.deepcopy(gm)
    losses, got_grad = train_steps(trained, inputs, steps=10)
    assert losses[-1] < losses[0]
    assert got_grad == set(mhc_params(trained)), sorted(set(mhc_params(trained)) - got_grad)
    assert stream_spread(trained, inputs) > 1e-4
    return trained


def state_dict_roundtrip(src, fresh, inputs) -> float:
    """Save src's state_dict (torch.save, weights_only load) into ``fresh``; return max abs output diff."""
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    missing, unexpected = fresh.load_state_dict(sd, strict=True)
    assert not missing and not unexpected
    with torch.no_grad():
        a, b = main_output(src(*inputs)), main_output(fresh(*inputs))
    return (a - b).abs().max().item()


def compiled_no_grad(model, *args, **kwargs):
    """(main output, call_function targets of the Dynamo graphs, number of graphs) of one compiled call
    of ``model`` without gradient, on a graph-capturing eager backend (Dynamo's cache reset around it)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        out = main_output(torch.compile(model, backend=backend)(*args, **kwargs))
    torch._dynamo.reset()
    return out, [str(nd.target) for gm in graphs for nd in gm.graph.nodes if nd.op == "call_function"], len(graphs)
