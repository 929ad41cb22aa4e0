"""No residual at all: 0 sites (convert warns and returns the model).

Builder and example inputs (defined in ``tests.models.zoo``)."""
from .zoo import tiny_plain, plain_inputs

__all__ = ["tiny_plain", "example_inputs"]


def example_inputs(b=2, t=8):
    return plain_inputs(b, t)
