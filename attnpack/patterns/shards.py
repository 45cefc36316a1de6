"""A pattern restricted to the tokens one rank holds: ring attention's (query shard x key chunk).

Context parallelism hands each rank some rows of the global sequence (its query shard) and, one at a time,
other ranks' keys (key chunks). `restrict` turns the global pattern into the pattern of one such pair:
it keeps the pattern's blocks that hold a local query and a chunk key, in the global pattern's position
order, so every block is a block of the global pattern. Where a shard edge cuts a block (75,600 tokens
over 2 ranks is 37,800 per rank, not a multiple of 128), the block keeps its place and the rows or keys
that belong to other ranks are padding: padding keys are masked per element, padding rows are computed
and dropped. The kernels run it unchanged on the gathered rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .block_sparse import BlockSparsePattern, _block_positions
from .tiling import inverse_order


@dataclass(frozen=True, eq=False)
class ShardPattern:
    """The global pattern on one rank's (query rows x key rows).

    `pattern` runs on rows gathered with `q_index` / `kv_index` (a local row per pattern position, -1
    for padding), or is None where no local query may attend any chunk key. `q_positions` are the pattern
    positions that hold local rows, `q_rows` those rows; likewise `kv_positions` / `kv_rows`.
    """

    pattern: BlockSparsePattern | None
    q_index: torch.Tensor
    kv_index: torch.Tensor
    q_positions: torch.Tensor
    q_rows: torch.Tensor
    kv_positions: torch.Tensor
    kv_rows: torch.Tensor

    def gather(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Rows of x (B, S, H, D) in pattern order; padding positions read a zero row."""
        padded = torch.cat([x, x.new_zeros(x.shape[0], 1, *x.shape[2:])], dim=1)
        return padded[:, index]  # -1 reads the appended zero row

    def scatter(self, x: torch.Tensor, rows: int, positions: torch.Tensor, local: torch.Tensor, fill=0.0):
        """Pattern-order rows back to the local rows (B, rows, ...); rows the pattern skips get `fill`."""
        out = x.new_full((x.shape[0], rows, *x.shape[2:]), fill)
        out[:, local] = x[:, positions]
        return out


def restrict(
    pattern: BlockSparsePattern,
    q_tokens: torch.Tensor,
    kv_tokens: torch.Tensor,
    groups: slice = slice(None),
) -> ShardPattern:
    """`pattern` on local query rows holding the global tokens `q_tokens` and key rows holding `kv_tokens`
    (global token ids in the pattern's token order), for the head groups `groups`. Cached on the pattern."""
    cache = pattern.__dict__.setdefault("_shards", {})
    key = (_fingerprint(q_tokens), _fingerprint(kv_tokens), groups.start, groups.stop)
    if key not in cache:
        cache[key] = _restrict(pattern, q_tokens.to(pattern.device), kv_tokens.to(pattern.device), groups)
    return cache[key]


def _fingerprint(tokens: torch.Tensor) -> tuple:
    # Shard token lists are unions of a few arange runs: their ends and length tell them apart cheaply,
    # and the sum guards against two lists that share those.
    return (len(tokens), int(tokens[0]), int(tokens[-1]), int(tokens.sum())) if len(tokens) else (0,)


def _positions_of(order: torch.Tensor | None, tokens: torch.Tensor) -> torch.Tensor:
    return tokens if order is None else inverse_order(order)[tokens]


def _blocks(block_ids: torch.Tensor, block: int, length: int) -> torch.Tensor:
    """The positions of the given (sorted) blocks; only the sequence's last block may be short."""
    positions, valid = _block_positions(block_ids, block, length)
    return positions[valid]


def _row_of(positions_of_rows: torch.Tensor, length: int, wanted: torch.Tensor) -> torch.Tensor:
    row_of = torch.full((length,), -1, dtype=torch.int64, device=wanted.device)
    row_of[positions_of_rows] = torch.arange(len(positions_of_rows), device=wanted.device)
    return row_of[wanted]


def _restrict(pattern, q_tokens, kv_tokens, groups) -> ShardPattern:
    q_pos = _positions_of(pattern.q_order, q_tokens)
    kv_pos = _positions_of(pattern.kv_order, kv_tokens)
    q_blocks = torch.unique(q_pos // pattern.block_q)
    kv_blocks = torch.unique(kv_pos // pattern.block_kv)
    full = pattern.full[groups][:, q_blocks][:, :, kv_blocks]
    partial = pattern.partial[groups][:, q_blocks][:, :, kv_blocks]
    computed = full | partial
    keep_q, keep_kv = computed.any(2).any(0), computed.any(1).any(0)  # drop blocks with nothing to do
    q_blocks, kv_blocks = q_blocks[keep_q], kv_blocks[keep_kv]
    full, partial = full[:, keep_q][:, :, keep_kv], partial[:, keep_q][:, :, keep_kv]
    q_positions_all = _blocks(q_blocks, pattern.block_q, pattern.q_len)
    kv_positions_all = _blocks(kv_blocks, pattern.block_kv, pattern.kv_len)
    q_index = _row_of(q_pos, pattern.q_len, q_positions_all)
    kv_index = _row_of(kv_pos, pattern.kv_len, kv_positions_all)
    real_q, real_kv = (q_index >= 0).nonzero().flatten(), (kv_index >= 0).nonzero().flatten()
    sub = None
    if len(q_blocks) and len(kv_blocks):
        has_rule = bool(partial.any())
        sub = BlockSparsePattern(
            q_len=len(q_positions_all),
            kv_len=len(kv_positions_all),
            block_q=pattern.block_q,
            block_kv=pattern.block_kv,
            full=full,
            partial=partial,
            rule=pattern.rule if has_rule else None,
            q_tokens=pattern.q_tokens[q_positions_all] if has_rule else None,
            kv_tokens=pattern.kv_tokens[kv_positions_all] if has_rule else None,
        )
    return ShardPattern(
        pattern=sub,
        q_index=q_index,
        kv_index=kv_index,
        q_positions=real_q,
        q_rows=q_index[real_q],
        kv_positions=real_kv,
        kv_rows=kv_index[real_kv],
    )


def allows_own_token(pattern: BlockSparsePattern, tokens: torch.Tensor) -> torch.Tensor:
    """(len(tokens),) bool: whether each token may attend its own key (before key padding), in group 0.

    Ring attention merges a rank's key chunks by their LSE starting with its own chunk; a query with no
    key there would start the merge at -inf, which diffusers' merge cannot recover from. Queries that see
    themselves never have that problem.
    """
    tokens = tokens.to(pattern.device)
    q_pos = _positions_of(pattern.q_order, tokens)
    kv_pos = _positions_of(pattern.kv_order, tokens)
    qb, kb = q_pos // pattern.block_q, kv_pos // pattern.block_kv
    allowed = pattern.full[0, qb, kb].clone()
    partial = pattern.partial[0, qb, kb]
    if bool(partial.any()):
        q, k = pattern.q_tokens[q_pos[partial]], pattern.kv_tokens[kv_pos[partial]]
        own = pattern.rule.evaluate_tables(
            q.coords[:, None], q.segments[:, None], k.coords[:, None], k.segments[:, None]
        )
        allowed[partial] = own.flatten()
    return allowed


__all__ = ["ShardPattern", "allows_own_token", "restrict"]
