"""Block-sparse attention over the pattern's block lists, a run of query blocks at a time
(`chunked_forward`, `chunked_backward`): what runs off CUDA when the dense mask would be large. Tests hold
it to the reference (`reference.py`, the spec).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from attnpack.patterns.tiling import inverse_order

# ---- the same math over the block lists, a chunk at a time: what runs off CUDA when S is large
#
# Keys and values are copied once per call into blocks in position order, (B * H * NK, block_kv * D). Per head
# group, consecutive query blocks are taken together in runs (up to RUN_QUERIES queries, while the union of
# their key lists stays within RUN_GROWTH of the longest list: neighbouring blocks see nearly the same keys),
# so that one call attends a thousand queries to the union's keys, gathered once for the run. The union is
# cut into parts that fit the budget; a part's mask comes from the block categories (full, partial, not
# listed), with the element rule evaluated only inside partial blocks, and the parts are merged by their LSE.
# No tensor holds more than about `budget` scores (or mask entries), whatever the sequence length; what grows
# with S is O(S) (the blocked copies of k and v, the output, and the backward's float32 dk, dv sums).
#
# A part runs either as plain torch math in float32 (any device) or, on the CPU, through SDPA's fused CPU
# kernel (`_scaled_dot_product_flash_attention_for_cpu`, float32 accumulation; AMX / AVX-512 for bfloat16),
# which also returns the LSE and has a backward that takes the whole attention's out and LSE. The fused kernel
# never holds the scores, so its budget counts mask entries only.

CHUNK_ELEMENTS = 1 << 21  # scores (batch x heads x queries x keys) per part in float32 math: 8 MB
FUSED_PAIRS = 1 << 24  # query-key pairs per part through the fused kernel (its mask, when it needs one)
RUN_QUERIES = 1024  # the fused CPU kernel runs at ~1/3 of its speed on 128-query calls, full speed from ~1k
RUN_GROWTH = 1.25  # a run stops before its union of key blocks outgrows its longest list by this factor
FULL, PARTIAL = 1, 2  # block categories in a part (0: not listed for that query block)


class _Part(NamedTuple):
    index: torch.Tensor  # (B * h * slots,) its key blocks' rows in the (B * H * NK, block_kv * D) layout
    span: tuple[int, int] | None  # (first, end) when the blocks are consecutive: read in place, no copy
    positions: torch.Tensor  # (slots * block_kv,) their key positions, clamped into the sequence
    real: torch.Tensor | None  # (slots * block_kv,) which are in the sequence; None: all are
    category: torch.Tensor  # (run blocks, slots) int8: FULL, PARTIAL or 0 per (query block, key block)
    partial: tuple[torch.Tensor, torch.Tensor] | None  # (query block, slot) of each partial pair
    dense: bool  # every pair is FULL and every key real: no mask


class _Step(NamedTuple):
    tokens: torch.Tensor  # (run blocks * block_q,) query tokens (caller order), clamped into the sequence
    real: torch.Tensor  # (run blocks * block_q,) which of them are real (the last block may be short)
    positions: torch.Tensor  # (run blocks * block_q,) their positions
    parts: list[_Part]


def _positions(blocks: torch.Tensor, block: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of `blocks` (n,) -> (n * block,), clamped into the sequence, and which are real."""
    positions = (blocks[:, None] * block + torch.arange(block, device=blocks.device)).flatten()
    return positions.clamp(max=length - 1), positions < length


def _runs(listed: torch.Tensor, max_blocks: int) -> list[tuple[int, int, torch.Tensor]]:
    """Runs (first, end, union of key blocks) of consecutive query blocks with keys, from the (NQ, NK) map."""
    counts = listed.sum(1).tolist()
    runs, first = [], 0
    while first < len(counts):
        if counts[first] == 0:  # query blocks that see no key block stay empty
            first += 1
            continue
        union, longest, end = listed[first].clone(), counts[first], first + 1
        while end < len(counts) and end - first < max_blocks and counts[end] > 0:
            grown = union | listed[end]
            if int(grown.sum()) > RUN_GROWTH * max(longest, counts[end]):
                break
            union, longest, end = grown, max(longest, counts[end]), end + 1
        runs.append((first, end, union.nonzero()[:, 0]))
        first = end
    return runs


def _plan(pattern, group: int, batch: int, heads: int, per_pair: int, budget: int) -> list[_Step]:
    """The steps of one head group for (batch, heads), cached on the pattern (built once, called often).
    `per_pair`: the tensor entries a part holds per query-key pair (batch x heads for the float32 math)."""
    key = ("chunked", group, batch, heads, per_pair, budget)
    if key in pattern.kernel_cache:
        return pattern.kernel_cache[key]
    bq, bkv, device = pattern.block_q, pattern.block_kv, pattern.device
    per = heads // pattern.num_groups
    head_rows = (
        torch.arange(batch, device=device)[:, None] * heads + group * per + torch.arange(per, device=device)
    ).flatten() * pattern.num_kv_blocks  # (B * h,): where each (batch, head) starts in the layout
    full, partial = pattern.full[group].cpu(), pattern.partial[group].cpu()
    steps = []
    for first, end, union in _runs(full | partial, max(1, RUN_QUERIES // bq)):
        run = torch.arange(first, end, device=device)
        positions, real = _positions(run, bq, pattern.q_len)
        tokens = positions if pattern.q_order is None else pattern.q_order[positions]
        category = (full[first:end][:, union] * FULL + partial[first:end][:, union] * PARTIAL).to(torch.int8)
        slots = max(1, budget // (per_pair * len(positions) * bkv))
        parts = []
        # key blocks that every query block of the run sees whole first: they need no mask (the fused
        # kernel runs ~3x slower with one), then the others
        whole = (category == FULL).all(0)
        for columns in (whole.nonzero()[:, 0], (~whole).nonzero()[:, 0]):
            for start in range(0, len(columns), slots):
                parts.append(_part(pattern, union[columns[start : start + slots]],
                                   category[:, columns[start : start + slots]], head_rows))  # fmt: skip
        steps.append(_Step(tokens, real, positions, parts))
    pattern.kernel_cache[key] = steps
    return steps


def _part(pattern, blocks: torch.Tensor, category: torch.Tensor, head_rows: torch.Tensor) -> _Part:
    device = pattern.device
    blocks = blocks.to(device)
    positions, real = _positions(blocks, pattern.block_kv, pattern.kv_len)
    real = None if bool(real.all()) else real
    pairs = (category == PARTIAL).nonzero().to(device)
    first, count = int(blocks[0]), len(blocks)
    return _Part(
        index=(head_rows[:, None] + blocks).flatten(),
        span=(first, first + count) if int(blocks[-1]) - first == count - 1 else None,
        positions=positions,
        real=real,
        category=category.to(device),
        partial=(pairs[:, 0], pairs[:, 1]) if len(pairs) else None,
        dense=real is None and bool((category == FULL).all()),
    )


def _by_blocks(x: torch.Tensor, order, block: int) -> torch.Tensor:
    """x (B, S, H, D) in position order, head-major, by blocks: (B * H * NB, block * D). The last block is
    padded with copies of the last position (masked wherever they are read)."""
    length = x.shape[1]
    index = torch.arange(-(-length // block) * block, device=x.device).clamp(max=length - 1)
    if order is not None:
        index = order[index]
    return x.index_select(1, index).transpose(1, 2).reshape(-1, block * x.shape[-1])


def _rows(x: torch.Tensor, step: _Step, heads: slice) -> torch.Tensor:
    """x (B, S, H, ...) at the step's query tokens and these heads -> (B, h, queries, ...)."""
    return x.index_select(1, step.tokens)[:, :, heads].transpose(1, 2).contiguous()


def _per_head(blocked: torch.Tensor, batch: int, num_blocks: int, heads: slice, span) -> torch.Tensor:
    """The view (B, h, span blocks, block_kv * D) of `blocked` (B * H * NK, block_kv * D)."""
    per_head = blocked.view(batch, -1, num_blocks, blocked.shape[1])
    return per_head[:, heads, span[0] : span[1]]


def _keys(blocked, part: _Part, batch: int, num_blocks: int, heads: slice, dim: int) -> torch.Tensor:
    """A part's keys (or values) -> (B, h, keys, D), from `blocked` (B * H * NK, block_kv * D): a view where
    its blocks are consecutive, else a copy."""
    if part.span is not None:
        picked = _per_head(blocked, batch, num_blocks, heads, part.span)
        return picked.view(batch, picked.shape[1], len(part.positions), dim)
    return blocked.index_select(0, part.index).view(batch, -1, len(part.positions), dim)


def _add_keys(blocked, part: _Part, batch: int, num_blocks: int, heads: slice, grad: torch.Tensor) -> None:
    """Add a part's key (or value) gradient (B, h, keys, D) into `blocked` (B * H * NK, block_kv * D)."""
    if part.span is not None:
        target = _per_head(blocked, batch, num_blocks, heads, part.span)
        target += grad.reshape(target.shape)
    else:
        blocked.index_add_(0, part.index, grad.reshape(len(part.index), -1))


def _mask(pattern, step: _Step, part: _Part, padding) -> torch.Tensor | None:
    """Which scores of a part count, (1 or B, 1, queries, keys) bool; None: all do. Pairs in full blocks,
    the element rule inside partial blocks, real keys that are not padding."""
    if part.dense and padding is None:
        return None
    blocks, slots = part.category.shape
    bq, bkv = pattern.block_q, pattern.block_kv
    mask = (part.category == FULL)[:, None, :, None].expand(blocks, bq, slots, bkv).contiguous()
    if part.partial is not None:
        q_block, slot = part.partial
        qp, kp = step.positions.view(blocks, bq)[q_block], part.positions.view(slots, bkv)[slot]
        q, kv = pattern.q_tokens, pattern.kv_tokens
        mask[q_block, :, slot, :] = pattern.rule.evaluate_tables(
            q.coords[qp], q.segments[qp], kv.coords[kp], kv.segments[kp]
        )
    mask = mask.view(1, 1, blocks * bq, slots * bkv)
    if part.real is not None:
        mask = mask & part.real
    if padding is not None:
        mask = mask & padding[:, None, None, part.positions]
    return mask


def _write(target: torch.Tensor, step: _Step, values: torch.Tensor) -> None:
    """values (B, h, queries, ...) into target (B, S, h, ...) at the step's real query tokens."""
    values = values.transpose(1, 2)[:, step.real]
    target.index_copy_(1, step.tokens[step.real], values.to(target.dtype))


def _fused(device: torch.device, fused: bool | None) -> bool:
    available = device.type == "cpu" and hasattr(
        torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"
    )
    if fused and not available:
        raise ValueError("chunked attention: fused=True needs a CPU tensor and SDPA's fused CPU kernel")
    return available if fused is None else fused


def _bias(mask: torch.Tensor | None, dtype) -> torch.Tensor | None:
    """An additive mask for SDPA's fused CPU kernel: 0 where allowed, -inf elsewhere, in q's dtype."""
    if mask is None:
        return None
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def _part_math(q, k, v, mask, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """A part's attention in float32: output (B, h, queries, D) and LSE (B, h, queries), -inf (and zeros)
    for rows without a key."""
    s = (q.float() * scale) @ k.float().transpose(-1, -2)
    if mask is not None:
        s.masked_fill_(~mask, float("-inf"))
    top = s.amax(-1, keepdim=True)
    top = torch.where(torch.isneginf(top), 0.0, top)
    p = s.sub_(top).exp_()
    total = p.sum(-1, keepdim=True)
    has_key = total > 0
    out = (p @ v.float()) / torch.where(has_key, total, 1.0)
    return out, torch.where(has_key, top + torch.log(total), float("-inf"))[..., 0]


def _part_fused(q, k, v, mask, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """`_part_math` through SDPA's fused CPU kernel (whose rows without a key need fixing up)."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, attn_mask=_bias(mask, q.dtype), scale=scale
    )
    out = out.float()
    if mask is not None:
        has_key = mask.any(-1)
        lse = torch.where(has_key, lse, float("-inf"))
        out = out.masked_fill_(~has_key[..., None], 0.0)
    return out, lse


def _merge(state, out, lse):
    """Fold one part's (out, lse) into the running (out, lse) of the same rows."""
    if state is None:
        return out, lse
    total_out, total_lse = state
    merged = torch.logaddexp(total_lse, lse)
    base = torch.where(torch.isneginf(merged), 0.0, merged)
    total_out = total_out * torch.exp(total_lse - base)[..., None] + out * torch.exp(lse - base)[..., None]
    return total_out, merged


def _setup(pattern, q, k, v, key_padding):
    pattern = pattern.to(q.device)
    padding = None
    if key_padding is not None:
        padding = key_padding if pattern.kv_order is None else key_padding[:, pattern.kv_order]
    kb, vb = (_by_blocks(x, pattern.kv_order, pattern.block_kv) for x in (k, v))
    per = q.shape[2] // pattern.num_groups
    groups = [(g, slice(g * per, (g + 1) * per)) for g in range(pattern.num_groups)]
    return pattern, padding, kb, vb, groups


def _budget(fuse: bool, batch: int, heads: int, padding, budget: int | None) -> tuple[int, int]:
    """(entries per query-key pair, budget) of one part: float32 math holds the scores of every batch
    element and head, the fused kernel only the mask (per batch element with key padding)."""
    if fuse:
        return (batch if padding is not None else 1), budget or FUSED_PAIRS
    return batch * heads, budget or CHUNK_ELEMENTS


@torch.no_grad()
def chunked_forward(q, k, v, pattern, scale: float, key_padding=None, *, budget=None, fused=None):
    """Output (B, Sq, H, D) in q's dtype and LSE (B, Sq, H) float32, as `block_sparse_attention_reference`
    computes them. `fused`: run each part through SDPA's fused CPU kernel (default: on the CPU) or as
    float32 torch math (False); `budget`: the part size (default CHUNK_ELEMENTS scores in math,
    FUSED_PAIRS mask entries fused)."""
    pattern, padding, kb, vb, groups = _setup(pattern, q, k, v, key_padding)
    fuse = _fused(q.device, fused)
    part_attention = _part_fused if fuse else _part_math
    batch, _, heads, dim = q.shape
    per_pair, budget = _budget(fuse, batch, heads // pattern.num_groups, padding, budget)
    out = torch.zeros_like(q)
    lse = torch.full(q.shape[:3], float("-inf"), device=q.device)
    for group, hs in groups:
        for step in _plan(pattern, group, batch, heads, per_pair, budget):
            qc = _rows(q, step, hs)  # (B, h, queries, D)
            state = None
            for part in step.parts:
                keys, values = (_keys(x, part, batch, pattern.num_kv_blocks, hs, dim) for x in (kb, vb))
                mask = _mask(pattern, step, part, padding)
                state = _merge(state, *part_attention(qc, keys, values, mask, scale))
            _write(out[:, :, hs], step, state[0])
            _write(lse[:, :, hs], step, state[1])
    return out, lse


def _part_backward_math(do, q, k, v, out, lse, delta, mask, scale):
    """dq, dk, dv (float32) of a part, given the whole attention's out and LSE (N, h, bq, ...)."""
    q, k, v = q.float(), k.float(), v.float()
    p = torch.exp((q * scale) @ k.transpose(-1, -2) - lse[..., None])
    if mask is not None:
        p = torch.where(mask, p, 0.0)
    ds = p * (do @ v.transpose(-1, -2) - delta)
    return (ds @ k) * scale, (ds.transpose(-1, -2) @ q) * scale, p.transpose(-1, -2) @ do


def _part_backward_fused(do, q, k, v, out, lse, delta, mask, scale):
    """`_part_backward_math` through SDPA's fused CPU backward."""
    grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        do, q, k, v, out, lse, 0.0, False, attn_mask=_bias(mask, q.dtype), scale=scale
    )
    return tuple(g.float() for g in grads)


@torch.no_grad()
def chunked_backward(
    grad_out, q, k, v, out, lse, pattern, scale: float, key_padding=None, *, budget=None, fused=None
):
    """dq, dk, dv as `block_sparse_attention_backward_reference` computes them, a part at a time."""
    pattern, padding, kb, vb, groups = _setup(pattern, q, k, v, key_padding)
    fuse = _fused(q.device, fused)
    part_backward = _part_backward_fused if fuse else _part_backward_math
    batch, _, heads, dim = q.shape
    per_pair, budget = _budget(fuse, batch, heads // pattern.num_groups, padding, budget)
    lse = torch.where(torch.isneginf(lse), 0.0, lse)  # rows without a key: every weight is exp(-inf) = 0
    dq = torch.zeros_like(q)
    dkb, dvb = torch.zeros(kb.shape, device=k.device), torch.zeros(vb.shape, device=v.device)  # float32 sums
    for group, hs in groups:
        for step in _plan(pattern, group, batch, heads, per_pair, budget):
            qc, oc, lc = _rows(q, step, hs), _rows(out, step, hs), _rows(lse, step, hs)
            do = _rows(grad_out, step, hs).masked_fill_(~step.real[:, None], 0)  # padding rows add nothing
            if not fuse:
                do = do.float()
                delta = (do * oc.float()).sum(-1, keepdim=True)
            else:
                do, delta = do.to(q.dtype), None
            dqc = 0
            for part in step.parts:
                keys, values = (_keys(x, part, batch, pattern.num_kv_blocks, hs, dim) for x in (kb, vb))
                mask = _mask(pattern, step, part, padding)
                dq_part, dk_part, dv_part = part_backward(do, qc, keys, values, oc, lc, delta, mask, scale)
                dqc = dqc + dq_part
                _add_keys(dkb, part, batch, pattern.num_kv_blocks, hs, dk_part)
                _add_keys(dvb, part, batch, pattern.num_kv_blocks, hs, dv_part)
            _write(dq[:, :, hs], step, dqc)
    return dq, _unblock(dkb, pattern, k), _unblock(dvb, pattern, v)


def _unblock(blocked: torch.Tensor, pattern, like: torch.Tensor) -> torch.Tensor:
    """(B * H * NK, block_kv * D) in position order -> (B, Sk, H, D) in token order, in like's dtype."""
    batch, length, heads, dim = like.shape
    x = blocked.view(batch, heads, -1, dim)[:, :, :length].transpose(1, 2)
    if pattern.kv_order is not None:
        x = x.index_select(1, inverse_order(pattern.kv_order))
    return x.to(like.dtype, memory_format=torch.contiguous_format)
