"""Attention over frames for many short temporal sequences: FreeNoise's fused windows, FreeLong's global and
local branches.

`windowed_attention(q, k, v, windows, weights, offsets=None)` runs attention over (B, F, H, D) frames in
every window of `windows` (equal lengths L), each window with the position offsets (L, H, D) added to its
q, k and v, and returns each frame's weighted mean over its windows. On CUDA the Triton kernel does it in
one pass; elsewhere the torch reference attends window by window (SDPA) and adds each weighted window into
one buffer, so that it holds one window's work at a time, not stacked copies. For a video DiT the
sequence is frames of `tokens_per_frame` tokens each; every window is then a contiguous slice, attended by
SDPA on its own (FlashAttention on CUDA).
"""

from __future__ import annotations

import torch

from .. import dispatch
from .reference import global_local_attention_reference, local_window_attention, windowed_attention_reference

MAX_FRAMES = 128  # global_local_attention's Triton kernel: every key frame sits in one tile


def _one_token_per_frame(tokens_per_frame: int = 1, **_) -> str | None:
    return "runs one token per frame; use 'reference'" if tokens_per_frame > 1 else None


def _few_frames(frames: int, **_) -> str | None:
    return (
        f"runs at most {MAX_FRAMES} frames (got {frames}); use 'reference'" if frames > MAX_FRAMES else None
    )


WINDOWED_OP = dispatch.register_op(
    "windowed_attention",
    dispatch.triton_or(
        "reference",
        "the reference (window by window through SDPA)",
        lambda tokens_per_frame, **_: (
            "the Triton kernel runs one token per frame" if tokens_per_frame > 1 else None
        ),
    ),
    "triton on CUDA with triton installed and one token per frame; else reference",
)
WINDOWED_OP.register(
    "triton",
    **dispatch.triton_backend("every window in one pass (one token per frame)", _one_token_per_frame),
)
WINDOWED_OP.register("reference", "window by window through SDPA, weighted into one buffer")

GLOBAL_LOCAL_OP = dispatch.register_op(
    "global_local_attention",
    dispatch.triton_or(
        "reference",
        "the reference (both branches through torch)",
        lambda frames, **_: (
            f"the Triton kernel holds at most {MAX_FRAMES} frames" if frames > MAX_FRAMES else None
        ),
    ),
    f"triton on CUDA with triton installed and at most {MAX_FRAMES} frames; else reference",
)
GLOBAL_LOCAL_OP.register(
    "triton", **dispatch.triton_backend(f"both branches in one pass (up to {MAX_FRAMES} frames)", _few_frames)
)
GLOBAL_LOCAL_OP.register("reference", "the global and the local branch through torch")


def windowed_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    windows: list[tuple[int, int]],
    weights: torch.Tensor,
    *,
    offsets: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    scale: float | None = None,
    tokens_per_frame: int = 1,
    backend: str | None = None,
) -> torch.Tensor:
    if query.ndim != 4 or query.shape != key.shape or key.shape != value.shape:
        raise ValueError(
            f"windowed_attention: q, k, v must be (B, F, H, D) of one shape; got {tuple(query.shape)}, "
            f"{tuple(key.shape)}, {tuple(value.shape)}"
        )
    lengths = {end - start for start, end in windows}
    if query.shape[1] % tokens_per_frame:
        raise ValueError(
            f"windowed_attention: {query.shape[1]} tokens are not frames of tokens_per_frame={tokens_per_frame}"
        )
    if tokens_per_frame > 1 and offsets is not None:
        raise ValueError("windowed_attention: position offsets apply to one token per frame only")
    frames = query.shape[1] // tokens_per_frame
    if not windows or len(lengths) != 1 or any(s < 0 or e > frames or s >= e for s, e in windows):
        raise ValueError(
            f"windowed_attention: windows={windows} must be non-empty, equal-length, inside {frames} frames"
        )
    length = lengths.pop()
    if weights.shape != (length,):
        raise ValueError(
            f"windowed_attention: weights must hold {length} values (one per window frame), got {tuple(weights.shape)}"
        )
    backend = WINDOWED_OP.resolve(backend, device=query.device, tokens_per_frame=tokens_per_frame)
    if backend == "triton":
        from .triton_kernel import windowed_attention_triton

        return windowed_attention_triton(query, key, value, windows, weights, offsets=offsets, scale=scale)
    return windowed_attention_reference(
        query, key, value, windows, weights, offsets=offsets, scale=scale, tokens_per_frame=tokens_per_frame
    )


def global_local_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    window: int,
    *,
    global_offsets: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    local_offsets: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    scale: float | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FreeLong's branches over frames (B, F, H, D): (global output, local output). The local branch sees the
    `window` frames around each frame, shifted inside at the ends. Offsets (position projections) come
    together or not at all: global (F, H, D) by frame, local (window, H, D) by place in the window. On CUDA
    one Triton pass computes both (up to 128 frames); elsewhere the torch reference."""
    if query.ndim != 4 or query.shape != key.shape or key.shape != value.shape:
        raise ValueError(
            f"global_local_attention: q, k, v must be (B, F, H, D) of one shape; got {tuple(query.shape)}, "
            f"{tuple(key.shape)}, {tuple(value.shape)}"
        )
    frames = query.shape[1]
    if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= frames:
        raise ValueError(f"global_local_attention: window={window!r} must be an integer in [1, {frames}]")
    if (global_offsets is None) != (local_offsets is None):
        raise ValueError("global_local_attention: pass both global_offsets and local_offsets, or neither")
    backend = GLOBAL_LOCAL_OP.resolve(backend, device=query.device, frames=frames)
    if backend == "triton":
        from .global_local import global_local_attention_triton

        return global_local_attention_triton(
            query, key, value, window, global_offsets=global_offsets, local_offsets=local_offsets, scale=scale
        )
    return global_local_attention_reference(
        query, key, value, window, global_offsets=global_offsets, local_offsets=local_offsets, scale=scale
    )


__all__ = [
    "MAX_FRAMES",
    "global_local_attention",
    "global_local_attention_reference",
    "local_window_attention",
    "windowed_attention",
    "windowed_attention_reference",
]
