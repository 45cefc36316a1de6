import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may download

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run in Triton's interpreter on the CPU. Set before any kernel is decorated: the
    # kernel modules are imported lazily, on their first call.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
