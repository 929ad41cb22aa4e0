"""ResNet basic and bottleneck (tiny_resnet_bottleneck) blocks with a projection shortcut: 3 sites, 2 chains each.

Builder and example inputs (defined in ``tests.models.zoo``)."""
from .zoo import tiny_resnet_basic, tiny_resnet_bottleneck, image_inputs

__all__ = ["tiny_resnet_basic", "tiny_resnet_bottleneck", "example_inputs"]


def example_inputs(b=2):
    return image_inputs(b)
