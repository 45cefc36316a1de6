"""Bipartite matching for token merging: each source token's most similar destination token.

`best_match(src, dst)` returns, per batch and source row, the largest dot product with any destination row
and its index (first index on ties). Triton on CUDA walks the destinations in tiles and never holds the
Ns x Nd score matrix; elsewhere the torch reference computes it.
"""

from __future__ import annotations

import os

import torch

from .reference import best_match_reference


def best_match(
    src: torch.Tensor, dst: torch.Tensor, *, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, Ns, C) x (B, Nd, C) -> best values (B, Ns) float32 and indices (B, Ns) int64."""
    if src.ndim != 3 or dst.ndim != 3 or src.shape[0] != dst.shape[0] or src.shape[2] != dst.shape[2]:
        raise ValueError(
            f"best_match: src and dst must be (B, N, C) with equal B and C; got {tuple(src.shape)}, {tuple(dst.shape)}"
        )
    if dst.shape[1] == 0:
        raise ValueError("best_match: dst has no rows to match against")
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    backend = backend or ("triton" if src.is_cuda else "reference")
    if backend == "triton":
        if not (src.is_cuda or interpreting):
            raise ValueError("best_match: backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1)")
        from .triton_kernel import best_match_triton

        return best_match_triton(src, dst)
    if backend == "reference":
        return best_match_reference(src, dst)
    raise ValueError(f"best_match: backend={backend!r} is not one of 'triton', 'reference'")


__all__ = ["best_match", "best_match_reference"]
