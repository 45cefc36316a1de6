"""Block-sparse attention, spelled out: dense float32 attention under `pattern.to_dense()`. The spec."""

from __future__ import annotations

import torch


def head_mask(pattern, num_heads: int, key_padding: torch.Tensor | None = None) -> torch.Tensor:
    """The pattern's token mask per head, (1 or B, H, Sq, Sk): head h uses group h // (H / G); with a
    (B, Sk) key-padding mask, padding keys are masked per batch element."""
    mask = pattern.to_dense().repeat_interleave(num_heads // pattern.num_groups, dim=0)[None]
    return mask if key_padding is None else mask & key_padding[:, None, None, :]


def _scores(q, k, pattern, scale: float, key_padding) -> tuple[torch.Tensor, torch.Tensor]:
    """The allowed mask and the float32 scores, both (1 or B, H, Sq, Sk)."""
    mask = head_mask(pattern.to(q.device), q.shape[2], key_padding)
    return mask, torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale


def block_sparse_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern,
    scale: float | None = None,
    key_padding: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output (B, Sq, H, D) in q's dtype and natural-log LSE (B, Sq, H) float32.

    A query row with no allowed key returns zeros and an LSE of -inf. Differentiable.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    mask, scores = _scores(q, k, pattern, scale, key_padding)
    scores = scores.masked_fill(~mask, float("-inf"))
    has_key = mask.any(-1, keepdim=True)
    weights = torch.where(has_key, torch.softmax(scores, dim=-1), 0.0)
    out = torch.einsum("bhqk,bkhd->bqhd", weights, v.float()).to(q.dtype)
    return out, torch.logsumexp(scores, dim=-1).transpose(1, 2)


def block_sparse_attention_backward_reference(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    pattern,
    scale: float | None = None,
    key_padding: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv of q's attention over these keys, given the `out` and `lse` (B, Sq, H) of the whole
    attention they are part of: softmax weights exp(s - lse) on these keys, FlashAttention's backward."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    mask, scores = _scores(q, k, pattern, scale, key_padding)
    probs = torch.where(mask, torch.exp(scores - lse.transpose(1, 2)[..., None]), 0.0)
    do = grad_out.float()
    delta = (do * out.float()).sum(-1).transpose(1, 2)[..., None]  # (B, H, Sq, 1)
    dv = torch.einsum("bhqk,bqhd->bkhd", probs, do)
    ds = probs * (torch.einsum("bqhd,bkhd->bhqk", do, v.float()) - delta)
    dq = torch.einsum("bhqk,bkhd->bqhd", ds, k.float()) * scale
    dk = torch.einsum("bhqk,bqhd->bkhd", ds, q.float()) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
