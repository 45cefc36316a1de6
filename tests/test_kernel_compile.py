"""The Triton kernels compile for NVIDIA GPUs, checked without one: Triton builds cubins on any machine.

Shared memory over a device's limit fails at launch, and register spills cost time; both show in the
build. The lent GPUs are Hopper (sm_90): there the defaults must not spill at head dim 128.
"""

import importlib.util
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "kernel_resources.py"


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("kernel_resources", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["forward", "dkdv", "dq"])
@pytest.mark.parametrize(
    ("arch", "element", "head_dim"), [(90, "bf16", 128), (90, "fp16", 80), (80, "bf16", 128)]
)
def test_default_configs_compile(tool, kernel, arch, element, head_dim):
    config = tool.tk.CONFIGS[kernel][0]
    registers, stack, shared = tool.resources(kernel, arch, element, head_dim, config)
    assert shared <= tool.SHARED_LIMIT[arch]
    assert registers <= 255
    if arch == 90 and head_dim == 128:
        assert stack == 0, f"{kernel} spills {stack} bytes per thread on sm_90"
