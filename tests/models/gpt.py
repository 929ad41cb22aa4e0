"""Pre-norm GPT (LayerNorm, GELU MLP): 4 sites, 1 chain.

Builder and example inputs (defined in ``tests.models.zoo``)."""
from .zoo import tiny_gpt, token_inputs

__all__ = ["tiny_gpt", "example_inputs"]


def example_inputs(b=2, t=8):
    return token_inputs(b, t)
