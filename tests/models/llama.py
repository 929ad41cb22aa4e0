"""Llama-style (RMSNorm, SwiGLU, RoPE, in-place +=): 4 sites, 1 chain.

Builder and example inputs (defined in ``tests.models.zoo``)."""
from .zoo import tiny_llama, token_inputs

__all__ = ["tiny_llama", "example_inputs"]


def example_inputs(b=2, t=8):
    return token_inputs(b, t)
