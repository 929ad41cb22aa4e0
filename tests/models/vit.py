"""Post-norm ViT encoder on 4x4 patches: 4 sites, 1 chain.

Builder and example inputs (defined in ``tests.models.zoo``)."""
from .zoo import tiny_vit, image_inputs

__all__ = ["tiny_vit", "example_inputs"]


def example_inputs(b=2):
    return image_inputs(b)
