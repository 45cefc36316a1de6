"""RadialAttention: radial sparse attention for video DiTs, with the paper's dense warm-up schedule.

Self-attention over the video tokens (Wan's attn1; the joint text + video attention of HunyuanVideo and
CogVideoX, text included in the same kernel call) runs block-sparse with `attnpack.patterns.radial`.
Cross-attention and Wan I2V's image context stay dense. The first `dense_steps` steps, the last
`dense_last_steps` and the first `dense_layers` layers stay dense too, read from the AttnContext.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..fallback import fall_back
from ..families.base import AttnCall
from ..layout import Role
from ..patterns.radial import VARIANTS, radial
from .base import (
    AttentionMethod,
    SparseAttention,
    check_choice,
    check_number,
    dense_attention_of,
    key_padding,
    run_sparse,
)

logger = logging.getLogger("attnpack")

# The paper's settings per model (their inference scripts): dense layers, dense steps, decay, sink; Wan 2.2's
# processor (Wan22SparseAttnProcessor) runs 64-token blocks.
PRESETS = {
    "wan2.1": dict(dense_layers=1, dense_steps=12, decay_factor=0.2, sink=True),
    "wan2.2": dict(dense_layers=1, dense_steps=11, decay_factor=0.8, sink=True, block_size=64),
    "hunyuanvideo": dict(dense_layers=0, dense_steps=12, decay_factor=0.95, sink=False),
}


@dataclass(eq=False, repr=False)
class RadialAttention(AttentionMethod):
    """Radial attention. `decay_factor` scales the window (larger: denser); `variant` is "official" (the
    public code's raster band) or "spatial" (2D windows of the same budget); `sink` keeps the first frame
    as a full key frame; `block_size` is the paper's block (window floor, skip rule, reduction)."""

    decay_factor: float = 1.0
    dense_layers: int = 0
    dense_steps: int = 0
    dense_last_steps: int = 0
    sink: bool = True
    variant: str = "official"
    block_size: int = 128

    name: ClassVar[str] = "radial"
    families: ClassVar[tuple[str, ...]] = ("wan", "hunyuan_video", "cogvideox")
    roles: ClassVar[frozenset[Role]] = frozenset({Role.SELF, Role.JOINT})
    needs_context: ClassVar[bool] = True
    context_parallel: ClassVar[frozenset[str]] = frozenset({"ulysses", "ring"})

    def __post_init__(self):
        owner = "RadialAttention"
        check_number(owner, "decay_factor", self.decay_factor, low=0, low_inclusive=False)
        for name in ("dense_layers", "dense_steps", "dense_last_steps"):
            check_number(owner, name, getattr(self, name), low=0, integer=True)
        check_choice(owner, "sink", self.sink, (True, False))
        check_choice(owner, "variant", self.variant, VARIANTS)
        check_choice(owner, "block_size", self.block_size, (16, 32, 64, 128, 256))

    @classmethod
    def preset(cls, model: str, **overrides) -> RadialAttention:
        """The paper's settings for "wan2.1", "wan2.2" or "hunyuanvideo", with any of them overridden."""
        check_choice("RadialAttention.preset", "model", model, tuple(PRESETS))
        return cls(**{**PRESETS[model], **overrides})

    def dense_now(self, call: AttnCall) -> bool:
        """Whether the schedule keeps this layer dense at this step."""
        if call.site.role_index < self.dense_layers:
            return True
        if not (self.dense_steps or self.dense_last_steps):
            return False
        ctx = call.context
        if ctx.step_index is None or ctx.num_steps is None:
            raise RuntimeError(
                f"RadialAttention(dense_steps={self.dense_steps}, dense_last_steps={self.dense_last_steps}) "
                "needs the denoising step: run the attached pipeline, or call ctx.set_step(i, num_steps) "
                "for a loop of your own"
            )
        return ctx.step_index < self.dense_steps or ctx.step_index >= ctx.num_steps - self.dense_last_steps

    def attend(self, call: AttnCall) -> torch.Tensor:
        return run_sparse(call, self.sparse_attention(call))

    def preview_pattern(self, grid):
        if len(grid) != 3:
            return None
        return radial(grid[0], grid[1:], decay_factor=self.decay_factor, sink=self.sink, variant=self.variant,
                      block_size=self.block_size)  # fmt: skip

    def sparse_attention(self, call: AttnCall) -> SparseAttention:
        layout = call.layout
        if layout.grid is None or len(layout.grid) != 3:
            fall_back(self, call, "no video grid")
            return dense_attention_of(call)
        if self.dense_now(call):
            return dense_attention_of(call)
        padding = key_padding(call)
        if padding is False:
            fall_back(self, call, "an attention mask that is not key padding")
            return dense_attention_of(call)
        num_frames, height, width = layout.grid
        pattern = radial(
            num_frames,
            (height, width),
            decay_factor=self.decay_factor,
            sink=self.sink,
            text_tokens=layout.text_len if layout.role is Role.JOINT else 0,
            text_first=layout.text_first,
            variant=self.variant,
            block_size=self.block_size,
            device=call.query.device,
        )
        return SparseAttention(pattern, call.scale, padding)
