"""ExampleCall: the example inputs bound once to forward (ForwardSignature), read by name by the
capture (dynamic shapes: inspect's structure, ``**kwargs`` grouped), use_cache and bound_args."""
from __future__ import annotations

import inspect

import torch
from torch import nn

from mhc_compile.example_call import ExampleCall
from mhc_compile.pipeline import _without_cache


class _M(nn.Module):
    def forward(self, a, b=None, c=None, *, use_cache=True, **extra):
        return a


class _Star(nn.Module):
    def forward(self, *xs):
        return xs[0]


def test_binds_like_inspect_with_kwargs_grouped():
    t, u, v = torch.zeros(2, 3), torch.ones(2, 3), torch.ones(2)
    call = ExampleCall.bind(_M(), (t,), {"c": u, "mask": v})
    assert call.bound and call.names == ("a", "b", "c", "use_cache", "mask")
    assert list(call.given()) == ["a", "c", "mask"]  # passed only, defaults left out
    want = inspect.signature(_M().forward).bind(t, c=u, mask=v).arguments
    got = call.by_parameter()
    assert list(got) == list(want) == ["a", "c", "extra"]
    assert got["a"] is t and got["c"] is u and got["extra"] == {"mask": v}
    assert call.position_of("c") == 2 and call.takes("use_cache") and not call.takes("mask")


def test_use_cache_off_for_the_capture_unless_passed_false():
    t = torch.zeros(2, 3)
    call = ExampleCall.bind(_M(), (t,), {})
    off = _without_cache(call)
    assert off.kwargs == {"use_cache": False} and dict(zip(off.names, off.values))["use_cache"] is False
    assert call.kwargs == {}  # the example itself is not changed
    kept = ExampleCall.bind(_M(), (t,), {"use_cache": False})
    assert _without_cache(kept) is kept


def test_without_and_map_keep_the_binding():
    t, u = torch.zeros(2, 3), torch.ones(2, 3)
    call = ExampleCall.bind(_M(), (t,), {"b": u})
    rest = call.without({"b"})
    assert rest.kwargs == {} and "b" not in rest.names and rest.signature is call.signature
    meta = call.map(lambda x: x.to("meta") if isinstance(x, torch.Tensor) else x)
    assert meta.args[0].device.type == "meta" and meta.names == call.names


def test_a_star_args_forward_is_left_unbound():
    call = ExampleCall.bind(_Star(), (torch.zeros(2),), {})
    assert not call.bound and call.by_parameter() == {} and call.args[0].shape == (2,)
