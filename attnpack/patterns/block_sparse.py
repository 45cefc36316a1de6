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
        """allow and spatial as one int32 bitmask per query segment (bit j: key segment j)."""
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


class _BlockBounds:
    """Per block of a token table: which segments occur, and the range of each coordinate."""

    def __init__(self, tokens: TokenTable, block: int, num_segments: int):
        length = len(tokens)
        self.num_blocks = -(-length // block)
        blocks = torch.arange(self.num_blocks, device=tokens.coords.device)
        positions, valid = _block_positions(blocks, block, length)
        coords = tokens.coords[positions].long()  # (NB, block, 3); padding repeats the last token
        self.low, self.high = coords.amin(1), coords.amax(1)
        one_hot = torch.nn.functional.one_hot(tokens.segments[positions].long(), num_segments)
        self.segments = (one_hot.bool() & valid[..., None]).any(1).float()  # (NB, segments)

    def may_attend(self, keys: _BlockBounds, rule: ElementRule) -> torch.Tensor:
        """(NQ, NK) bool: False only where no query of one block may attend any key of the other."""
        allowed = self.segments @ rule.allow.float() @ keys.segments.T > 0
        if rule.metric is Metric.NONE:
            return allowed
        spatial = self.segments @ rule.spatial.float() @ keys.segments.T > 0
        gap = torch.maximum(self.low[:, None] - keys.high[None], keys.low[None] - self.high[:, None]).clamp(
            min=0
        )
        # the largest limit at any frame distance the two blocks can have
        largest = rule.limits.flip(0).cummax(0).values.flip(0)
        limit = largest[gap[..., 0].clamp(max=len(rule.limits) - 1)]
        if rule.metric is Metric.BAND:
            distance = gap[..., 2]
        elif rule.metric is Metric.BOX:
            distance = torch.maximum(gap[..., 1], gap[..., 2])
        else:
            distance = gap[..., 1] ** 2 + gap[..., 2] ** 2
        return allowed | (spatial & (distance.to(torch.float32) < limit))


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
        """Classify every block exactly by evaluating the rule on the tables' device.

        Per-block bounds (segments present, coordinate ranges) first rule out the block pairs that cannot
        hold an allowed element; the rest are counted exactly, a batch of pairs at a time.
        """
        q_len, kv_len = len(q_tokens), len(kv_tokens)
        device = q_tokens.coords.device
        rule, kv_tokens = rule.to(device), kv_tokens.to(device)
        segments = rule.num_segments
        q_bounds, kv_bounds = (
            _BlockBounds(q_tokens, block_q, segments),
            _BlockBounds(kv_tokens, block_kv, segments),
        )
        candidates = q_bounds.may_attend(kv_bounds, rule).nonzero()
        counts = torch.zeros(q_bounds.num_blocks, kv_bounds.num_blocks, dtype=torch.int64, device=device)
        pairs_per_batch = max(1, max_chunk_elements // (block_q * block_kv))
        for batch in candidates.split(pairs_per_batch):
            q_idx, q_ok = _block_positions(batch[:, 0], block_q, q_len)
            k_idx, k_ok = _block_positions(batch[:, 1], block_kv, kv_len)
            mask = rule.evaluate_tables(
                q_tokens.coords[q_idx],
                q_tokens.segments[q_idx],
                kv_tokens.coords[k_idx],
                kv_tokens.segments[k_idx],
            )
            mask &= q_ok[:, :, None] & k_ok[:, None, :]
            counts[batch[:, 0], batch[:, 1]] = mask.sum((1, 2))
        area = _block_sizes(q_len, block_q, device)[:, None] * _block_sizes(kv_len, block_kv, device)[None, :]
        full = counts == area
        partial = (counts > 0) & ~full
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
            allowed_elements=int(counts.sum()),
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
            if self.has_partial:
                self._allowed_elements = int(self.to_dense(order="positions").sum())
            else:
                self._allowed_elements = self.computed_elements
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
