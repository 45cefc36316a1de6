"""FreeLong's two temporal attentions in one pass: for many short frame sequences (the B·H·W pixels of a
motion module), each program loads one block of query frames and every key and value frame once, and
computes both the global output (every frame) and the local one (the `window` frames around each query,
shifted inside at the ends). Without position offsets the local scores are the global ones masked to the
band, so QKᵀ is computed once; with AnimateDiff's positions (global rows for the global branch, window
rows 0..L-1 for the local one) the loads are shared and the local position terms are gathered from a
small (frames x window) product."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dispatch import interpreting
from . import MAX_FRAMES  # noqa: F401  (kept importable here; in __init__ the dispatch checks it without triton)


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr, DTYPE: tl.constexpr):
    if UPCAST:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a.to(DTYPE), b.to(DTYPE))


@triton.jit
def _global_local_kernel(
    Q, K, V, OUT_G, OUT_L, GQ, GK, GV, LQ, LK, LV,
    stride_b, stride_f, stride_h, stride_pf, stride_ph,
    scale, frames, window, head_dim,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_OFFSETS: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    DTYPE = Q.dtype.element_ty
    n = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    offs_l = tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok, col_ok, d_ok, l_ok = rows < frames, cols < frames, offs_d < head_dim, offs_l < window
    base = n * stride_b + h * stride_h + offs_d[None, :]
    q = tl.load(Q + base + rows[:, None] * stride_f, mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(
        tl.float32
    )
    k = tl.load(K + base + cols[:, None] * stride_f, mask=col_ok[:, None] & d_ok[None, :], other=0.0).to(
        tl.float32
    )
    v = tl.load(V + base + cols[:, None] * stride_f, mask=col_ok[:, None] & d_ok[None, :], other=0.0).to(
        tl.float32
    )
    starts = tl.minimum(tl.maximum(rows - window // 2, 0), frames - window)
    relative = cols[None, :] - starts[:, None]  # each key's place in the query's window
    in_band = (relative >= 0) & (relative < window) & col_ok[None, :]

    # global branch
    if HAS_OFFSETS:
        table = h * stride_ph + offs_d[None, :]
        qg = q + tl.load(
            GQ + table + rows[:, None] * stride_pf, mask=row_ok[:, None] & d_ok[None, :], other=0.0
        ).to(tl.float32)
        kg = k + tl.load(
            GK + table + cols[:, None] * stride_pf, mask=col_ok[:, None] & d_ok[None, :], other=0.0
        ).to(tl.float32)
        vg = v + tl.load(
            GV + table + cols[:, None] * stride_pf, mask=col_ok[:, None] & d_ok[None, :], other=0.0
        ).to(tl.float32)
        scores = _dot(qg, tl.trans(kg), UPCAST, DTYPE)
    else:
        vg = v
        scores = _dot(q, tl.trans(k), UPCAST, DTYPE)
    s_g = tl.where(col_ok[None, :], scores * scale, float("-inf"))
    p_g = tl.exp(s_g - tl.max(s_g, axis=1)[:, None])
    p_g = p_g / tl.sum(p_g, axis=1)[:, None]
    out_g = _dot(p_g, vg, UPCAST, DTYPE)

    # local branch
    if HAS_OFFSETS:
        table = h * stride_ph + offs_d[None, :]
        lk = tl.load(
            LK + table + offs_l[:, None] * stride_pf, mask=l_ok[:, None] & d_ok[None, :], other=0.0
        ).to(tl.float32)
        lv = tl.load(
            LV + table + offs_l[:, None] * stride_pf, mask=l_ok[:, None] & d_ok[None, :], other=0.0
        ).to(tl.float32)
        ql = q + tl.load(
            LQ + table + (rows - starts)[:, None] * stride_pf, mask=row_ok[:, None] & d_ok[None, :], other=0.0
        ).to(tl.float32)
        position_scores = _dot(ql, tl.trans(lk), UPCAST, DTYPE)  # (M, L): query x window position
        place = tl.minimum(tl.maximum(relative, 0), BLOCK_L - 1)
        scores = _dot(ql, tl.trans(k), UPCAST, DTYPE) + tl.gather(position_scores, place, axis=1)
    s_l = tl.where(in_band, scores * scale, float("-inf"))
    p_l = tl.exp(s_l - tl.max(s_l, axis=1)[:, None])
    p_l = p_l / tl.sum(p_l, axis=1)[:, None]
    out_l = _dot(p_l, v, UPCAST, DTYPE)
    if HAS_OFFSETS:
        keys = tl.minimum(starts[:, None] + offs_l[None, :], BLOCK_N - 1)
        p_window = tl.where(l_ok[None, :], tl.gather(p_l, keys, axis=1), 0.0)  # (M, L) by window position
        out_l += _dot(p_window, lv, UPCAST, DTYPE)

    store = rows[:, None] * stride_f + n * stride_b + h * stride_h + offs_d[None, :]
    mask = row_ok[:, None] & d_ok[None, :]
    tl.store(OUT_G + store, out_g.to(DTYPE), mask=mask)
    tl.store(OUT_L + store, out_l.to(DTYPE), mask=mask)


def global_local_attention_triton(
    query, key, value, window, *, global_offsets=None, local_offsets=None, scale=None
):
    batch, frames, heads, dim = query.shape
    query, key, value = (x.contiguous() for x in (query, key, value))
    scale = dim**-0.5 if scale is None else scale
    out_g, out_l = torch.empty_like(query), torch.empty_like(query)
    has_offsets = global_offsets is not None
    if has_offsets:
        gq, gk, gv = (o.to(query.device, torch.float32).contiguous() for o in global_offsets)
        lq, lk, lv = (o[:window].to(query.device, torch.float32).contiguous() for o in local_offsets)
        if gq.shape[0] != frames or gq.stride() != lq.stride():
            raise ValueError(
                "global_local_attention: global offsets must be (frames, H, D), local (window, H, D)"
            )
    else:
        gq = gk = gv = lq = lk = lv = torch.zeros(1, heads, dim, device=query.device)
    block_m = 16 if frames <= 16 else 32
    grid = (batch, heads, triton.cdiv(frames, block_m))
    _global_local_kernel[grid](
        query, key, value, out_g, out_l, gq, gk, gv, lq, lk, lv,
        query.stride(0), query.stride(1), query.stride(2), gq.stride(0), gq.stride(1),
        scale, frames, window, dim,
        BLOCK_M=block_m, BLOCK_N=max(16, triton.next_power_of_2(frames)),
        BLOCK_L=max(16, triton.next_power_of_2(window)), BLOCK_D=max(16, triton.next_power_of_2(dim)),
        HAS_OFFSETS=has_offsets, UPCAST=interpreting() or query.dtype == torch.float32,
    )  # fmt: skip
    return out_g, out_l
