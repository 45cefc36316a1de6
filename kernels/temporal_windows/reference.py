"""Window-fused attention over frames: the spec of the temporal-window kernel."""

from __future__ import annotations

import torch

from ..dense import dense_attention


def centered_windows(num_frames: int, length: int) -> torch.Tensor:
    """Per frame, the first frame of the `length`-frame window around it, shifted inside at the ends."""
    if num_frames <= length:
        return torch.zeros(num_frames, dtype=torch.long)
    return (torch.arange(num_frames) - length // 2).clamp(0, num_frames - length)


def windowed_attention_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    windows: list[tuple[int, int]],
    weights: torch.Tensor,
    *,
    offsets: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    scale: float | None = None,
    tokens_per_frame: int = 1,
) -> torch.Tensor:
    """Attention over frames (B, F, H, D) per window, fused: sum_w weights * out_w / sum_w weights per frame.

    All windows have the same length L; `offsets` are the window positions' (q, k, v) projections (L, H, D)
    added inside every window. One attention call covers every window (windows stacked into the batch).
    With `tokens_per_frame` T > 1 the sequence is F frames of T tokens each (a video DiT), and each window is
    a contiguous slice attended on its own.
    """
    if tokens_per_frame > 1:
        return _frame_slices(query, key, value, windows, weights, scale, tokens_per_frame)
    batch, frames, heads, dim = query.shape
    length = windows[0][1] - windows[0][0]
    index = torch.stack([torch.arange(start, end) for start, end in windows]).to(query.device)  # (W, L)

    def gather(x: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
        x = x[:, index]  # (B, W, L, H, D)
        if offset is not None:
            x = x + offset[:length].to(x.dtype)
        return x.flatten(0, 1)

    offsets = offsets or (None, None, None)
    q, k, v = (gather(x, offset) for x, offset in zip((query, key, value), offsets, strict=True))
    out = dense_attention(q, k, v, scale=scale).unflatten(0, (batch, len(windows)))
    w = weights.to(out.device, torch.float32)
    fused = torch.zeros(batch, frames, heads, dim, device=out.device, dtype=torch.float32)
    fused.index_add_(1, index.flatten(), (out.float() * w[None, None, :, None, None]).flatten(1, 2))
    total = torch.zeros(frames, device=out.device).index_add_(0, index.flatten(), w.repeat(len(windows)))
    return (fused / total[None, :, None, None]).to(query.dtype)


def _frame_slices(query, key, value, windows, weights, scale, tokens) -> torch.Tensor:
    frames = query.shape[1] // tokens
    w = weights.to(query.device, torch.float32)
    fused = torch.zeros(query.shape, device=query.device, dtype=torch.float32)
    total = torch.zeros(frames, device=query.device)
    for start, end in windows:
        part = slice(start * tokens, end * tokens)
        out = dense_attention(query[:, part], key[:, part], value[:, part], scale=scale)
        fused[:, part] += out.float() * w.repeat_interleave(tokens)[None, :, None, None]
        total[start:end] += w
    return (fused / total.repeat_interleave(tokens)[None, :, None, None]).to(query.dtype)


def local_window_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    window: int,
    *,
    offsets: tuple[torch.Tensor, ...] | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Every frame of (B, F, H, D) attends exactly the `window` frames of the window around it (shifted
    inside at the ends); `offsets` (window, H, D) are the positions 0..window-1 inside each window."""
    batch, frames, heads, dim = query.shape
    window = min(window, frames)
    scale = dim**-0.5 if scale is None else scale
    starts = centered_windows(frames, window).to(query.device)  # (F,)
    band = starts[:, None] + torch.arange(window, device=query.device)  # (F, window)
    q, k, v = query.float(), key.float(), value.float()
    if offsets is not None:
        q_offset, k_offset, v_offset = (o.float() for o in offsets)
        q = q + q_offset[torch.arange(frames, device=q.device) - starts]
    scores = torch.einsum("bihd,bjhd->bhij", q, k)  # every pair, then the band picked out
    scores = scores.gather(-1, band.expand(batch, heads, frames, window))
    if offsets is not None:
        scores = scores + torch.einsum("bihd,jhd->bhij", q, k_offset[:window])
    probs = (scores * scale).softmax(dim=-1)
    full = torch.zeros(batch, heads, frames, frames, device=q.device).scatter(
        -1, band.expand(batch, heads, frames, window), probs
    )
    out = torch.einsum("bhij,bjhd->bihd", full, v)
    if offsets is not None:
        out = out + torch.einsum("bhij,jhd->bihd", probs, v_offset[:window])
    return out.to(query.dtype)


def global_local_attention_reference(
    query, key, value, window, *, global_offsets=None, local_offsets=None, scale=None
):
    """FreeLong's two branches: attention over every frame (with `global_offsets` (F, H, D) added to q, k,
    v) and over the window around each frame (`local_offsets` (window, H, D) by place in the window)."""
    if global_offsets is not None:
        query_g, key_g, value_g = (
            x + o.to(x.dtype) for x, o in zip((query, key, value), global_offsets, strict=True)
        )
    else:
        query_g, key_g, value_g = query, key, value
    global_out = dense_attention(query_g, key_g, value_g, scale=scale)
    local_out = local_window_attention(query, key, value, window, offsets=local_offsets, scale=scale)
    return global_out, local_out
