"""Shared test setup: the Triton interpreter on CPU-only machines, seeds, and the gpu marker."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before any kernel module imports triton.
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The test models are tiny: on the 2-core CI machines intra-op threading costs far more than it
# gains (a tiny GPT step measured 0.14 s with one thread vs 1.3 s with two).
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
