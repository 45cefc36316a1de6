"""Dense attention, spelled out: the spec that the fast paths are held to."""

from __future__ import annotations

import torch


def dense_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(q kᵀ · scale + mask) v in float32. q: (B, Sq, H, D), k and v: (B, Sk, H, D).

    `attn_mask` broadcasts to (B, H, Sq, Sk): boolean (True = may attend) or additive. A query row with
    no allowed key returns zeros.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.float()
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no allowed key: all -inf
    return torch.einsum("bhqk,bkhd->bqhd", weights, v.float()).to(q.dtype)
