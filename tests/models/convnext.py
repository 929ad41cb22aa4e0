"""ConvNeXt with layer scale x + gamma * f(x): 2 sites, 1 chain.

Builder and example inputs (defined in ``tests.models.zoo``)."""
from .zoo import tiny_convnext, image_inputs

__all__ = ["tiny_convnext", "example_inputs"]


def example_inputs(b=2):
    return image_inputs(b)
