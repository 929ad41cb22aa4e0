"""Post-norm BERT (LN(x + f(x)), torch.add with the branch first): 4 sites, 1 chain.

Builder and example inputs (defined in ``tests.models.zoo``)."""
from .zoo import tiny_bert, token_inputs

__all__ = ["tiny_bert", "example_inputs"]


def example_inputs(b=2, t=8):
    return token_inputs(b, t)
