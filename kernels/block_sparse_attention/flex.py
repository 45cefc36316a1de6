"""The same pattern through PyTorch's FlexAttention: a comparison backend, not attnpack's kernel.

FlexAttention reads the sequence in the order it is given, so q, k, v are permuted into the pattern's
token order and the output back; its BlockMask is built from the pattern's BSR lists, with the element
rule as `mask_mod`.
"""

from __future__ import annotations

import functools

import torch

from attnpack.patterns import Metric
from attnpack.patterns.tiling import tile, untile


def _mask_mod(pattern, key_ok: torch.Tensor | None):
    """The element rule (and per-batch key padding, in position order) as a FlexAttention mask_mod."""
    if not pattern.has_partial:
        return lambda b, h, q_idx, kv_idx: key_ok[b, kv_idx]
    rule, q_tokens, kv_tokens = pattern.rule, pattern.q_tokens, pattern.kv_tokens
    allow, spatial, limits = rule.allow, rule.spatial, rule.limits
    last = len(limits) - 1
    q_seg, k_seg = q_tokens.segments.long(), kv_tokens.segments.long()
    q_c, k_c = q_tokens.coords, kv_tokens.coords

    def rule_mod(b, h, q_idx, kv_idx):
        sq, sk = q_seg[q_idx], k_seg[kv_idx]
        allowed = allow[sq, sk]
        if rule.metric is Metric.NONE:
            return allowed
        qc, kc = q_c[q_idx], k_c[kv_idx]
        dx = qc[2] - kc[2]
        if rule.metric is Metric.BAND:
            distance = dx.abs()
        elif rule.metric is Metric.BOX:
            distance = torch.maximum((qc[1] - kc[1]).abs(), dx.abs())
        else:
            dy = qc[1] - kc[1]
            distance = dy * dy + dx * dx
        limit = limits[(qc[0] - kc[0]).abs().clamp(max=last)]
        return allowed | (spatial[sq, sk] & (distance.to(torch.float32) < limit))

    if key_ok is None:
        return rule_mod
    return lambda b, h, q_idx, kv_idx: rule_mod(b, h, q_idx, kv_idx) & key_ok[b, kv_idx]


def _padded(index: torch.Tensor, count: torch.Tensor, width: int, heads: int, groups: int):
    """BSR lists per head, indices padded to the full key-block count as FlexAttention expects."""
    pad = torch.zeros(*index.shape[:-1], width, dtype=torch.int32, device=index.device)
    pad[..., : index.shape[-1]] = index
    expand = heads // groups
    return count.repeat_interleave(expand, 0)[None], pad.repeat_interleave(expand, 0)[None]


def block_mask(pattern, num_heads: int, key_padding: torch.Tensor | None = None):
    """A FlexAttention BlockMask for `pattern` (in position order). With a key-padding mask every block
    goes through `mask_mod`: padding can fall anywhere."""
    from torch.nn.attention.flex_attention import BlockMask

    key_ok = None
    if key_padding is not None:
        key_ok = key_padding if pattern.kv_order is None else key_padding[:, pattern.kv_order]
    full_count, full_index = pattern.lists("full")
    part_count, part_index = pattern.lists("partial")
    width = pattern.num_kv_blocks
    kv_num, kv_idx = _padded(part_index, part_count, width, num_heads, pattern.num_groups)
    full_num, full_idx = _padded(full_index, full_count, width, num_heads, pattern.num_groups)
    if key_ok is not None:
        all_count, all_index = pattern.lists("all")
        kv_num, kv_idx = _padded(all_index, all_count, width, num_heads, pattern.num_groups)
        full_num = full_idx = None
    return BlockMask.from_kv_blocks(
        kv_num,
        kv_idx,
        full_num,
        full_idx,
        BLOCK_SIZE=(pattern.block_q, pattern.block_kv),
        mask_mod=_mask_mod(pattern, key_ok) if pattern.has_partial or key_ok is not None else None,
        seq_lengths=(pattern.q_len, pattern.kv_len),
    )


@functools.cache
def compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_block_sparse_attention(q, k, v, pattern, scale: float, mask=None, key_padding=None):
    """Output (B, Sq, H, D) and LSE (B, Sq, H). Pass a prebuilt `mask` (from `block_mask`) when timing."""
    from torch.nn.attention.flex_attention import flex_attention

    pattern = pattern.to(q.device)
    mask = block_mask(pattern, q.shape[2], key_padding) if mask is None else mask
    if pattern.q_order is not None:
        q = tile(q, pattern.q_order)
    if pattern.kv_order is not None:
        k, v = tile(k, pattern.kv_order), tile(v, pattern.kv_order)
    run = compiled_flex_attention() if q.is_cuda else flex_attention
    out, lse = run(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask, scale=scale, return_lse=True
    )
    out, lse = out.transpose(1, 2), lse.transpose(1, 2)
    if pattern.q_order is not None:
        out, lse = untile(out, pattern.q_order), untile(lse, pattern.q_order)
    return out, lse
