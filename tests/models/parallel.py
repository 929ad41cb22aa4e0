"""Parallel residual x + attn(ln(x)) + mlp(ln(x)): 2 sites, 1 chain.

Builder and example inputs (defined in ``tests.models.zoo``)."""
from .zoo import tiny_parallel, token_inputs

__all__ = ["tiny_parallel", "example_inputs"]


def example_inputs(b=2, t=8):
    return token_inputs(b, t)
