"""Shared test setup: the Triton interpreter on CPU-only machines, seeds, and the gpu marker."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before any kernel module imports triton.
    os.environ.setdefault("TRITON_INTERPRET", "1")

def _interpreter_numpy_trap() -> str:
    """triton < 3.7's interpreter needs numpy < 2.4 (docs/compat.md): say so instead of 40 failures."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return ""
    try:
        import numpy
        import triton
    except ImportError:
        return ""
    tv = tuple(int(p) for p in triton.__version__.split(".")[:2] if p.isdigit())
    nv = tuple(int(p) for p in numpy.__version__.split(".")[:2] if p.isdigit())
    if tv < (3, 7) and nv >= (2, 4):
        return (f"triton {triton.__version__}'s interpreter fails with numpy {numpy.__version__} (1-element arrays "
                "no longer convert to scalars): pip install 'numpy<2.4' (docs/compat.md)")
    return ""


def pytest_sessionstart(session):
    trap = _interpreter_numpy_trap()
    if trap:
        pytest.exit(trap, returncode=4)


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
