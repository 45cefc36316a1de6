"""Which backend the block-sparse ops run on: `set_backend(...)`, else ATTNPACK_KERNEL_BACKEND, else auto."""

from __future__ import annotations

import contextlib
import os

ENV_VAR = "ATTNPACK_KERNEL_BACKEND"
_chosen: str | None = None


def current_backend() -> str:
    return _chosen or os.environ.get(ENV_VAR) or "auto"


def set_backend(name: str | None) -> str | None:
    """Choose the block-sparse backend for this process ("auto", "triton", "reference", "flex", "sdpa"),
    or None to fall back to ATTNPACK_KERNEL_BACKEND / auto. Returns the previous choice."""
    from .block_sparse_attention import BACKENDS

    global _chosen
    if name is not None and name.lower() not in BACKENDS:
        raise ValueError(f"set_backend: name={name!r} is not one of {', '.join(map(repr, BACKENDS))}")
    previous, _chosen = _chosen, None if name is None else name.lower()
    return previous


@contextlib.contextmanager
def use_backend(name: str | None):
    """`with use_backend("flex"): ...` — the backend inside the block, the previous one after."""
    previous = set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)
