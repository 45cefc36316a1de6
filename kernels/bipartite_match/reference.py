"""Best match per source token: the spec of the bipartite matching kernel."""

from __future__ import annotations

import torch


def best_match_reference(src: torch.Tensor, dst: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For every row of `src` (B, Ns, C), the largest dot product with a row of `dst` (B, Nd, C) and that
    row's index (the first one on ties): (B, Ns) float32 and (B, Ns) int64."""
    scores = src.float() @ dst.float().transpose(-1, -2)
    return scores.max(dim=-1)
