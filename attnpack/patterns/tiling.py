"""Token orders: 2D / 3D tiling of a token grid, so that a block of consecutive tokens is a spatial tile.

An order is a 1-D index tensor `order[position] = token`: the token (in the caller's raster order) that
sits at each position of the tiled sequence. Patterns are built over positions; the kernels read q, k, v
through the order, so the tensors themselves are never permuted.
"""

from __future__ import annotations

import math

import torch


def tile_order(grid: tuple[int, ...], tile: tuple[int, ...], *, offset: int = 0) -> torch.Tensor:
    """Raster token indices of a grid, tile by tile (tiles row-major, tokens row-major inside a tile).

    `grid` and `tile` are (H, W) or (F, H, W). Tiles at the far edges are cut to the grid. `offset` is added
    to every index, for grids that sit behind other tokens (text first) in the sequence.
    """
    if len(grid) != len(tile) or len(grid) not in (2, 3):
        raise ValueError(f"tile_order: grid={grid} and tile={tile} must both be (H, W) or (F, H, W)")
    if any(not isinstance(n, int) or n < 1 for n in (*grid, *tile)):
        raise ValueError(f"tile_order: grid={grid} and tile={tile} must hold positive integers")
    axes = [torch.arange(n) for n in grid]
    coords = torch.meshgrid(*axes, indexing="ij")
    raster = torch.arange(math.prod(grid)).reshape(grid)
    # Sort key: tile index (row-major over tiles), then position inside the tile (row-major).
    tiles_per_axis = [-(-n // t) for n, t in zip(grid, tile, strict=True)]
    key = torch.zeros(grid, dtype=torch.int64)
    for c, t, count in zip(coords, tile, tiles_per_axis, strict=True):
        key = key * count + c // t
    for c, t in zip(coords, tile, strict=True):
        key = key * t + c % t
    return raster.flatten()[key.flatten().argsort()] + offset


def block_tile(grid: tuple[int, int], block: int) -> tuple[int, int]:
    """The (rows, columns) tile of `block` tokens closest to a square, in powers of two (8 x 16 for 128, 8 x 8
    for 64), cut to the grid: a query block that is a compact patch of the image."""
    rows = 1
    while (rows * 2) ** 2 <= block:
        rows *= 2
    rows = min(rows, grid[0])
    return rows, max(1, min(grid[1], block // rows))


def concat_orders(*orders: torch.Tensor) -> torch.Tensor:
    """Orders of consecutive spans of one sequence, joined (each already offset to its span)."""
    return torch.cat([order.to(torch.int64) for order in orders])


def identity_order(length: int, *, offset: int = 0) -> torch.Tensor:
    return torch.arange(offset, offset + length)


def inverse_order(order: torch.Tensor) -> torch.Tensor:
    """inverse[token] = position."""
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order), device=order.device, dtype=order.dtype)
    return inverse


def tile(x: torch.Tensor, order: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Tokens of `x` (caller order along `dim`) in tiled order."""
    return x.index_select(dim, order.to(x.device))


def untile(x: torch.Tensor, order: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Back to the caller's order: the inverse of `tile`."""
    return x.index_select(dim, inverse_order(order).to(x.device))


def grid_coordinates(grid: tuple[int, ...], order: torch.Tensor | None = None) -> torch.Tensor:
    """(t, y, x) of each token of a raster grid, int32 (S, 3); t = 0 for a 2D grid. With `order`, the
    coordinates of the tokens at each position."""
    shape = (1, *grid) if len(grid) == 2 else tuple(grid)
    t, y, x = torch.meshgrid(*(torch.arange(n) for n in shape), indexing="ij")
    coords = torch.stack([t.flatten(), y.flatten(), x.flatten()], dim=1).to(torch.int32)
    return coords if order is None else coords[order]
