"""Window-fused attention over frames: the spec of the temporal-window kernels.

Memory: nothing here is as large as windows x frames x channels. FreeNoise's windows are attended one at a
time and accumulated in place into one float32 buffer; FreeLong's branches run over chunks of sequences
(`CHUNK_BYTES` of working memory each) written into their two outputs.
"""

from __future__ import annotations

import torch

from ..dense import dense_attention

CHUNK_BYTES = 1 << 27  # working memory of one chunk of sequences in global_local / local_window attention


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
    added inside every window. With `tokens_per_frame` T > 1 the sequence is F frames of T tokens each (a
    video DiT). Each window is a contiguous slice, attended on its own; its weighted output is added in
    place into one float32 buffer, divided by the frames' total weights at the end.
    """
    batch, tokens, heads, dim = query.shape
    per_frame = tokens_per_frame
    frames = tokens // per_frame
    w = weights.to(query.device, torch.float32)
    fused = torch.zeros(batch, frames, per_frame, heads, dim, device=query.device, dtype=torch.float32)
    total = torch.zeros(frames, device=query.device)
    for start, end in windows:
        part = slice(start * per_frame, end * per_frame)
        q, k, v = query[:, part], key[:, part], value[:, part]
        if offsets is not None:
            q, k, v = (x + o[: end - start].to(x.dtype) for x, o in zip((q, k, v), offsets, strict=True))
        out = dense_attention(q, k, v, scale=scale).unflatten(1, (end - start, per_frame))
        fused[:, start:end].addcmul_(out.float(), w[None, :, None, None, None])
        total[start:end] += w
    fused.div_(total[None, :, None, None, None])
    return fused.flatten(1, 2).to(query.dtype)


def _rows_per_chunk(query: torch.Tensor, window: int | None = None) -> int:
    """Sequences per chunk so that one chunk's scores, probabilities and float32 copies stay within
    CHUNK_BYTES (the local branch forms every (frame, frame) score before picking out the band)."""
    _, frames, heads, dim = query.shape
    per_row = 4 * heads * frames * (3 * frames + 8 * dim + 3 * (window or 0))
    return max(1, CHUNK_BYTES // per_row)


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
    inside at the ends); `offsets` (window, H, D) are the positions 0..window-1 inside each window. Runs
    over chunks of sequences."""
    step = _rows_per_chunk(query, window)
    if query.shape[0] <= step:
        return _local_window(query, key, value, window, offsets, scale)
    out = torch.empty_like(query)
    for lo in range(0, query.shape[0], step):
        rows = slice(lo, lo + step)
        out[rows] = _local_window(query[rows], key[rows], value[rows], window, offsets, scale)
    return out


def _local_window(query, key, value, window, offsets, scale) -> torch.Tensor:
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
    full = torch.zeros(batch, heads, frames, frames, device=q.device).scatter_(
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
    v) and over the window around each frame (`local_offsets` (window, H, D) by place in the window). Runs
    over chunks of sequences, written into the two outputs."""
    global_out, local_out = torch.empty_like(query), torch.empty_like(query)
    step = _rows_per_chunk(query, window)
    for lo in range(0, query.shape[0], step):
        rows = slice(lo, lo + step)
        q, k, v = query[rows], key[rows], value[rows]
        if global_offsets is not None:
            qg, kg, vg = (x + o.to(x.dtype) for x, o in zip((q, k, v), global_offsets, strict=True))
        else:
            qg, kg, vg = q, k, v
        global_out[rows] = dense_attention(qg, kg, vg, scale=scale)
        local_out[rows] = _local_window(q, k, v, window, local_offsets, scale)
    return global_out, local_out
