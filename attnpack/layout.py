"""Where text and visual tokens sit in the sequences of one attention call."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum


class Role(str, Enum):
    """What an attention layer does, as far as a method needs to know."""

    SELF = "self"  # visual tokens attend to visual tokens (UNet attn1, Wan attn1)
    JOINT = "joint"  # text and visual tokens in one sequence (FLUX, CogVideoX, HunyuanVideo)
    CROSS = "cross"  # visual queries, text (or image-context) keys (UNet attn2, Wan attn2)
    TEMPORAL = "temporal"  # one sequence per pixel, along frames (AnimateDiff motion modules)
    TEXT = "text"  # text tokens only (HunyuanVideo's token refiner)


@dataclass(frozen=True)
class TokenLayout:
    """The token order of one attention call's query (and, for self/joint roles, key) sequence.

    `grid` is the shape of the visual tokens in raster order: `(H, W)` for an image, `(F, H, W)` for a
    video, `(F,)` for a temporal layer. `batch_grid` names grid axes folded into the batch: frames for the
    spatial layers of a video UNet (batch = B * F), `(H, W)` for its temporal layers (batch = B * H * W).
    Unknown parts (no `attnpack.attach`, a layer whose resolution cannot be read) are `None`.
    """

    role: Role
    query_len: int
    key_len: int
    grid: tuple[int, ...] | None = None
    text_len: int = 0
    text_first: bool = True
    batch_grid: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.grid is not None and self.visual_len != math.prod(self.grid):
            raise ValueError(
                f"TokenLayout: grid {self.grid} holds {math.prod(self.grid)} tokens, but the sequence has "
                f"{self.visual_len} visual tokens ({self.query_len} queries, {self.text_len} text)"
            )

    @property
    def visual_len(self) -> int:
        """Visual tokens in the query sequence."""
        if self.role is Role.TEXT:
            return 0
        return self.query_len - (self.text_len if self.role is Role.JOINT else 0)

    @property
    def visual_slice(self) -> slice:
        """The visual tokens of the query sequence (and of the key sequence, for a joint layer)."""
        if self.role is Role.JOINT and self.text_first:
            return slice(self.text_len, self.query_len)
        return slice(0, self.visual_len)

    @property
    def text_slice(self) -> slice:
        """The text tokens: inside the sequence for a joint layer, the key sequence for a cross layer."""
        if self.role is Role.CROSS:
            return slice(0, self.key_len)
        if self.role is Role.JOINT:
            return slice(0, self.text_len) if self.text_first else slice(self.visual_len, self.query_len)
        if self.role is Role.TEXT:
            return slice(0, self.query_len)
        return slice(0, 0)


def downsampled_grid(full: tuple[int, int], num_tokens: int, max_levels: int = 8) -> tuple[int, int] | None:
    """The grid of a UNet level that holds `num_tokens` tokens, from the latent's `full` (H, W).

    UNet downsamplers halve with rounding up (stride-2 convolutions with padding 1).
    """
    height, width = full
    for _ in range(max_levels + 1):
        if height * width == num_tokens:
            return (height, width)
        if height * width < num_tokens:
            return None
        height, width = -(-height // 2), -(-width // 2)
    return None
