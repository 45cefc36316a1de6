"""Pictures of patterns: the block map (what the kernel computes) and, for short sequences, the token mask."""

from __future__ import annotations

import numpy as np
from PIL import Image

FULL, PARTIAL, SKIPPED = (255, 255, 255), (150, 150, 150), (0, 0, 0)


def block_map_image(pattern, group: int = 0, side: int = 1024) -> Image.Image:
    """The block map in position order, drawn to the scale of tokens (a 128 x 64 block is twice as tall
    as wide): white full blocks, gray partial ones, black skipped."""
    full, partial = pattern.full[group].cpu().numpy(), pattern.partial[group].cpu().numpy()
    pixels = np.zeros((*full.shape, 3), dtype=np.uint8)
    pixels[full], pixels[partial] = FULL, PARTIAL
    scale = side / max(pattern.q_len, pattern.kv_len)
    size = (max(1, round(pattern.kv_len * scale)), max(1, round(pattern.q_len * scale)))
    return Image.fromarray(pixels, "RGB").resize(size, Image.NEAREST)


def mask_image(pattern, group: int = 0, min_side: int = 512, max_tokens: int = 8192) -> Image.Image:
    """The token-level mask in the caller's token order: white where a query (row) may attend a key."""
    if max(pattern.q_len, pattern.kv_len) > max_tokens:
        raise ValueError(
            f"mask_image: {pattern.q_len} x {pattern.kv_len} tokens is more than max_tokens={max_tokens} "
            "per side; draw the block map instead"
        )
    mask = pattern.to_dense()[group].cpu().numpy()
    pixels = np.where(mask[..., None], np.array(FULL, dtype=np.uint8), np.array(SKIPPED, dtype=np.uint8))
    return _scaled(pixels, min_side)


def _scaled(pixels: np.ndarray, min_side: int) -> Image.Image:
    factor = max(1, -(-min_side // max(pixels.shape[:2])))
    image = Image.fromarray(pixels, "RGB")
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST) if factor > 1 else image
