"""The Triton kernels compile for NVIDIA GPUs, checked without one: Triton builds cubins on any machine,
and the SASS it emits shows whether the speed path is there.

Shared memory over a device's limit fails at launch and register spills cost time; both show in the build.
The lent GPUs are Hopper (sm_90): there the default configurations must issue warpgroup MMAs (HGMMA), load
through bulk tensor copies (UTMALDG) or cp.async pipelined over two or more stages, and spill nothing, at the
DiTs' head dims 64 and 128 in bf16 and fp16. The builds run in a subprocess: a process that imported Triton
for its interpreter cannot compile.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "kernel_resources.py"
HOPPER = [(90, "bf16", 128), (90, "fp16", 128), (90, "bf16", 64), (90, "fp16", 64)]


def build(arch: int, dtype: str, head_dim: int, *extra: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_DEFAULT_FP_FUSION": "1"}
    command = [sys.executable, str(TOOL), "--json", "--arch", str(arch), "--dtype", dtype]
    result = subprocess.run(
        [*command, "--head-dim", str(head_dim), *extra], capture_output=True, text=True, env=env, timeout=900
    )
    assert result.returncode in (0, 1), result.stderr[-3000:]
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def builds():
    return [record for target in [*HOPPER, (90, "fp16", 80), (80, "bf16", 128)] for record in build(*target)]


@pytest.mark.slow
def test_default_configs_compile(builds):
    assert len(builds) == 18  # three kernels x six targets
    for record in builds:
        assert record["shared"] <= record["limit"], record
        assert record["registers"] <= 255, record


@pytest.mark.slow
def test_hopper_defaults_are_on_the_fast_path(builds):
    """What the issue asked the machine code to show, per kernel, for every Hopper target."""
    hopper = [r for r in builds if (r["arch"], r["dtype"], r["head_dim"]) in HOPPER]
    assert len(hopper) == 12
    for record in hopper:
        where = f"{record['kernel']} sm_90 {record['dtype']} d{record['head_dim']} {record['config']}"
        assert record["hgmma"] > 0 and record["mma_sync"] == 0, f"{where}: no warpgroup MMA"
        assert record["stack"] == 0 and record["spill_stores"] == 0, f"{where} spills {record['stack']} bytes"
        assert record["config"]["num_stages"] >= 2, where
        if record["kernel"] == "forward":
            assert record["tma"] and record["tma_loads"] >= 4, f"{where}: K / V not through TMA"
        else:
            assert record["cp_async"] > 0, f"{where}: no cp.async"


@pytest.mark.slow
def test_without_tma_the_forward_still_pipelines():
    """Strides TMA cannot take (or ATTNPACK_TMA=0) use the pointer loads: cp.async over two stages."""
    (forward,) = build(90, "bf16", 128, "--kernel", "forward", "--no-tma")
    assert not forward["tma"] and forward["tma_loads"] == 0 and forward["cp_async"] > 0
    assert forward["hgmma"] > 0 and forward["stack"] == 0


@pytest.mark.slow
def test_a_rule_with_a_limit_per_frame_distance_does_not_spill():
    """Radial spatial's rule has a distance limit per frame distance (21 at Wan 81 frames)."""
    records = build(90, "bf16", 128, "--num-limits", "21")
    assert len(records) == 3
    for record in records:
        assert record["stack"] == 0 and record["hgmma"] > 0, record
