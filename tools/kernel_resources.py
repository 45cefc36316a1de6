"""Compile attnpack's Triton kernels for NVIDIA targets without a GPU and report their resources.

    python tools/kernel_resources.py                 # sm_80 and sm_90, every dtype and head dim
    python tools/kernel_resources.py --arch 90 --dtype bf16 --head-dim 128

Triton lowers to PTX and assembles a cubin on any machine; cuobjdump (shipped with Triton) reads the
registers and stack (spills) per thread; Triton reports the shared memory. Shared memory over the
device's limit fails at launch; spills cost time. Neither needs a GPU to see. Exits 1 if any build is
over the shared memory limit.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    # Triton decorates its own library for the interpreter at import: nothing compiles in such a process
    sys.exit("kernel_resources: unset TRITON_INTERPRET; this tool compiles the kernels for real")

tk = importlib.import_module("attnpack.kernels.block_sparse_attention.triton_kernels")

SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}  # bytes per block
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
KERNELS = {"forward": tk._fwd_kernel, "dkdv": tk._dkdv_kernel, "dq": tk._dq_kernel}
TENSORS = ("Q", "K", "V", "OUT", "DO", "DK", "DV", "DQ")


def signature(kernel, element: str, constants: dict) -> dict[str, str]:
    tma = constants.get("KV_TMA", False)
    types = {}
    for name, parameter in inspect.signature(kernel.fn).parameters.items():
        if "constexpr" in str(parameter.annotation) and name not in constants:
            raise ValueError(f"{kernel.fn.__name__}: no value for the constexpr {name}")
        if name in constants:
            types[name] = "constexpr"
        elif tma and name in ("K", "V"):
            block = [1, constants["BLOCK_N"], 1, constants["D_PAD"]]
            types[name] = f"tensordesc<{element}[{', '.join(map(str, block))}]>"
        elif name in TENSORS:
            types[name] = "*" + element
        elif name in ("LSE", "DELTA", "LIMITS"):
            types[name] = "*fp32"
        elif name[0].isupper():
            types[name] = "*i32"
        elif name in ("qk_scale", "sm_scale"):
            types[name] = "fp32"
        else:
            types[name] = "i32"
    return types


# SASS opcodes that show the speed path: warpgroup MMA (Hopper), bulk tensor loads (TMA), asynchronous
# global-to-shared copies (cp.async), plain global loads, and local-memory stores / loads (spills).
OPCODES = {
    "hgmma": r"\bHGMMA\b",
    "mma_sync": r"\bHMMA\b",
    "tma_loads": r"\bUTMALDG\b",
    "cp_async": r"\bLDGSTS\b",
    "global_loads": r"\bLDG\b",
    "spill_stores": r"\bSTL\b",
    "spill_loads": r"\bLDL\b",
}


def resources(
    kernel_name: str,
    arch: int,
    element: str,
    head_dim: int,
    config: dict,
    metric=3,
    blocks=(128, 64),
    key_mask=False,
    tma: bool | None = None,
    num_limits: int = 1,
) -> dict:
    """Registers, stack bytes (spills), shared bytes and the OPCODES counts of one build. `tma`: the
    forward reads K / V through TMA descriptors (default: on sm_90 and newer, as the launcher does)."""
    dtype = DTYPES[element]
    tma = kernel_name == "forward" and arch >= 90 if tma is None else tma
    meta = dict(
        HEAD_DIM=head_dim,
        D_PAD=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_M=blocks[0],
        BLOCK_N=blocks[1],
        METRIC=metric,
        NUM_LIMITS=num_limits,  # distance limits per frame distance: radial spatial has ~21
        HAS_RULE=metric > 0,
        HAS_Q_ORDER=True,
        HAS_KV_ORDER=not tma,  # with TMA the launcher gathers K / V into position order first
        HAS_KEY_MASK=key_mask,
        UPCAST=False,
        IEEE=dtype == torch.float32,
    )
    if kernel_name == "forward":
        meta["KV_TMA"] = tma
    config = dict(config)
    options = {k: config.pop(k) for k in ("num_warps", "num_stages") if k in config}
    kernel = KERNELS[kernel_name]
    # What a launch on diffusers' (B, S, H, D) tensors specializes: unit channel strides become the
    # constant 1, other strides and the pointers are multiples of 16 (Triton checks both at launch).
    names = list(inspect.signature(kernel.fn).parameters)
    constants = meta | config | {name: 1 for name in names if re.fullmatch(r"stride_\w+d", name)}
    types = signature(kernel, element, constants)
    attrs = {
        (index,): [["tt.divisibility", 16]]
        for index, name in enumerate(names)
        if types[name].startswith("*") or (name.startswith("stride_") and types[name] == "i32")
    }
    source = ASTSource(fn=kernel, signature=types, constexprs=constants, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage, sass = (
            subprocess.run([cuobjdump, flag, cubin.name], capture_output=True, text=True, check=True).stdout
            for flag in ("--dump-resource-usage", "--dump-sass")
        )
    record = dict(
        registers=int(re.search(r"REG:(\d+)", usage).group(1)),
        stack=int(re.search(r"STACK:(\d+)", usage).group(1)),
        shared=compiled.metadata.shared,
        tma=tma,
    )
    return record | {name: len(re.findall(pattern, sass)) for name, pattern in OPCODES.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--dtype", nargs="+", default=list(DTYPES))
    parser.add_argument("--head-dim", type=int, nargs="+", default=[40, 64, 80, 128])
    parser.add_argument("--kernel", nargs="+", default=list(KERNELS))
    parser.add_argument(
        "--all-configs", action="store_true", help="every autotuning candidate, not the default"
    )
    parser.add_argument("--json", action="store_true", help="one JSON record per build on stdout")
    parser.add_argument("--key-mask", action="store_true", help="builds with a key-padding mask")
    parser.add_argument(
        "--num-limits", type=int, default=1, help="distance limits of the rule (radial spatial ~21)"
    )
    parser.add_argument(
        "--no-tma", action="store_true", help="the forward's pointer loads (what runs where TMA cannot)"
    )
    parser.add_argument(
        "--metric", type=int, default=3, help="0: block-level pattern, 1 band, 2 box, 3 euclidean"
    )
    args = parser.parse_args(argv)
    problems = 0
    for arch in args.arch:
        for element in args.dtype:
            for head_dim in args.head_dim:
                for name in args.kernel:
                    for config in tk.CONFIGS[name] if args.all_configs else tk.CONFIGS[name][:1]:
                        built = resources(
                            name, arch, element, head_dim, config, key_mask=args.key_mask,
                            tma=False if args.no_tma else None, num_limits=args.num_limits,
                        )  # fmt: skip
                        over = built["shared"] > SHARED_LIMIT[arch]
                        problems += over
                        if args.json:
                            record = dict(
                                arch=arch, dtype=element, head_dim=head_dim, kernel=name, config=config
                            )
                            print(json.dumps(record | built | {"limit": SHARED_LIMIT[arch]}), flush=True)
                            continue
                        note = (
                            "  <-- over the shared memory limit"
                            if over
                            else "  (spills)"
                            if built["stack"]
                            else ""
                        )
                        counts = " ".join(f"{key} {built[key]}" for key in OPCODES)
                        print(
                            f"sm_{arch} {element} d{head_dim:<3} {name:<7} regs {built['registers']:3d} "
                            f"stack {built['stack']:5d} shared {built['shared'] // 1024:3d} KiB  {counts}  {config}{note}"
                        )
                        sys.stdout.flush()
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
