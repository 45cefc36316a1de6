"""Subjects on a token grid: boxes and masks, repositioning, and the isolation rule as token segments.

IR-Diffusion's masks never become S x S tensors: every query and key token gets a segment id (background,
text, subject i in the target, subject i's repositioned reference, ...) and a small segment-by-segment
table says who may see whom. The block-sparse kernel reads the ids; sorting the tokens by id makes most
blocks wholly visible or wholly hidden.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .block_sparse import MAX_SEGMENTS, BlockSparsePattern, ElementRule, TokenTable, default_blocks
from .tiling import grid_coordinates

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in [0, 1]


def check_box(box, name: str = "box") -> Box:
    """A normalised (x0, y0, x1, y1) box, checked: four numbers in [0, 1] with x0 < x1 and y0 < y1."""
    if not isinstance(box, list | tuple) or len(box) != 4:
        raise ValueError(f"{name}={box!r} must be four numbers (x0, y0, x1, y1) in [0, 1]")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in box):
        raise ValueError(f"{name}={box!r} must be four numbers (x0, y0, x1, y1) in [0, 1]")
    x0, y0, x1, y1 = (float(v) for v in box)
    if not all(0 <= v <= 1 for v in (x0, y0, x1, y1)):
        raise ValueError(f"{name}={box!r} lies outside [0, 1]; coordinates are fractions of width and height")
    if not (x0 < x1 and y0 < y1):
        raise ValueError(f"{name}={box!r} is empty; it needs x0 < x1 and y0 < y1")
    return (x0, y0, x1, y1)


def box_mask(box: Box, grid: tuple[int, int]) -> torch.Tensor:
    """(H, W) bool: the tokens a normalised box covers (at least one)."""
    height, width = grid
    x0, y0, x1, y1 = box
    r0, c0 = min(int(y0 * height), height - 1), min(int(x0 * width), width - 1)
    r1, c1 = max(math.ceil(y1 * height), r0 + 1), max(math.ceil(x1 * width), c0 + 1)
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[r0:r1, c0:c1] = True
    return mask


def resize_mask(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """A (h, w) mask at another grid, nearest; bool."""
    if tuple(mask.shape) == tuple(grid):
        return mask.bool()
    return F.interpolate(mask[None, None].float(), size=grid, mode="nearest")[0, 0] > 0.5


def mask_bounds(mask: torch.Tensor) -> tuple[int, int, int, int] | None:
    """(row0, row1, col0, col1), ends exclusive, of a mask's true tokens; None for an empty mask."""
    rows, cols = mask.any(dim=1).nonzero(), mask.any(dim=0).nonzero()
    if len(rows) == 0:
        return None
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def reposition(
    features: torch.Tensor, source: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Move a subject: `features` (H, W, C) times the `source` mask, cropped to the mask's box, resized
    (nearest) to the box of the `target` mask and pasted there on a zero canvas. Returns the moved
    features (H, W, C) and the moved source mask (H, W) bool."""
    height, width, channels = features.shape
    moved = features.new_zeros(height, width, channels)
    moved_mask = torch.zeros(height, width, dtype=torch.bool, device=features.device)
    src, dst = mask_bounds(source), mask_bounds(target)
    if src is None or dst is None:
        return moved, moved_mask
    sr0, sr1, sc0, sc1 = src
    dr0, dr1, dc0, dc1 = dst
    masked = features * source.to(features.device, features.dtype)[..., None]
    crop = masked[sr0:sr1, sc0:sc1].permute(2, 0, 1)[None]
    crop_mask = source[sr0:sr1, sc0:sc1].to(features.device)[None, None].float()
    size = (dr1 - dr0, dc1 - dc0)
    moved[dr0:dr1, dc0:dc1] = (
        F.interpolate(crop.float(), size=size, mode="nearest")[0].permute(1, 2, 0).to(features.dtype)
    )
    moved_mask[dr0:dr1, dc0:dc1] = F.interpolate(crop_mask, size=size, mode="nearest")[0, 0] > 0.5
    return moved, moved_mask


def otsu_threshold(values: torch.Tensor, bins: int = 256) -> float:
    """Otsu's threshold of a set of values: the cut maximising the between-class variance."""
    values = values.flatten().float()
    low, high = values.min(), values.max()
    if high <= low:
        return float(low)
    histogram = torch.histc(values, bins=bins, min=float(low), max=float(high))
    centers = low + (torch.arange(bins, device=values.device) + 0.5) * (high - low) / bins
    weight = histogram.cumsum(0)
    mean = (histogram * centers).cumsum(0)
    total, total_mean = weight[-1], mean[-1]
    other = total - weight
    between = (total_mean * weight - mean * total) ** 2 / (weight * other).clamp(min=1e-12)
    between[other <= 0] = -1
    best = (between >= between.max() * (1 - 1e-6)).nonzero().flatten()  # ties: a gap between two modes
    edges = centers + (high - low) / bins / 2
    return float((edges[best[0]] + edges[best[-1]]) / 2)


# ---- the isolation rule as segments


@dataclass(frozen=True)
class Segments:
    """Segment ids of the isolation rule for `subjects` subjects: 0 hidden, 1 background, 2 text, then per
    subject its target tokens, its reference tokens, its reference's text, and its target queries that
    skip the reference this step (dropout)."""

    subjects: int

    HIDDEN = 0
    BACKGROUND = 1
    TEXT = 2

    def __post_init__(self):
        if self.count > MAX_SEGMENTS:
            raise ValueError(
                f"isolation: {self.subjects} subjects need {self.count} token segments; the kernel takes "
                f"{MAX_SEGMENTS} (at most {(MAX_SEGMENTS - 3) // 4} subjects)"
            )

    @property
    def count(self) -> int:
        return 3 + 4 * self.subjects

    def subject(self, i: int) -> int:
        return 3 + i

    def reference(self, i: int) -> int:
        return 3 + self.subjects + i

    def reference_text(self, i: int) -> int:
        return 3 + 2 * self.subjects + i

    def dropped(self, i: int) -> int:
        return 3 + 3 * self.subjects + i

    def rule(self, isolate: bool = True, mutual: bool = True) -> ElementRule:
        """Target queries by segment: background and text see the target's tokens; subject i sees the
        target's tokens but other subjects' (when `isolate`), and, when `mutual`, its reference's tokens and
        text, unless dropped this step; nothing sees hidden tokens."""
        n = self.count
        allow = torch.zeros(n, n, dtype=torch.bool)
        target = [self.BACKGROUND, self.TEXT, *(self.subject(i) for i in range(self.subjects))]
        for q in target:
            allow[q, target] = True
        for i in range(self.subjects):
            if isolate:
                others = [self.subject(j) for j in range(self.subjects) if j != i]
                allow[self.subject(i), others] = False
            allow[self.dropped(i)] = allow[self.subject(i)]
            if mutual:
                allow[self.subject(i), [self.reference(i), self.reference_text(i)]] = True
        return ElementRule(allow, torch.zeros(n, n, dtype=torch.bool))


def segment_pattern(
    rule: ElementRule,
    query_segments: torch.Tensor,
    key_segments: torch.Tensor,
    *,
    blocks: tuple[int, int] | None = None,
) -> BlockSparsePattern:
    """The pattern of a segment rule over token segment ids, with queries and keys sorted by segment so
    that blocks are mostly whole (the kernel permutes the tokens and back)."""
    device = query_segments.device
    blocks = blocks or default_blocks(device=device)
    q_order = torch.argsort(query_segments, stable=True)
    k_order = torch.argsort(key_segments, stable=True)
    coords = lambda n: grid_coordinates((1, 1, n)).to(device)  # noqa: E731 (the rule reads segments only)
    q_tokens = TokenTable(coords(len(query_segments)), query_segments[q_order])
    k_tokens = TokenTable(coords(len(key_segments)), key_segments[k_order])
    return BlockSparsePattern.from_rule(
        rule, q_tokens, k_tokens, block_q=blocks[0], block_kv=blocks[1], q_order=q_order, kv_order=k_order
    )
