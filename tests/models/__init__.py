"""Model zoo of tiny residual families for the mhc-compile tests.

Each family module has a builder (``tiny_gpt()``, ...) returning an ``nn.Module`` in eval mode
with dropout 0, and ``example_inputs()`` returning a tuple of positional args. ``FAMILIES`` maps
a family name to ``(builder, example_inputs, other_inputs, expected_sites, expected_chains)``;
``other_inputs`` uses a different batch and sequence size than the example.
"""
from .zoo import FAMILIES  # noqa: F401
