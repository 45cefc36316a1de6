"""Radial attention (Li et al., 2025): O(n log n) sparse attention for video DiTs.

Attention between two frames gets less budget the farther apart they are: frame pairs at distance d <= 1
attend fully; beyond, each query sees a window whose width halves with every doubling of d, and once the
window drops below a block, only every (block / window)-th frame pair is kept at all.

Two variants of the same budget:

- ``official`` reproduces what the public code (mit-han-lab/radial-attention) computes: the window is a
  band |i - j| <= width on the raster token index inside each frame pair, the first frame is a full key
  frame (attention sink), and the token mask is reduced to ``block_size`` blocks the way their code does:
  a block is kept when more than 60% of its non-empty columns have a density above 1/3.
- ``spatial`` spends the same per-distance budget on 2D windows of tiles: the frame is cut into tiles of a
  query block (8 x 16 tokens), and a query tile attends the key tiles whose centres lie in a disc of the
  band's area around its own centre (like sliding tile attention). The window covers the nearest pixels
  instead of a strip of rows, and, being whole tiles, whole blocks: nothing computed is thrown away.

Text tokens (a joint sequence: HunyuanVideo's text last, CogVideoX's first) attend and are attended
everywhere.
"""

from __future__ import annotations

import functools
import math

import torch

from .block_sparse import BlockSparsePattern, ElementRule, Metric, TokenTable, default_blocks
from .tiling import block_tile, concat_orders, grid_coordinates, identity_order, tile_order

VARIANTS = ("official", "spatial")


# The public code's skip rule (`get_diagonal_split_mask`) compares the window with 128 whatever block size its
# processor runs (Wan 2.2's runs 64); its window floor follows the block size.
PUBLIC_SKIP_THRESHOLD = 128


def frame_budget(
    tokens_per_frame: int,
    distance: int,
    decay_factor: float,
    block_size: int,
    skip_threshold: int | None = None,
) -> float | None:
    """The band half-width (in tokens) two frames `distance` apart get, inf for full attention, or None
    when the pair is skipped: once the undecayed window is below `skip_threshold` (default `block_size`),
    only every (threshold / window)-th distance is kept."""
    if distance <= 1:
        return math.inf
    halvings = distance.bit_length()
    base = 2 ** tokens_per_frame.bit_length() / 2**halvings
    threshold = block_size if skip_threshold is None else skip_threshold
    if base < threshold and distance % int(threshold / base) != 0:
        return None
    return max(base * decay_factor, block_size)


def radial(
    num_frames: int,
    frame_shape: tuple[int, int],
    *,
    decay_factor: float,
    sink: bool = True,
    text_tokens: int = 0,
    text_first: bool = False,
    variant: str = "official",
    block_size: int = 128,
    blocks: tuple[int, int] | None = None,
    device: torch.device | str | None = None,
) -> BlockSparsePattern:
    """The radial pattern of a video of `num_frames` latent frames of `frame_shape` (H, W) tokens.

    `text_tokens` text tokens sit after the video (or before, `text_first`). `block_size` is the paper's
    block (width floor, skip rule and, for ``official``, the reduction); `blocks` the kernel's
    (block_q, block_kv), by default the device's, and for ``official`` at most `block_size`.
    """
    _validate(num_frames, frame_shape, decay_factor, text_tokens, variant, block_size)
    if blocks is None:
        blocks = default_blocks(128, device)
        if variant == "official":
            blocks = (min(blocks[0], block_size), min(blocks[1], block_size))
    arguments = (
        num_frames,
        tuple(frame_shape),
        float(decay_factor),
        bool(sink),
        text_tokens,
        text_first,
        block_size,
    )
    if variant == "official":
        pattern = _official(*arguments, blocks)
    else:  # classifying blocks is O(S^2 / blocks) work: do it where the pattern will run
        pattern = _spatial(*arguments, blocks, str(torch.device(device or "cpu")))
    return pattern if device is None else pattern.to(device)


def _validate(num_frames, frame_shape, decay_factor, text_tokens, variant, block_size) -> None:
    if not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"radial: num_frames={num_frames!r} must be an integer >= 1")
    if len(frame_shape) != 2 or any(not isinstance(n, int) or n < 1 for n in frame_shape):
        raise ValueError(f"radial: frame_shape={frame_shape!r} must be (H, W), two positive integers")
    if not isinstance(decay_factor, (int, float)) or not decay_factor > 0 or not math.isfinite(decay_factor):
        raise ValueError(f"radial: decay_factor={decay_factor!r} must be a number > 0")
    if not isinstance(text_tokens, int) or text_tokens < 0:
        raise ValueError(f"radial: text_tokens={text_tokens!r} must be an integer >= 0")
    if variant not in VARIANTS:
        raise ValueError(f"radial: variant={variant!r} is not one of {', '.join(map(repr, VARIANTS))}")
    if not isinstance(block_size, int) or block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"radial: block_size={block_size!r} must be a power of two >= 16")


@functools.lru_cache(maxsize=64)
def _official(num_frames, frame_shape, decay_factor, sink, text_tokens, text_first, block_size, blocks):
    tokens_per_frame = frame_shape[0] * frame_shape[1]
    length = num_frames * tokens_per_frame + text_tokens
    video_start = text_tokens if text_first else 0
    num_blocks = -(-length // block_size)
    block_map = torch.zeros(num_blocks, num_blocks, dtype=torch.bool)
    span = -(-tokens_per_frame // block_size)  # blocks a frame's reduction covers
    for i in range(num_frames):
        for j in range(num_frames):
            width = (
                math.inf
                if sink and j == 0
                else frame_budget(
                    tokens_per_frame, abs(i - j), decay_factor, block_size, PUBLIC_SKIP_THRESHOLD
                )
            )
            if width is None:
                continue
            row, col = video_start + i * tokens_per_frame, video_start + j * tokens_per_frame
            kept = _reduced_band(tokens_per_frame, row % block_size, col % block_size, width, block_size)
            r0, c0 = row // block_size, col // block_size
            rows, cols = min(span, num_blocks - r0), min(span, num_blocks - c0)
            block_map[r0 : r0 + rows, c0 : c0 + cols] |= kept[:rows, :cols]
    if text_tokens:
        text_start = 0 if text_first else length - text_tokens
        text_blocks = slice(text_start // block_size, -(-(text_start + text_tokens) // block_size))
        block_map[text_blocks] = True
        block_map[:, text_blocks] = True
    block_q, block_kv = blocks
    if block_size % block_q or block_size % block_kv:
        raise ValueError(
            f"radial: blocks={blocks} must divide block_size={block_size} for the official variant"
        )
    fine = block_map.repeat_interleave(block_size // block_q, 0).repeat_interleave(block_size // block_kv, 1)
    fine = fine[: -(-length // block_q), : -(-length // block_kv)]
    return BlockSparsePattern.from_block_mask(
        fine[None], q_len=length, kv_len=length, block_q=block_q, block_kv=block_kv
    )


@functools.lru_cache(maxsize=1024)
def _reduced_band(tokens: int, row_offset: int, col_offset: int, width: float, block: int) -> torch.Tensor:
    """The public code's block reduction of one frame pair's band mask |c - r| <= width (tokens x tokens,
    placed at the given offsets inside its first block): (span, span) bool, span = ceil(tokens / block).

    Per block, the density of each column is the fraction of the block's rows it covers; the block is kept
    when more than 60% of the non-empty columns are denser than 1/3. Counted from intervals, never
    materialising the tokens x tokens mask.
    """
    span = -(-tokens // block)
    reach = tokens if math.isinf(width) else math.floor(width)
    block_index = torch.arange(span)
    # valid local rows of each row block: [low, high)
    low = (block_index * block - row_offset).clamp(min=0, max=tokens)
    high = ((block_index + 1) * block - row_offset).clamp(min=0, max=tokens)
    # local column of every column of every column block: (span, block)
    columns = block_index[:, None] * block + torch.arange(block)[None, :] - col_offset
    valid = (columns >= 0) & (columns < tokens)
    first = torch.maximum(low[:, None, None], columns[None] - reach)  # (row blocks, col blocks, block)
    last = torch.minimum(high[:, None, None], columns[None] + reach + 1)
    count = (last - first).clamp(min=0) * valid[None]
    nonzero = (count > 0).sum(-1)
    dense = (3 * count > block).sum(-1)
    return dense / (nonzero + 1e-9) > 0.6


@functools.lru_cache(maxsize=64)
def _spatial(
    num_frames, frame_shape, decay_factor, sink, text_tokens, text_first, block_size, blocks, device
):
    tokens_per_frame = frame_shape[0] * frame_shape[1]
    video = num_frames * tokens_per_frame
    video_start, text_start = (text_tokens, 0) if text_first else (0, video)
    grid = (num_frames, *frame_shape)
    tile = (1, *block_tile(frame_shape, blocks[0]))
    video_order = tile_order(grid, tile, offset=video_start)
    text_order = identity_order(text_tokens, offset=text_start)
    order = concat_orders(text_order, video_order) if text_first else concat_orders(video_order, text_order)

    length = video + text_tokens
    coords = torch.zeros(length, 3, dtype=torch.int32)
    coords[video_start : video_start + video] = tile_centres(grid, tile)
    # segments: 0 text, 1 the sink frame, 2 other video frames
    segments = torch.zeros(length, dtype=torch.int32)
    segments[video_start : video_start + video] = 2
    if sink:
        segments[video_start : video_start + tokens_per_frame] = 1
    allow = torch.zeros(3, 3, dtype=torch.bool)
    allow[0, :] = allow[:, 0] = True
    if sink:
        allow[1:, 1] = True  # every video query sees the whole first frame
    spatial = torch.zeros(3, 3, dtype=torch.bool)
    spatial[1:, 1:] = True

    limits = []  # squared distances between doubled tile centres
    for distance in range(num_frames):
        width = frame_budget(tokens_per_frame, distance, decay_factor, block_size)
        if width is None:
            limits.append(-1.0)
        elif math.isinf(width) or 2 * math.floor(width) + 1 >= tokens_per_frame:
            limits.append(4.0 * sum(n * n for n in frame_shape) + 1.0)  # farther than any two tiles
        else:
            limits.append(4 * (2 * math.floor(width) + 1) / math.pi)  # a disc of the band's area: πr² = area
    rule = ElementRule(allow, spatial, Metric.EUCLIDEAN, torch.tensor(limits))
    coords, segments = coords[order], segments[order]
    # A query block that straddles tiles takes one centre per frame (the mean of its tiles'): one disc for
    # the block, not the union of its tiles' discs.
    queries = TokenTable(_block_centres(coords, segments, blocks[0]), segments).to(device)
    keys = TokenTable(coords, segments).to(device)
    order = order.to(device)
    return BlockSparsePattern.from_rule(
        rule, queries, keys, block_q=blocks[0], block_kv=blocks[1], q_order=order, kv_order=order
    )


def _block_centres(coords: torch.Tensor, segments: torch.Tensor, block: int) -> torch.Tensor:
    """coords (S, 3) in position order with (y, x) replaced by their mean over the tokens of the same block,
    frame and segment (rounded), which the tiled order keeps consecutive."""
    # the tokens of a (block, frame, segment) are consecutive: number each run
    boundary = torch.ones(len(coords), dtype=torch.bool)
    position = torch.arange(len(coords))
    boundary[1:] = (
        (position[1:] // block != position[:-1] // block)
        | (coords[1:, 0] != coords[:-1, 0])
        | (segments[1:] != segments[:-1])
    )
    group = boundary.cumsum(0) - 1
    sums = torch.zeros(int(group.max()) + 1, 2).index_add_(0, group, coords[:, 1:].float())
    sizes = torch.bincount(group).float()[:, None]
    centred = coords.clone()
    centred[:, 1:] = (sums / sizes).round().to(torch.int32)[group]
    return centred


def tile_centres(grid: tuple[int, int, int], tile: tuple[int, int, int]) -> torch.Tensor:
    """(t, 2 y_c, 2 x_c) of each token of a raster (F, H, W) grid: its frame and the doubled centre of the
    (1, th, tw) tile it lies in (edge tiles cut to the grid), so that all tokens of a tile share a place."""
    coords = grid_coordinates(grid)
    for axis in (1, 2):
        size, step = grid[axis], tile[axis]
        start = coords[:, axis] // step * step
        coords[:, axis] = 2 * start + (size - start).clamp(max=step) - 1
    return coords
