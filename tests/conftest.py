# The Triton interpreter must be switched on before any @triton.jit function is decorated, so that CI (no
# GPU) runs every Triton kernel on CPU tensors.
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

import ampclip

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def cpu_backends():
    """Backends that can run on CPU tensors here (the Triton one under the interpreter)."""
    return [name for name, ok in ampclip.ops.available_backends().items() if ok]
