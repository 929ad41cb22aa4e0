"""MHCConfig: defaults, validation messages that name the field, and from_options."""
import pytest

from mhc_compile import MHCConfig, MHCConfigError


def test_defaults():
    c = MHCConfig()
    assert (c.streams, c.sinkhorn_iters, c.alpha_init) == (4, 20, 0.01)
    assert (c.dynamic, c.variant, c.init, c.collapse, c.kernels) == (True, "mhc", "preserve", "mean", "auto")
    assert c.recompute is True and c.recompute_block is None


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"streams": 0}, "streams"),
        ({"streams": 9}, "streams"),
        ({"streams": 2.0}, "streams"),
        ({"streams": True}, "streams"),
        ({"sinkhorn_iters": 0}, "sinkhorn_iters"),
        ({"alpha_init": float("nan")}, "alpha_init"),
        ({"eps": 0.0}, "eps"),
        ({"variant": "dense"}, "variant"),
        ({"init": "zeros"}, "init"),
        ({"collapse": "max"}, "collapse"),
        ({"kernels": "cuda"}, "kernels"),
        ({"dynamic": "yes"}, "dynamic"),
        ({"recompute_block": 0}, "recompute_block"),
        ({"inner": "tvm"}, "inner"),
    ],
)
def test_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(MHCConfigError, match=rf"MHCConfig\.{field}="):
        MHCConfig(**kwargs)


def test_valid_edges():
    assert MHCConfig(streams=1).streams == 1
    assert MHCConfig(streams=8, sinkhorn_iters=1, recompute_block=3).recompute_block == 3


def test_frozen():
    with pytest.raises(Exception):
        MHCConfig().streams = 2


def test_from_options_and_unknown_keys():
    c = MHCConfig.from_options({"streams": 2, "variant": "hc"})
    assert c == MHCConfig(streams=2, variant="hc")
    assert MHCConfig.from_options(None) == MHCConfig()
    with pytest.raises(MHCConfigError) as e:
        MHCConfig.from_options({"stream": 2, "n": 3})
    msg = str(e.value)
    assert "'n'" in msg and "'stream'" in msg and "streams" in msg and "sinkhorn_iters" in msg
    with pytest.raises(MHCConfigError, match="must be a dict"):
        MHCConfig.from_options([("streams", 2)])


def test_from_options_coerces_cli_strings():
    c = MHCConfig.from_options({"streams": "2", "dynamic": "false", "alpha_init": "0.1", "recompute_block": "none"})
    assert c == MHCConfig(streams=2, dynamic=False, alpha_init=0.1, recompute_block=None)
    assert MHCConfig.from_options({"recompute_block": "3"}).recompute_block == 3
    with pytest.raises(MHCConfigError, match="streams"):
        MHCConfig.from_options({"streams": "four"})
    with pytest.raises(MHCConfigError, match="dynamic"):
        MHCConfig.from_options({"dynamic": "maybe"})


def test_round_trip_dict():
    c = MHCConfig(streams=3, collapse="learned")
    assert MHCConfig.from_options(c.to_dict()) == c
