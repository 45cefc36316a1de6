"""Sparsity patterns: pure functions of (layout, config) that return a `BlockSparsePattern`."""

from .block_sparse import (
    MAX_SEGMENTS,
    BlockSparsePattern,
    ElementRule,
    Metric,
    TokenTable,
    block_counts,
    default_blocks,
)
from .clear import clear_window
from .frame_band import frame_band, frame_window, frame_window_mask
from .radial import radial
from .tiling import concat_orders, grid_coordinates, identity_order, inverse_order, tile, tile_order, untile

__all__ = [
    "MAX_SEGMENTS",
    "BlockSparsePattern",
    "ElementRule",
    "Metric",
    "TokenTable",
    "block_counts",
    "clear_window",
    "concat_orders",
    "default_blocks",
    "frame_band",
    "frame_window",
    "frame_window_mask",
    "grid_coordinates",
    "identity_order",
    "inverse_order",
    "radial",
    "tile",
    "tile_order",
    "untile",
]
