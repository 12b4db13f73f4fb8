# The Triton interpreter must be switched on before any @triton.jit function is decorated, so that CI (no
# GPU) runs every Triton kernel on CPU tensors.
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
# The benchmark harness (benchmarks/, not installed) is tested from the source tree.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if not HAS_CUDA:
        skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    elif os.environ["TRITON_INTERPRET"] == "1":  # would run the kernels interpreted on the host: no GPU check
        skip_gpu = pytest.mark.skip(reason="the GPU suite runs with TRITON_INTERPRET=0 (make test-gpu)")
    else:
        return
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
