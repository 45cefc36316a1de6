"""attnpack.kernels' public surface (re-exported by its __init__): the ops and what this machine can run.

Each op lives in its own folder with a plain torch `reference.py` (the spec) and registers its backends
with `dispatch`: Triton on CUDA, the reference elsewhere. A call's `backend=`, else `set_backend` /
ATTNPACK_KERNEL_BACKEND, else "auto" chooses, the same way for every op; `backends()` reports what this
machine can run, `registry()` every op's backends.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util

import torch

from .backend import ENV_VAR, current_backend, set_backend, use_backend
from .bipartite_match import best_match
from .block_sparse_attention import block_sparse_attention, block_sparse_attention_backward
from .dense import dense_attention
from .dispatch import Backend, interpreting, registry
from .temporal_windows import global_local_attention, local_window_attention, windowed_attention


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def backends() -> list[Backend]:
    """The attention backends this machine has, with why one is missing."""
    cuda = torch.cuda.is_available()
    triton = _version("triton")
    found = []
    if triton is None:
        found.append(Backend("triton", False, "not installed (Linux only)"))
    elif cuda:
        found.append(Backend("triton", True, f"triton {triton} on {torch.cuda.get_device_name()}"))
    else:
        where = "Triton's interpreter is on" if interpreting() else "TRITON_INTERPRET=1 tests"
        found.append(Backend("triton", False, f"triton {triton} installed; no CUDA GPU ({where})"))

    if cuda:
        enabled = [
            name
            for name, on in (
                ("flash", torch.backends.cuda.flash_sdp_enabled()),
                ("mem_efficient", torch.backends.cuda.mem_efficient_sdp_enabled()),
                ("cudnn", torch.backends.cuda.cudnn_sdp_enabled()),
                ("math", torch.backends.cuda.math_sdp_enabled()),
            )
            if on
        ]
        found.append(Backend("sdpa", True, f"CUDA: {', '.join(enabled)}"))
    else:
        found.append(Backend("sdpa", True, "CPU"))

    flex = importlib.util.find_spec("torch.nn.attention.flex_attention") is not None
    found.append(
        Backend("flex_attention", flex, "comparison backend" if flex else f"torch {torch.__version__}")
    )
    xformers = _version("xformers")
    found.append(
        Backend("xformers", xformers is not None, xformers or "not installed (extra: attnpack[xformers])")
    )
    return found


__all__ = [
    "ENV_VAR",
    "Backend",
    "backends",
    "best_match",
    "block_sparse_attention",
    "block_sparse_attention_backward",
    "current_backend",
    "dense_attention",
    "global_local_attention",
    "local_window_attention",
    "registry",
    "set_backend",
    "use_backend",
    "windowed_attention",
]
