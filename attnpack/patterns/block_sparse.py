"""BlockSparsePattern: which key blocks each query block attends to, and which tokens inside a block.

Block level (what is computed): per head group, each query block's list of key blocks, as two BSR lists
(like FlexAttention's `kv_num_blocks` / `kv_indices`): *full* blocks, where every query may attend every
key, and *partial* blocks, where the kernel evaluates the element rule. Blocks in neither list are skipped.

Element level (inside partial blocks): a small closed set of rules, evaluated from per-token tables:

    allowed(q, k) = allow[seg(q), seg(k)]
                    or (spatial[seg(q), seg(k)] and distance(q, k) < limits[min(|t(q) - t(k)|, L - 1)])

with segment ids (which segments see which; an always-attend range such as the text tokens is a segment
that is allowed everywhere) and one spatial metric on token coordinates (t, y, x):

    band       |x(q) - x(k)|                     a band on a raster index stored in x
    box        max(|y(q) - y(k)|, |x(q) - x(k)|)  a square window on the grid
    euclidean  (y(q) - y(k))² + (x(q) - x(k))²    a disc; a 3D ball is limits[dt] = r² - dt²

whose limit may depend on the frame distance |t(q) - t(k)|.

Patterns are built over *positions* of a token order (see `tiling`): `q_order[position] = token`. The
kernels read q, k, v through the orders, and `to_dense()` answers in the caller's token order.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import torch

from .tiling import inverse_order

MAX_SEGMENTS = 32  # segment rules travel to the kernel as 32-bit masks


class Metric(IntEnum):
    NONE = 0
    BAND = 1
    BOX = 2
    EUCLIDEAN = 3


@dataclass(frozen=True, eq=False)
class TokenTable:
    """What the element rule reads about each token, in pattern (position) order."""

    coords: torch.Tensor  # (S, 3) int32: t, y, x
    segments: torch.Tensor  # (S,) int32

    def __post_init__(self):
        if self.coords.ndim != 2 or self.coords.shape[1] != 3:
            raise ValueError(f"TokenTable: coords must be (S, 3) (t, y, x); got {tuple(self.coords.shape)}")
        if self.segments.shape != (self.coords.shape[0],):
            raise ValueError(
                f"TokenTable: segments {tuple(self.segments.shape)} must be ({self.coords.shape[0]},), one per token"
            )
        object.__setattr__(self, "coords", self.coords.to(torch.int32).contiguous())
        object.__setattr__(self, "segments", self.segments.to(torch.int32).contiguous())

    def __len__(self) -> int:
        return self.coords.shape[0]

    def __getitem__(self, index) -> TokenTable:
        return TokenTable(self.coords[index], self.segments[index])

    def to(self, device) -> TokenTable:
        return TokenTable(self.coords.to(device), self.segments.to(device))

    @staticmethod
    def of(coords: torch.Tensor, segments: torch.Tensor | int = 0) -> TokenTable:
        if isinstance(segments, int):
            segments = torch.full((coords.shape[0],), segments, dtype=torch.int32, device=coords.device)
        return TokenTable(coords, segments)


@dataclass(frozen=True, eq=False)
class ElementRule:
    """The element mask of partial blocks (see the module docstring)."""

    allow: torch.Tensor  # (N, N) bool: segment pairs that always attend
    spatial: torch.Tensor  # (N, N) bool: segment pairs that attend where the metric allows
    metric: Metric = Metric.NONE
    limits: torch.Tensor | None = None  # (L,) float32, by frame distance

    def __post_init__(self):
        n = self.allow.shape[0]
        if self.allow.shape != (n, n) or self.spatial.shape != (n, n):
            raise ValueError(
                f"ElementRule: allow {tuple(self.allow.shape)} and spatial {tuple(self.spatial.shape)} must be "
                f"square and equal"
            )
        if not 1 <= n <= MAX_SEGMENTS:
            raise ValueError(f"ElementRule: {n} segments; accepted: 1 to {MAX_SEGMENTS}")
        metric = Metric(self.metric)
        limits = self.limits
        if metric is Metric.NONE:
            limits = torch.zeros(1)
        elif limits is None or limits.ndim != 1 or len(limits) == 0:
            raise ValueError(
                f"ElementRule: metric {metric.name.lower()} needs limits, a 1-D tensor by frame distance"
            )
        object.__setattr__(self, "metric", metric)
        object.__setattr__(self, "allow", self.allow.to(torch.bool))
        object.__setattr__(self, "spatial", self.spatial.to(torch.bool))
        object.__setattr__(self, "limits", limits.to(torch.float32).contiguous())

    @property
    def num_segments(self) -> int:
        return self.allow.shape[0]

    def to(self, device) -> ElementRule:
        return ElementRule(
            self.allow.to(device), self.spatial.to(device), self.metric, self.limits.to(device)
        )

    def evaluate(self, q: TokenTable, k: TokenTable) -> torch.Tensor:
        """The element mask (Sq, Sk), bool: the spec the kernels implement."""
        return self.evaluate_tables(q.coords, q.segments, k.coords, k.segments)

    def evaluate_tables(
        self,
        q_coords: torch.Tensor,
        q_segments: torch.Tensor,
        k_coords: torch.Tensor,
        k_segments: torch.Tensor,
    ) -> torch.Tensor:
        """`evaluate` on raw tables with any leading batch dims: (..., Sq, 3) with (..., Sk, 3) -> (..., Sq, Sk)."""
        sq, sk = q_segments.long()[..., :, None], k_segments.long()[..., None, :]
        allowed = self.allow[sq, sk]
        if self.metric is Metric.NONE:
            return allowed
        qc, kc = q_coords[..., :, None, :], k_coords[..., None, :, :]
        frames = (qc[..., 0] - kc[..., 0]).abs().clamp(max=len(self.limits) - 1)
        dy, dx = qc[..., 1] - kc[..., 1], qc[..., 2] - kc[..., 2]
        if self.metric is Metric.BAND:
            distance = dx.abs()
        elif self.metric is Metric.BOX:
            distance = torch.maximum(dy.abs(), dx.abs())
        else:
            distance = dy * dy + dx * dx
        near = distance.to(torch.float32) < self.limits[frames.long()]
        return allowed | (self.spatial[sq, sk] & near)

    def segment_bits(self) -> tuple[torch.Tensor, torch.Tensor]:
        """allow and spatial as one int32 bitmask per query segment (bit j: key segment j), made once on the
        rule's device (the kernels read them at every launch)."""
        cached = self.__dict__.get("_segment_bits")
        if cached is None:
            cached = self._make_segment_bits()
            object.__setattr__(self, "_segment_bits", cached)
        return cached

    def _make_segment_bits(self) -> tuple[torch.Tensor, torch.Tensor]:
        weights = torch.tensor(
            [1 << j for j in range(self.num_segments)], dtype=torch.int64, device=self.allow.device
        )
        allow = (self.allow.long() * weights).sum(1)
        spatial = (self.spatial.long() * weights).sum(1)
        to_int32 = lambda bits: torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32)  # noqa: E731
        return to_int32(allow), to_int32(spatial)

    @staticmethod
    def everything() -> ElementRule:
        """One segment, always allowed: what a block-level pattern means inside its blocks."""
        return ElementRule(torch.ones(1, 1, dtype=torch.bool), torch.zeros(1, 1, dtype=torch.bool))


def _bsr(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(G, NQ, NK) bool -> per row counts (G, NQ) int32 and sorted column indices (G, NQ, max(1, most)) int32."""
    counts = mask.sum(-1).to(torch.int32)
    width = max(1, int(counts.max()) if counts.numel() else 1)
    # Stable sort of (not selected, column): selected columns first, in increasing order.
    columns = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    key = (~mask).to(torch.int64) * mask.shape[-1] + columns
    indices = key.argsort(dim=-1)[..., :width]
    indices = torch.where(torch.arange(width, device=mask.device) < counts[..., None], indices, 0)
    return counts.contiguous(), indices.to(torch.int32).contiguous()


def _block_sizes(length: int, block: int, device=None) -> torch.Tensor:
    """Tokens in each block of a sequence (the last one may be short)."""
    starts = torch.arange(0, length, block, device=device)
    return (length - starts).clamp(max=block)


def default_blocks(head_dim: int = 128, device: torch.device | str | None = None) -> tuple[int, int]:
    """(block_q, block_kv) for the kernel on this device: 128 x 64 on Ampere and newer up to head dim 128
    (what FlashAttention-2 style kernels use there), smaller where registers or shared memory are tight."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        if major < 8:
            return (64, 64) if head_dim <= 64 else (64, 32)
    return (128, 64) if head_dim <= 128 else (64, 32)


def _block_positions(blocks: torch.Tensor, block: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the given blocks, (P, block), clamped into the sequence, and which of them are real."""
    positions = blocks[:, None] * block + torch.arange(block, device=blocks.device)
    return positions.clamp(max=length - 1), positions < length


def _range_table(limits: torch.Tensor, reduce) -> torch.Tensor:
    """(L, L): table[a, b] = reduce(limits[a..b]) for a <= b, the limit over a span of frame distances."""
    length = len(limits)
    table = limits.new_zeros(length, length)
    for a in range(length):
        table[a, a:] = reduce(limits[a:], 0).values
    return table


class _Boxes:
    """A token table cut into boxes, block by block: a box is a run of consecutive positions of one block, one
    segment and one frame whose tokens fill the box [low, high] of (t, y, x) (rows of a tile, each a run of
    x stepping by 0 or 1). Any coordinate difference two boxes allow is one some token pair has, so
    classifying box pairs from their bounds is exact. A block of a tile is one box; one that straddles
    tiles, frames or segments is a few."""

    def __init__(self, tokens: TokenTable, block: int):
        coords, segments = tokens.coords, tokens.segments
        length = len(tokens)
        position = torch.arange(length, device=coords.device)
        blocks = position // block
        step = coords[1:] - coords[:-1]
        new_run = torch.ones(length, dtype=torch.bool, device=coords.device)
        new_run[1:] = (
            (blocks[1:] != blocks[:-1])
            | (segments[1:] != segments[:-1])
            | (step[:, 0] != 0)
            | (step[:, 1] != 0)
            | ((step[:, 2] != 0) & (step[:, 2] != 1))
        )
        first = new_run.nonzero().flatten()
        last = torch.cat([first[1:], first.new_tensor([length])]) - 1
        run_low, run_high = coords[first], coords[last]
        run_block, run_segment = blocks[first], segments[first]
        new_box = torch.ones(len(first), dtype=torch.bool, device=coords.device)
        new_box[1:] = (
            (run_block[1:] != run_block[:-1])
            | (run_segment[1:] != run_segment[:-1])
            | (run_low[1:, 0] != run_low[:-1, 0])
            | (run_low[1:, 2] != run_low[:-1, 2])
            | (run_high[1:, 2] != run_high[:-1, 2])
            | (run_low[1:, 1] != run_low[:-1, 1] + 1)
        )
        box_first = new_box.nonzero().flatten()
        box_last = torch.cat([box_first[1:], box_first.new_tensor([len(first)])]) - 1
        self.low, self.high = run_low[box_first], run_high[box_last]  # (boxes, 3)
        self.segment, self.block = run_segment[box_first].long(), run_block[box_first]
        self.num_blocks = -(-length // block)
        self.count = torch.bincount(self.block, minlength=self.num_blocks)  # boxes per block
        self.start = self.count.cumsum(0) - self.count
        self.tokens = torch.cat([first[1:], first.new_tensor([length])])[box_last] - first[box_first]


class _BlockBounds:
    """Per block: how many tokens of each segment it holds, the range of each coordinate, and its boxes."""

    def __init__(self, tokens: TokenTable, block: int, num_segments: int):
        self.boxes = boxes = _Boxes(tokens, block)
        self.num_blocks = boxes.num_blocks
        index = boxes.block[:, None].expand(-1, 3)
        self.low = boxes.low.new_zeros(self.num_blocks, 3).scatter_reduce(
            0, index, boxes.low, "amin", include_self=False
        )
        self.high = boxes.high.new_zeros(self.num_blocks, 3).scatter_reduce(
            0, index, boxes.high, "amax", include_self=False
        )
        self.counts = torch.zeros(self.num_blocks * num_segments, device=tokens.coords.device)
        self.counts.index_add_(0, boxes.block * num_segments + boxes.segment, boxes.tokens.float())
        self.counts = self.counts.view(self.num_blocks, num_segments)  # (NB, segments)
        self.segments = (self.counts > 0).float()
        self.one_box = boxes.count == 1

    def rows(self, index: slice) -> _BlockBounds:
        part = object.__new__(_BlockBounds)
        part.boxes, part.num_blocks = self.boxes, len(range(*index.indices(self.num_blocks)))
        part.low, part.high = self.low[index], self.high[index]
        part.counts, part.segments, part.one_box = (
            self.counts[index],
            self.segments[index],
            self.one_box[index],
        )
        return part

    def classify(self, keys: _BlockBounds, rule: ElementRule, ranges) -> tuple[torch.Tensor, ...]:
        """(NQ, NK) bool maps full, partial and unsure, from the bounds alone: a pair is full when every
        query may attend every key of the other block, skipped when none may, partial when some may and
        both blocks are one box each (then the bounds are exact), unsure otherwise."""
        if rule.metric is Metric.NONE:  # segments alone: the counts are exact
            allowed = self.counts @ rule.allow.float() @ keys.counts.T
            area = self.counts.sum(1)[:, None] * keys.counts.sum(1)[None]
            full = allowed == area
            return full, (allowed > 0) & ~full, torch.zeros_like(full)
        pair_count = lambda table: self.segments @ table.float() @ keys.segments.T > 0  # noqa: E731
        allow_any = pair_count(rule.allow)
        spatial_any = pair_count(rule.spatial & ~rule.allow)
        blocked_any = pair_count(~rule.allow & ~rule.spatial)
        near_possible, near_all = _near(
            self.low[:, None], self.high[:, None], keys.low[None], keys.high[None], rule, ranges
        )
        may = allow_any | (spatial_any & near_possible)
        full = may & ~blocked_any & (~spatial_any | near_all)
        exact = self.one_box[:, None] & keys.one_box[None]
        return full, may & ~full & exact, may & ~full & ~exact


def _near(q_low, q_high, k_low, k_high, rule: ElementRule, ranges) -> tuple[torch.Tensor, torch.Tensor]:
    """For boxes of coordinates: whether some pair of their points is within the rule's limit, and whether
    every pair is (the limit taken over the frame distances the boxes span)."""
    gap = torch.maximum(q_low - k_high, k_low - q_high).clamp(min=0)
    far = torch.maximum(q_high - k_low, k_high - q_low)
    last = len(rule.limits) - 1
    frames_near, frames_far = gap[..., 0].clamp(max=last).long(), far[..., 0].clamp(max=last).long()
    largest, smallest = ranges
    near_possible = _distance(gap, rule.metric) < largest[frames_near, frames_far]
    return near_possible, _distance(far, rule.metric) < smallest[frames_near, frames_far]


def _refine(q_bounds, kv_bounds, pairs, rule, ranges, max_pairs) -> tuple[torch.Tensor, torch.Tensor]:
    """full and partial (P,) of block pairs (P, 2) by their boxes: every box of the query block against every
    box of the key block, a batch of box pairs at a time."""
    qb, kb = q_bounds.boxes, kv_bounds.boxes
    any_allowed = torch.zeros(len(pairs), dtype=torch.bool, device=pairs.device)
    all_allowed = torch.zeros_like(any_allowed)
    box_pairs = qb.count[pairs[:, 0]] * kb.count[pairs[:, 1]]
    bounds = box_pairs.cumsum(0)
    begin = 0
    while begin < len(pairs):
        end = max(begin + 1, int(torch.searchsorted(bounds, bounds[begin] - box_pairs[begin] + max_pairs)))
        sizes = box_pairs[begin:end]
        owner = torch.repeat_interleave(torch.arange(end - begin, device=pairs.device), sizes)
        offset = torch.arange(len(owner), device=pairs.device) - (sizes.cumsum(0) - sizes)[owner]
        width = kb.count[pairs[begin:end, 1]][owner]
        qi = qb.start[pairs[begin:end, 0]][owner] + offset // width
        ki = kb.start[pairs[begin:end, 1]][owner] + offset % width
        qs, ks = qb.segment[qi], kb.segment[ki]
        near_possible, near_all = _near(qb.low[qi], qb.high[qi], kb.low[ki], kb.high[ki], rule, ranges)
        spatial = rule.spatial[qs, ks]
        allowed, some = rule.allow[qs, ks], spatial & near_possible
        every = allowed | (spatial & near_all)
        some |= allowed
        denied = torch.zeros(end - begin, device=pairs.device).index_add_(0, owner, (~every).float())
        granted = torch.zeros(end - begin, device=pairs.device).index_add_(0, owner, some.float())
        any_allowed[begin:end], all_allowed[begin:end] = granted > 0, denied == 0
        begin = end
    return all_allowed, any_allowed & ~all_allowed


def _distance(delta: torch.Tensor, metric: Metric) -> torch.Tensor:
    """The rule's distance of coordinate differences (..., 3) (t, y, x), float32."""
    if metric is Metric.BAND:
        distance = delta[..., 2]
    elif metric is Metric.BOX:
        distance = torch.maximum(delta[..., 1], delta[..., 2])
    else:
        distance = delta[..., 1] * delta[..., 1] + delta[..., 2] * delta[..., 2]  # int32, as evaluate
    return distance.to(torch.float32)


def _count_pairs(rule, q_tokens, kv_tokens, pairs, block_q, block_kv, max_chunk_elements) -> torch.Tensor:
    """Allowed elements of each block pair (P, 2) (query block, key block), evaluated a batch at a time."""
    counts = torch.zeros(len(pairs), dtype=torch.int64, device=pairs.device)
    per_batch = max(1, max_chunk_elements // (block_q * block_kv))
    for start in range(0, len(pairs), per_batch):
        batch = pairs[start : start + per_batch]
        q_idx, q_ok = _block_positions(batch[:, 0], block_q, len(q_tokens))
        k_idx, k_ok = _block_positions(batch[:, 1], block_kv, len(kv_tokens))
        mask = rule.evaluate_tables(
            q_tokens.coords[q_idx],
            q_tokens.segments[q_idx],
            kv_tokens.coords[k_idx],
            kv_tokens.segments[k_idx],
        )
        mask &= q_ok[:, :, None] & k_ok[:, None, :]
        counts[start : start + len(batch)] = mask.sum((1, 2))
    return counts


class BlockSparsePattern:
    """A block-sparse attention pattern with an optional element rule (see the module docstring).

    Build one with `from_rule`, `from_block_mask` or `dense`, or with the method builders
    (`attnpack.patterns.radial`, `attnpack.patterns.clear_window`).
    """

    def __init__(
        self,
        *,
        q_len: int,
        kv_len: int,
        block_q: int,
        block_kv: int,
        full: torch.Tensor,
        partial: torch.Tensor,
        rule: ElementRule | None = None,
        q_tokens: TokenTable | None = None,
        kv_tokens: TokenTable | None = None,
        q_order: torch.Tensor | None = None,
        kv_order: torch.Tensor | None = None,
        allowed_elements: int | None = None,
    ):
        """`full` and `partial` are (G, NQ, NK) bool block maps over positions; G head groups."""
        for name, block in (("block_q", block_q), ("block_kv", block_kv)):
            if not isinstance(block, int) or block < 16 or block & (block - 1):
                raise ValueError(f"BlockSparsePattern: {name}={block!r} must be a power of two >= 16")
        num_q, num_kv = -(-q_len // block_q), -(-kv_len // block_kv)
        if full.ndim == 2:
            full, partial = full[None], partial[None]
        if full.shape != partial.shape or full.shape[1:] != (num_q, num_kv):
            raise ValueError(
                f"BlockSparsePattern: block maps {tuple(full.shape)} / {tuple(partial.shape)} must be "
                f"(groups, {num_q}, {num_kv}) for q_len={q_len}, kv_len={kv_len}, blocks {block_q}x{block_kv}"
            )
        if bool((full & partial).any()):
            raise ValueError("BlockSparsePattern: a block cannot be both full and partial")
        if bool(partial.any()) and (rule is None or q_tokens is None or kv_tokens is None):
            raise ValueError(
                "BlockSparsePattern: partial blocks need an element rule and q / kv token tables"
            )
        if q_tokens is not None and len(q_tokens) != q_len:
            raise ValueError(f"BlockSparsePattern: q_tokens has {len(q_tokens)} tokens, q_len is {q_len}")
        if kv_tokens is not None and len(kv_tokens) != kv_len:
            raise ValueError(f"BlockSparsePattern: kv_tokens has {len(kv_tokens)} tokens, kv_len is {kv_len}")
        for name, order, length in (("q_order", q_order, q_len), ("kv_order", kv_order, kv_len)):
            if order is not None and order.shape != (length,):
                raise ValueError(f"BlockSparsePattern: {name} {tuple(order.shape)} must be ({length},)")
        self.q_len, self.kv_len = q_len, kv_len
        self.block_q, self.block_kv = block_q, block_kv
        self.full, self.partial = full.to(torch.bool), partial.to(torch.bool)
        self.has_partial = bool(self.partial.any())  # read once: the kernels' launch must not sync the device
        self.rule, self.q_tokens, self.kv_tokens = rule, q_tokens, kv_tokens
        self.q_order = None if q_order is None else q_order.to(torch.int64)
        self.kv_order = None if kv_order is None else kv_order.to(torch.int64)
        self._allowed_elements = allowed_elements
        self._lists: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._device_cache: dict[torch.device, BlockSparsePattern] = {}
        self.kernel_cache: dict = {}  # what a kernel derives from the pattern (launch arguments), made once

    # ---- construction

    @classmethod
    def from_rule(
        cls,
        rule: ElementRule,
        q_tokens: TokenTable,
        kv_tokens: TokenTable,
        *,
        block_q: int,
        block_kv: int,
        q_order: torch.Tensor | None = None,
        kv_order: torch.Tensor | None = None,
        max_chunk_elements: int = 1 << 24,
    ) -> BlockSparsePattern:
        """Classify every block exactly, on the tables' device, without a token-level S x S tensor.

        Per-block bounds (segment counts, coordinate ranges) decide most block pairs at once: skipped, full,
        or partial where both blocks are one box of tokens. The pairs they leave unsure (blocks that mix
        segments, frames or tiles) are decided from their boxes, which is exact.
        """
        q_len, kv_len = len(q_tokens), len(kv_tokens)
        device = q_tokens.coords.device
        rule, kv_tokens = rule.to(device), kv_tokens.to(device)
        segments = rule.num_segments
        q_bounds = _BlockBounds(q_tokens, block_q, segments)
        kv_bounds = _BlockBounds(kv_tokens, block_kv, segments)
        ranges = (_range_table(rule.limits, torch.cummax), _range_table(rule.limits, torch.cummin))
        full = torch.zeros(q_bounds.num_blocks, kv_bounds.num_blocks, dtype=torch.bool, device=device)
        partial = torch.zeros_like(full)
        rows_per_batch = max(
            1, max_chunk_elements // (8 * kv_bounds.num_blocks)
        )  # bounds cost ~8 words a pair
        for start in range(0, q_bounds.num_blocks, rows_per_batch):
            rows = slice(start, start + rows_per_batch)
            full_rows, partial_rows, unsure = q_bounds.rows(rows).classify(kv_bounds, rule, ranges)
            pairs = unsure.nonzero()
            if len(pairs):
                pairs[:, 0] += start
                whole, part = _refine(q_bounds, kv_bounds, pairs, rule, ranges, max_chunk_elements // 8)
                full_rows[pairs[:, 0] - start, pairs[:, 1]] = whole
                partial_rows[pairs[:, 0] - start, pairs[:, 1]] = part
            full[rows], partial[rows] = full_rows, partial_rows
        return cls(
            q_len=q_len,
            kv_len=kv_len,
            block_q=block_q,
            block_kv=block_kv,
            full=full,
            partial=partial,
            rule=rule,
            q_tokens=q_tokens,
            kv_tokens=kv_tokens,
            q_order=q_order,
            kv_order=kv_order,
        )

    @classmethod
    def from_block_mask(
        cls,
        block_mask: torch.Tensor,
        *,
        q_len: int,
        kv_len: int,
        block_q: int,
        block_kv: int,
        q_order: torch.Tensor | None = None,
        kv_order: torch.Tensor | None = None,
    ) -> BlockSparsePattern:
        """A block-level pattern: every token of a selected block attends every token of it."""
        block_mask = block_mask.to(torch.bool)
        return cls(
            q_len=q_len,
            kv_len=kv_len,
            block_q=block_q,
            block_kv=block_kv,
            full=block_mask,
            partial=torch.zeros_like(block_mask),
            q_order=q_order,
            kv_order=kv_order,
        )

    @classmethod
    def dense(cls, q_len: int, kv_len: int, *, block_q: int = 128, block_kv: int = 64) -> BlockSparsePattern:
        """Every block on: dense attention through the block-sparse kernel."""
        shape = (1, -(-q_len // block_q), -(-kv_len // block_kv))
        return cls.from_block_mask(
            torch.ones(shape, dtype=torch.bool),
            q_len=q_len,
            kv_len=kv_len,
            block_q=block_q,
            block_kv=block_kv,
        )

    @classmethod
    def stack(cls, patterns: list[BlockSparsePattern]) -> BlockSparsePattern:
        """Head groups: pattern g serves heads [g * H / G, (g + 1) * H / G). All share geometry, rule and tokens."""
        first = patterns[0]
        for other in patterns[1:]:
            same = (other.q_len, other.kv_len, other.block_q, other.block_kv) == (
                first.q_len,
                first.kv_len,
                first.block_q,
                first.block_kv,
            )
            if not same or other.rule is not first.rule or other.q_tokens is not first.q_tokens:
                raise ValueError(
                    "BlockSparsePattern.stack: patterns must share lengths, blocks, rule and tokens"
                )
        allowed = [p._allowed_elements for p in patterns]
        return cls(
            q_len=first.q_len,
            kv_len=first.kv_len,
            block_q=first.block_q,
            block_kv=first.block_kv,
            full=torch.cat([p.full for p in patterns]),
            partial=torch.cat([p.partial for p in patterns]),
            rule=first.rule,
            q_tokens=first.q_tokens,
            kv_tokens=first.kv_tokens,
            q_order=first.q_order,
            kv_order=first.kv_order,
            allowed_elements=None if None in allowed else sum(allowed),
        )

    # ---- geometry and statistics

    @property
    def num_groups(self) -> int:
        return self.full.shape[0]

    @property
    def num_q_blocks(self) -> int:
        return self.full.shape[1]

    @property
    def num_kv_blocks(self) -> int:
        return self.full.shape[2]

    @property
    def device(self) -> torch.device:
        return self.full.device

    def _block_area(self) -> torch.Tensor:
        rows = _block_sizes(self.q_len, self.block_q, self.device)
        cols = _block_sizes(self.kv_len, self.block_kv, self.device)
        return rows[:, None] * cols[None, :]

    @property
    def computed_elements(self) -> int:
        """Query-key pairs inside computed blocks (the kernel's work), summed over head groups."""
        return int(((self.full | self.partial) * self._block_area()).sum())

    @property
    def allowed_elements(self) -> int:
        """Query-key pairs the pattern allows, summed over head groups."""
        if self._allowed_elements is None:
            self._allowed_elements = int((self.full * self._block_area()).sum())
            for group in self.partial:  # counted per partial block, never as an S x S mask
                pairs = group.nonzero()
                self._allowed_elements += int(
                    _count_pairs(
                        self.rule, self.q_tokens, self.kv_tokens, pairs, self.block_q, self.block_kv, 1 << 24
                    ).sum()
                )
        return self._allowed_elements

    @property
    def block_density(self) -> float:
        """Fraction of the full score matrix that the kernel computes."""
        return self.computed_elements / (self.num_groups * self.q_len * self.kv_len)

    @property
    def element_density(self) -> float:
        """Fraction of the full score matrix that the pattern allows."""
        return self.allowed_elements / (self.num_groups * self.q_len * self.kv_len)

    @property
    def num_blocks(self) -> int:
        return int((self.full | self.partial).sum())

    def __repr__(self) -> str:
        return (
            f"BlockSparsePattern(q_len={self.q_len}, kv_len={self.kv_len}, blocks={self.block_q}x{self.block_kv}, "
            f"groups={self.num_groups}, block_density={self.block_density:.4f}, "
            f"full={int(self.full.sum())}, partial={int(self.partial.sum())})"
        )

    # ---- what the kernels read

    def lists(self, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        """BSR lists: "full" / "partial" / "all" (key blocks per query block) and "full_t" / "partial_t"
        (query blocks per key block, for the backward pass)."""
        if kind not in self._lists:
            maps = {"full": self.full, "partial": self.partial, "all": self.full | self.partial}
            block_map = maps[kind.removesuffix("_t")]
            self._lists[kind] = _bsr(block_map.transpose(1, 2) if kind.endswith("_t") else block_map)
        return self._lists[kind]

    def to(self, device) -> BlockSparsePattern:
        """The pattern on `device` (cached: converting is free after the first call)."""
        device = torch.device(device)
        if device == self.device or (device.type == self.device.type and device.index is None):
            return self
        if device not in self._device_cache:
            self._device_cache[device] = BlockSparsePattern(
                q_len=self.q_len,
                kv_len=self.kv_len,
                block_q=self.block_q,
                block_kv=self.block_kv,
                full=self.full.to(device),
                partial=self.partial.to(device),
                rule=None if self.rule is None else self.rule.to(device),
                q_tokens=None if self.q_tokens is None else self.q_tokens.to(device),
                kv_tokens=None if self.kv_tokens is None else self.kv_tokens.to(device),
                q_order=None if self.q_order is None else self.q_order.to(device),
                kv_order=None if self.kv_order is None else self.kv_order.to(device),
                allowed_elements=self._allowed_elements,
            )
        return self._device_cache[device]

    # ---- the dense mask

    def to_dense(self, *, order: str = "tokens") -> torch.Tensor:
        """The token-level mask (G, Sq, Sk), bool, True where a query may attend a key.

        `order="tokens"` (default) answers in the caller's token order, `"positions"` in pattern order.
        Memory is Sq x Sk per group: for tests, pictures and the reference, not for long videos.
        """
        if order not in ("tokens", "positions"):
            raise ValueError(f"to_dense: order={order!r}; accepted: 'tokens', 'positions'")
        rows = torch.arange(self.q_len, device=self.device) // self.block_q
        cols = torch.arange(self.kv_len, device=self.device) // self.block_kv
        full = self.full[:, rows][:, :, cols]
        mask = full
        if self.has_partial:
            partial = self.partial[:, rows][:, :, cols]
            mask = full | (partial & self.rule.evaluate(self.q_tokens, self.kv_tokens)[None])
        if order == "positions":
            return mask
        if self.q_order is not None:
            mask = mask[:, inverse_order(self.q_order)]
        if self.kv_order is not None:
            mask = mask[:, :, inverse_order(self.kv_order)]
        return mask


def block_counts(mask: torch.Tensor, block_q: int, block_kv: int) -> torch.Tensor:
    """Allowed elements per block of a (G, Sq, Sk) mask in position order: (G, NQ, NK) int64."""
    groups, q_len, kv_len = mask.shape
    num_q, num_kv = -(-q_len // block_q), -(-kv_len // block_kv)
    padded = torch.zeros(groups, num_q * block_q, num_kv * block_kv, dtype=torch.int32, device=mask.device)
    padded[:, :q_len, :kv_len] = mask
    return padded.view(groups, num_q, block_q, num_kv, block_kv).sum((2, 4))


__all__ = [
    "MAX_SEGMENTS",
    "BlockSparsePattern",
    "ElementRule",
    "Metric",
    "TokenTable",
    "block_counts",
    "default_blocks",
]
