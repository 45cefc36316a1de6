"""Window-fused attention over frames: the spec of the temporal-window kernel."""

from __future__ import annotations

import torch

from ..dense import dense_attention


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
