"""MLP-Mixer (token mixing and channel mixing): 4 sites, 1 chain.

Builder and example inputs (defined in ``tests.models.zoo``)."""
from .zoo import tiny_mixer, image_inputs

__all__ = ["tiny_mixer", "example_inputs"]


def example_inputs(b=2):
    return image_inputs(b)
