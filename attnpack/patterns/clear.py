"""CLEAR (Liu et al., 2024): each image token attends the disc of radius r around it on the token grid.

Image queries attend every text token, the image keys with (dy² + dx²) < r² (strict), and, with
`down_factor=f`, all (H/f)(W/f) pooled tokens that follow the sequence; text queries attend the text and
the full-resolution image, not the pooled tokens. The pattern is built in tiled token order, so that a
query block is a compact tile of the image instead of a strip of rows.
"""

from __future__ import annotations

import functools

import torch

from .block_sparse import BlockSparsePattern, ElementRule, Metric, TokenTable, default_blocks
from .tiling import block_tile, concat_orders, grid_coordinates, identity_order, tile_order

TEXT, IMAGE, POOLED = 0, 1, 2


def clear_window(
    grid: tuple[int, int],
    radius: float,
    *,
    text_tokens: int = 512,
    text_first: bool = True,
    down_factor: int | None = None,
    tile: tuple[int, int] | None = None,
    blocks: tuple[int, int] | None = None,
    device: torch.device | str | None = None,
) -> BlockSparsePattern:
    """CLEAR's pattern for an image of `grid` (H, W) tokens with `text_tokens` text tokens.

    Queries: the text and the image, in the caller's order ([text, image] when `text_first`). Keys: the
    same, then the (H / f)(W / f) pooled tokens when `down_factor=f`. `tile` is the tiling of the image
    (default 8 x 16, a 128-token block); `blocks` the kernel's (block_q, block_kv), by default the device's.
    """
    _validate(grid, radius, text_tokens, down_factor)
    blocks = blocks or default_blocks(128, device)
    tile = tuple(tile) if tile is not None else block_tile(tuple(grid), blocks[0])
    pattern = _build(tuple(grid), float(radius), text_tokens, bool(text_first), down_factor, tile, tuple(blocks),
                     str(torch.device(device or "cpu")))  # fmt: skip
    return pattern if device is None else pattern.to(device)


def _validate(grid, radius, text_tokens, down_factor) -> None:
    if len(grid) != 2 or any(not isinstance(n, int) or n < 1 for n in grid):
        raise ValueError(f"clear_window: grid={grid!r} must be (H, W), two positive integers")
    if not isinstance(radius, (int, float)) or not radius > 0:
        raise ValueError(f"clear_window: radius={radius!r} must be a number > 0")
    if not isinstance(text_tokens, int) or text_tokens < 0:
        raise ValueError(f"clear_window: text_tokens={text_tokens!r} must be an integer >= 0")
    if down_factor is not None:
        if not isinstance(down_factor, int) or down_factor < 2:
            raise ValueError(f"clear_window: down_factor={down_factor!r} must be None or an integer >= 2")
        if grid[0] % down_factor or grid[1] % down_factor:
            raise ValueError(
                f"clear_window: down_factor={down_factor} must divide the token grid {tuple(grid)}; "
                f"choose an image size whose token grid (size / 16 for FLUX) is a multiple of it"
            )


@functools.lru_cache(maxsize=32)
def _build(grid, radius, text_tokens, text_first, down_factor, tile, blocks, device) -> BlockSparsePattern:
    image = grid[0] * grid[1]
    pooled = image // down_factor**2 if down_factor else 0
    image_start, text_start = (text_tokens, 0) if text_first else (0, image)
    image_order = tile_order(grid, tile, offset=image_start)
    text_order = identity_order(text_tokens, offset=text_start)
    q_order = concat_orders(text_order, image_order) if text_first else concat_orders(image_order, text_order)
    queries = image + text_tokens
    kv_order = concat_orders(q_order, identity_order(pooled, offset=queries))

    coords = torch.zeros(queries + pooled, 3, dtype=torch.int32)
    coords[image_start : image_start + image] = grid_coordinates(grid)
    segments = torch.full((queries + pooled,), TEXT, dtype=torch.int32)
    segments[image_start : image_start + image] = IMAGE
    segments[queries:] = POOLED
    allow = torch.zeros(3, 3, dtype=torch.bool)
    allow[TEXT, TEXT] = allow[TEXT, IMAGE] = True  # text sees the text and the full-resolution image
    allow[IMAGE, TEXT] = allow[IMAGE, POOLED] = True  # image tokens see the text and every pooled token
    spatial = torch.zeros(3, 3, dtype=torch.bool)
    spatial[IMAGE, IMAGE] = True
    rule = ElementRule(allow, spatial, Metric.EUCLIDEAN, torch.tensor([radius * radius]))
    q_tokens = TokenTable(coords[q_order], segments[q_order]).to(device)
    kv_tokens = TokenTable(coords[kv_order], segments[kv_order]).to(device)
    return BlockSparsePattern.from_rule(
        rule,
        q_tokens,
        kv_tokens,
        block_q=blocks[0],
        block_kv=blocks[1],
        q_order=q_order.to(device),
        kv_order=kv_order.to(device),
    )
