"""Window-fused temporal attention in one pass: each program owns one sequence (one pixel of one video),
one head and one segment of frames that share the same windows. It loads the segment's queries once, runs
attention over each of its windows (window positions added to q, k, v in registers), and accumulates the
weighted outputs, already divided by each frame's total weight, so the fused result is stored once: no
gathered copies of the windows, no accumulation pass."""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from ..dispatch import interpreting


@triton.jit
def _windowed_kernel(
    Q, K, V, OUT, PQ, PK, PV, SEG_START, SEG_LEN, SEG_WINDOWS, WEIGHT, TOTAL,
    stride_qb, stride_qf, stride_qh, stride_kb, stride_kf, stride_kh,
    stride_vb, stride_vf, stride_vh, stride_ob, stride_of, stride_oh,
    stride_pl, stride_ph,
    scale, length, head_dim, max_windows,
    BLOCK_S: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_OFFSETS: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    n = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    seg = tl.program_id(2)
    seg_start = tl.load(SEG_START + seg)
    seg_len = tl.load(SEG_LEN + seg)
    offs_s = tl.arange(0, BLOCK_S)
    offs_l = tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, BLOCK_D)
    rows = seg_start + offs_s
    row_ok = offs_s < seg_len
    d_ok = offs_d < head_dim
    l_ok = offs_l < length
    q = tl.load(
        Q + n * stride_qb + rows[:, None] * stride_qf + h * stride_qh + offs_d[None, :],
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    ).to(tl.float32)
    total = tl.load(TOTAL + rows, mask=row_ok, other=1.0)
    acc = tl.zeros((BLOCK_S, BLOCK_D), dtype=tl.float32)
    kv_mask = l_ok[:, None] & d_ok[None, :]
    for j in range(0, max_windows):
        start = tl.load(SEG_WINDOWS + seg * max_windows + j)
        if start >= 0:
            position = rows - start  # each query's place in this window
            qw = q
            k = tl.load(
                K + n * stride_kb + (start + offs_l)[:, None] * stride_kf + h * stride_kh + offs_d[None, :],
                mask=kv_mask,
                other=0.0,
            ).to(tl.float32)
            v = tl.load(
                V + n * stride_vb + (start + offs_l)[:, None] * stride_vf + h * stride_vh + offs_d[None, :],
                mask=kv_mask,
                other=0.0,
            ).to(tl.float32)
            if HAS_OFFSETS:
                qw += tl.load(
                    PQ + position[:, None] * stride_pl + h * stride_ph + offs_d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :],
                    other=0.0,
                ).to(tl.float32)
                p_offs = offs_l[:, None] * stride_pl + h * stride_ph + offs_d[None, :]
                k += tl.load(PK + p_offs, mask=kv_mask, other=0.0).to(tl.float32)
                v += tl.load(PV + p_offs, mask=kv_mask, other=0.0).to(tl.float32)
            if UPCAST:
                scores = tl.dot(qw, tl.trans(k), input_precision="ieee")
            else:
                scores = tl.dot(qw.to(Q.dtype.element_ty), tl.trans(k.to(Q.dtype.element_ty)))
            scores = tl.where(l_ok[None, :], scores * scale, float("-inf"))
            scores = scores - tl.max(scores, axis=1)[:, None]
            probs = tl.exp(scores)
            probs = probs / tl.sum(probs, axis=1)[:, None]
            if UPCAST:
                out = tl.dot(probs, v, input_precision="ieee")
            else:
                out = tl.dot(probs.to(V.dtype.element_ty), v.to(V.dtype.element_ty))
            weight = tl.load(WEIGHT + position, mask=row_ok, other=0.0) / total
            acc += out * weight[:, None]
    tl.store(
        OUT + n * stride_ob + rows[:, None] * stride_of + h * stride_oh + offs_d[None, :],
        acc.to(OUT.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )


def segments(windows: list[tuple[int, int]]) -> tuple[list[int], list[int], list[list[int]]]:
    """Runs of frames that lie in the same windows: (starts, lengths, window starts per run)."""
    bounds = sorted({b for window in windows for b in window})
    starts, lengths, covering = [], [], []
    for lo, hi in itertools.pairwise(bounds):
        inside = [start for start, end in windows if start <= lo and hi <= end]
        if inside:
            starts.append(lo)
            lengths.append(hi - lo)
            covering.append(inside)
    return starts, lengths, covering


def windowed_attention_triton(query, key, value, windows, weights, *, offsets=None, scale=None):
    batch, frames, heads, dim = query.shape
    length = windows[0][1] - windows[0][0]
    for x in (query, key, value):
        if x.stride(-1) != 1:
            raise ValueError("windowed_attention: the head dimension must be contiguous")
    scale = dim**-0.5 if scale is None else scale
    device = query.device
    seg_starts, seg_lengths, covering = segments(windows)
    max_windows = max(len(c) for c in covering)
    table = torch.full((len(covering), max_windows), -1, dtype=torch.int32)
    for i, starts in enumerate(covering):
        table[i, : len(starts)] = torch.tensor(starts, dtype=torch.int32)
    weights = weights.to(device, torch.float32).contiguous()
    total = torch.zeros(frames, device=device)
    for start, end in windows:
        total[start:end] += weights[: end - start]
    out = torch.empty_like(query)
    if offsets is None:
        pq = pk = pv = torch.zeros(1, heads, dim, device=device, dtype=query.dtype)
    else:
        pq, pk, pv = (o[:length].to(device, query.dtype).contiguous() for o in offsets)
    block_s = max(16, triton.next_power_of_2(max(seg_lengths)))
    grid = (batch, heads, len(seg_starts))
    _windowed_kernel[grid](
        query, key, value, out, pq, pk, pv,
        torch.tensor(seg_starts, dtype=torch.int32, device=device),
        torch.tensor(seg_lengths, dtype=torch.int32, device=device),
        table.to(device), weights, total,
        query.stride(0), query.stride(1), query.stride(2), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2), out.stride(0), out.stride(1), out.stride(2),
        pq.stride(0), pq.stride(1),
        scale, length, dim, max_windows,
        BLOCK_S=block_s, BLOCK_L=max(16, triton.next_power_of_2(length)),
        BLOCK_D=max(16, triton.next_power_of_2(dim)), HAS_OFFSETS=offsets is not None,
        UPCAST=interpreting() or query.dtype == torch.float32,
    )  # fmt: skip
    return out
