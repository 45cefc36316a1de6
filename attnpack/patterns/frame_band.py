"""Frame bands: every video token attends the tokens of the frames within `radius` frames of its own; and
FreeLong's public local window (`frame_window_mask`, `frame_window`): the band, shifted to exactly `window`
frames where it runs past an end."""

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
    _check("frame_band", grid, "radius", radius, low=0)
    blocks = blocks or default_blocks(device=device)
    return _frame_band(tuple(grid), radius, tuple(blocks), str(torch.device(device)))


def _check(owner: str, grid, name: str, frames, *, low: int) -> None:
    if len(grid) != 3 or min(grid) < 1:
        raise ValueError(f"{owner}: grid={grid!r} must be (frames, height, width) of positive sizes")
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < low:
        raise ValueError(f"{owner}: {name}={frames!r} must be an integer >= {low} (frames)")


@functools.lru_cache(maxsize=32)
def _frame_band(grid, radius, blocks, device) -> BlockSparsePattern:
    limits = torch.tensor([IN_REACH] * (radius + 1) + [OUT_OF_REACH])
    rule = ElementRule(
        torch.zeros(1, 1, dtype=torch.bool), torch.ones(1, 1, dtype=torch.bool), Metric.BAND, limits
    )
    tokens = TokenTable.of(grid_coordinates(grid)).to(device)
    return BlockSparsePattern.from_rule(rule, tokens, tokens, block_q=blocks[0], block_kv=blocks[1])


def frame_window_mask(frames: int, window: int, *, device: torch.device | str = "cpu") -> torch.Tensor:
    """(frames, frames) bool, FreeLong's public local mask (`get_adjusted_local_mask`): query frame f sees
    f - window // 2 .. f + window // 2 (window + 1 frames for an even window), and where that runs past an
    end, exactly `window` frames from that end."""
    for name, value in (("frames", frames), ("window", window)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"frame_window_mask: {name}={value!r} must be an integer >= 1")
    query = torch.arange(frames, device=device)
    start = (query - window // 2).clamp(min=0)
    end = (query + window // 2 + 1).clamp(max=frames)
    short = end - start < window
    from_start = short & (start == 0)
    end = torch.where(from_start, (start + window).clamp(max=frames), end)
    start = torch.where(short & ~from_start, (end - window).clamp(min=0), start)
    return (query[None, :] >= start[:, None]) & (query[None, :] < end[:, None])


# frame_window's segments: queries by which keys they see, keys by which end windows hold them
Q_FIRST, Q_LAST, Q_BAND = 0, 1, 2
K_NEITHER, K_FIRST, K_LAST, K_BOTH = 0, 1, 2, 3


def frame_window(
    grid: tuple[int, int, int],
    window: int,
    *,
    blocks: tuple[int, int] | None = None,
    device: torch.device | str = "cpu",
) -> BlockSparsePattern:
    """`frame_window_mask` over a raster (F, H, W) video grid, as token segments: queries of the first frames
    see the first `window` frames, those of the last frames the last `window`, the others a band of radius
    window // 2."""
    _check("frame_window", grid, "window", window, low=1)
    blocks = blocks or default_blocks(device=device)
    return _frame_window(tuple(grid), window, tuple(blocks), str(torch.device(device)))


@functools.lru_cache(maxsize=32)
def _frame_window(grid, window, blocks, device) -> BlockSparsePattern:
    frames = grid[0]
    mask = frame_window_mask(frames, window)
    keys = torch.arange(frames)
    first, last = keys < window, keys >= frames - window
    band = (keys[:, None] - keys[None, :]).abs() <= window // 2
    q_segment = torch.full((frames,), Q_BAND)
    q_segment[(mask == first[None, :]).all(1)] = Q_FIRST
    q_segment[(mask == last[None, :]).all(1) & (q_segment != Q_FIRST)] = Q_LAST
    if not torch.equal(mask[q_segment == Q_BAND], band[q_segment == Q_BAND]):  # the rule below is exact
        raise AssertionError(f"frame_window: {grid}, window {window}: a middle frame is not a band")
    k_segment = first.long() * K_FIRST + last.long() * K_LAST  # K_BOTH = K_FIRST + K_LAST
    allow = torch.zeros(4, 4, dtype=torch.bool)
    allow[Q_FIRST, K_FIRST] = allow[Q_FIRST, K_BOTH] = allow[Q_LAST, K_LAST] = allow[Q_LAST, K_BOTH] = True
    spatial = torch.zeros(4, 4, dtype=torch.bool)
    spatial[Q_BAND] = True
    limits = torch.tensor([IN_REACH] * (window // 2 + 1) + [OUT_OF_REACH])
    rule = ElementRule(allow, spatial, Metric.BAND, limits)
    per_frame = grid[1] * grid[2]
    coords = grid_coordinates(grid)
    q_tokens = TokenTable.of(coords, q_segment.repeat_interleave(per_frame)).to(device)
    kv_tokens = TokenTable.of(coords, k_segment.repeat_interleave(per_frame)).to(device)
    return BlockSparsePattern.from_rule(rule, q_tokens, kv_tokens, block_q=blocks[0], block_kv=blocks[1])
