"""Bipartite matching for token merging: each source token's most similar destination token.

`best_match(src, dst)` returns, per batch and source row, the largest dot product with any destination row
and its index (first index on ties). Triton on CUDA walks the destinations in tiles and never holds the
Ns x Nd score matrix; elsewhere the torch reference computes it.
"""

from __future__ import annotations

import torch

from .. import dispatch
from .reference import best_match_reference

BEST_MATCH_OP = dispatch.register_op(
    "best_match",
    dispatch.triton_or("reference", "the reference (the whole Ns x Nd score matrix)"),
    "triton on CUDA with triton installed; else reference",
)
BEST_MATCH_OP.register("triton", **dispatch.triton_backend("destination tiles, no Ns x Nd score matrix"))
BEST_MATCH_OP.register("reference", "torch: the whole Ns x Nd score matrix")


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
    if BEST_MATCH_OP.resolve(backend, device=src.device) == "triton":
        from .triton_kernel import best_match_triton

        return best_match_triton(src, dst)
    return best_match_reference(src, dst)


__all__ = ["best_match", "best_match_reference"]
