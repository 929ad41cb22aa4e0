"""Encoder-decoder (self-, cross-attention): 10 sites, 2 chains.

Builder and example inputs (defined in ``tests.models.zoo``)."""
from .zoo import tiny_encdec, encdec_inputs

__all__ = ["tiny_encdec", "example_inputs"]


def example_inputs(b=2, s=8, t=6):
    return encdec_inputs(b, s, t)
