"""Frame bands: every video token attends the tokens of the frames within `radius` frames of its own."""

from __future__ import annotations

import functools

import torch

from .block_sparse import BlockSparsePattern, ElementRule, Metric, TokenTable, default_blocks
from .tiling import grid_coordinates

OUT_OF_REACH = -1.0  # a limit no distance is below
IN_REACH = float(2**30)


def frame_band(
    grid: tuple[int, int, int],
    radius: int,
    *,
    blocks: tuple[int, int] | None = None,
    device: torch.device | str = "cpu",
) -> BlockSparsePattern:
    """Pattern over a raster (F, H, W) video grid: query frame f sees key frames f - radius .. f + radius.
    Tokens stay in raster order (frames are contiguous), so the band is whole blocks but at frame edges."""
    if len(grid) != 3 or min(grid) < 1:
        raise ValueError(f"frame_band: grid={grid!r} must be (frames, height, width) of positive sizes")
    if isinstance(radius, bool) or not isinstance(radius, int) or radius < 0:
        raise ValueError(f"frame_band: radius={radius!r} must be an integer >= 0 (frames)")
    blocks = blocks or default_blocks(device=device)
    return _frame_band(tuple(grid), radius, tuple(blocks), str(torch.device(device)))


@functools.lru_cache(maxsize=32)
def _frame_band(grid, radius, blocks, device) -> BlockSparsePattern:
    limits = torch.tensor([IN_REACH] * (radius + 1) + [OUT_OF_REACH])
    rule = ElementRule(
        torch.zeros(1, 1, dtype=torch.bool), torch.ones(1, 1, dtype=torch.bool), Metric.BAND, limits
    )
    tokens = TokenTable.of(grid_coordinates(grid)).to(device)
    return BlockSparsePattern.from_rule(rule, tokens, tokens, block_q=blocks[0], block_kv=blocks[1])
