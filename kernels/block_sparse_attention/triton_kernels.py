"""Triton kernels for block-sparse attention: forward, and a FlashAttention-2 style backward.

Each program owns one query block (forward, dQ) or one key block (dK/dV) of one (batch, head) and walks
the pattern's BSR lists: partial blocks evaluate the element rule from token tables, full blocks skip it.
q, k, v, o and the gradients stay in diffusers' (B, S, H, D) layout with any strides: rows are read and
written through the pattern's token orders, so a tiled pattern needs no permuted copies. Head dims that
are not a power of two (40, 80) are zero-padded in registers. Softmax runs in the log2 domain.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ..dispatch import interpreting

LOG2E = 1.4426950408889634


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    # UPCAST: Triton's interpreter multiplies bf16 bit patterns as integers; only set when interpreting.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    elif IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _allowed(
    q_allow,
    q_spatial,
    q_t,
    q_y,
    q_x,
    k_seg,
    k_t,
    k_y,
    k_x,
    LIMITS,
    METRIC: tl.constexpr,
    NUM_LIMITS: tl.constexpr,
):
    """The element rule. Query-side and key-side values broadcast against each other: (M, 1) with (1, N)
    in the forward and dQ passes, (1, M) with (N, 1) in the dK/dV pass."""
    allowed = ((q_allow >> k_seg) & 1) != 0
    if METRIC != 0:
        spatial = ((q_spatial >> k_seg) & 1) != 0
        if NUM_LIMITS == 1:
            limit = tl.load(LIMITS)
        else:
            limit = tl.load(LIMITS + tl.minimum(tl.abs(q_t - k_t), NUM_LIMITS - 1))
        dx = q_x - k_x
        if METRIC == 1:
            distance = tl.abs(dx)
        elif METRIC == 2:
            distance = tl.maximum(tl.abs(q_y - k_y), tl.abs(dx))
        else:
            dy = q_y - k_y
            distance = dy * dy + dx * dx
        allowed = allowed | (spatial & (distance.to(tl.float32) < limit))
    return allowed


@triton.jit
def _rows(ORDER, offs, in_range, HAS_ORDER: tl.constexpr):
    """Caller-order rows of pattern positions `offs`, as int64."""
    if HAS_ORDER:  # noqa: SIM108 (a constexpr branch: no ternaries in Triton code)
        rows = tl.load(ORDER + offs, mask=in_range, other=0)
    else:
        rows = offs
    return rows.to(tl.int64)


@triton.jit
def _key_ok(KEY_OK, rows, in_range, HAS_KEY_MASK: tl.constexpr):
    """Keys in range and, with a key-padding mask, not padding (KEY_OK is this batch row's mask)."""
    if HAS_KEY_MASK:
        return in_range & (tl.load(KEY_OK + rows, mask=in_range, other=0) != 0)
    else:
        return in_range


@triton.jit
def _token_side(COORDS, SEG, ALLOW_BITS, SPATIAL_BITS, offs, in_range, QUERY: tl.constexpr):
    """Element-rule tables of the tokens at `offs`: (allow bits, spatial bits) for queries, segment for keys."""
    seg = tl.load(SEG + offs, mask=in_range, other=0)
    t = tl.load(COORDS + offs * 3, mask=in_range, other=0)
    y = tl.load(COORDS + offs * 3 + 1, mask=in_range, other=0)
    x = tl.load(COORDS + offs * 3 + 2, mask=in_range, other=0)
    if QUERY:
        return tl.load(ALLOW_BITS + seg), tl.load(SPATIAL_BITS + seg), t, y, x
    else:
        return seg, seg, t, y, x


@triton.jit
def _fwd_blocks(
    acc,
    l_i,
    m_i,
    q,
    K,
    V,
    stride_ks,
    stride_kd,
    stride_vs,
    stride_vd,
    KV_ORDER,
    KEY_OK,
    INDEX,
    count,
    kv_len,
    qk_scale,
    q_allow,
    q_spatial,
    q_t,
    q_y,
    q_x,
    K_COORDS,
    K_SEG,
    LIMITS,
    offs_d,
    b,
    h,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PARTIAL: tl.constexpr,
    METRIC: tl.constexpr,
    NUM_LIMITS: tl.constexpr,
    HAS_KV_ORDER: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    KV_TMA: tl.constexpr,
):
    d_ok = offs_d[None, :] < HEAD_DIM
    for i in range(0, count):
        block = tl.load(INDEX + i)
        offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
        n_in = offs_n < kv_len
        rows = _rows(KV_ORDER, offs_n, n_in, HAS_KV_ORDER)
        n_ok = _key_ok(KEY_OK, rows, n_in, HAS_KEY_MASK)
        if KV_TMA:  # K, V are (B, Skv, H, D) descriptors in position order: bulk tensor copies, zero-filled
            k = K.load([b, block * BLOCK_N, h, 0]).reshape(BLOCK_N, D_PAD)
            v = V.load([b, block * BLOCK_N, h, 0]).reshape(BLOCK_N, D_PAD)
        else:
            k_ptrs = K + rows[:, None] * stride_ks + offs_d[None, :] * stride_kd
            v_ptrs = V + rows[:, None] * stride_vs + offs_d[None, :] * stride_vd
            k = tl.load(k_ptrs, mask=n_ok[:, None] & d_ok, other=0.0)
            v = tl.load(v_ptrs, mask=n_ok[:, None] & d_ok, other=0.0)
        qk = _dot(q, tl.trans(k), UPCAST, IEEE) * qk_scale
        keep = n_ok[None, :]
        if PARTIAL:
            k_seg, _, k_t, k_y, k_x = _token_side(K_COORDS, K_SEG, K_SEG, K_SEG, offs_n, n_ok, False)
            keep = keep & _allowed(
                q_allow[:, None],
                q_spatial[:, None],
                q_t[:, None],
                q_y[:, None],
                q_x[:, None],
                k_seg[None, :],
                k_t[None, :],
                k_y[None, :],
                k_x[None, :],
                LIMITS,
                METRIC,
                NUM_LIMITS,
            )
        qk = tl.where(keep, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing allowed yet
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(qk - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST, IEEE)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(
    Q, K, V, OUT, LSE,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_ob, stride_os, stride_oh, stride_od,
    Q_ORDER, KV_ORDER, KEY_OK, FULL_COUNT, FULL_INDEX, full_width, PART_COUNT, PART_INDEX, part_width, Q_COORDS,
    Q_SEG, K_COORDS, K_SEG, ALLOW_BITS, SPATIAL_BITS, LIMITS,
    q_len, kv_len, num_heads, heads_per_group, num_q_blocks, qk_scale,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    METRIC: tl.constexpr, NUM_LIMITS: tl.constexpr, HAS_RULE: tl.constexpr, HAS_Q_ORDER: tl.constexpr,
    HAS_KV_ORDER: tl.constexpr, HAS_KEY_MASK: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    KV_TMA: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    group = h // heads_per_group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    m_ok = offs_m < q_len
    d_ok = offs_d[None, :] < HEAD_DIM
    rows = _rows(Q_ORDER, offs_m, m_ok, HAS_Q_ORDER)

    Q += b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    if not KV_TMA:
        K += b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
        V += b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    KEY_OK += b.to(tl.int64) * kv_len  # (B, Skv) int8; unused without a key-padding mask
    q = tl.load(
        Q + rows[:, None] * stride_qs + offs_d[None, :] * stride_qd, mask=m_ok[:, None] & d_ok, other=0.0
    )

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, D_PAD), dtype=tl.float32)
    row = group * num_q_blocks + pid_m

    if HAS_RULE:
        part_count = tl.load(PART_COUNT + row)
        q_allow, q_spatial, q_t, q_y, q_x = _token_side(
            Q_COORDS, Q_SEG, ALLOW_BITS, SPATIAL_BITS, offs_m, m_ok, True
        )
        acc, l_i, m_i = _fwd_blocks(
            acc, l_i, m_i, q, K, V, stride_ks, stride_kd, stride_vs, stride_vd, KV_ORDER, KEY_OK,
            PART_INDEX + row.to(tl.int64) * part_width, part_count, kv_len, qk_scale,
            q_allow, q_spatial, q_t, q_y, q_x, K_COORDS, K_SEG, LIMITS, offs_d, b, h,
            HEAD_DIM, D_PAD, BLOCK_N, True, METRIC, NUM_LIMITS, HAS_KV_ORDER, HAS_KEY_MASK, UPCAST, IEEE, KV_TMA,
        )  # fmt: skip
    full_count = tl.load(FULL_COUNT + row)
    acc, l_i, m_i = _fwd_blocks(
        acc, l_i, m_i, q, K, V, stride_ks, stride_kd, stride_vs, stride_vd, KV_ORDER, KEY_OK,
        FULL_INDEX + row.to(tl.int64) * full_width, full_count, kv_len, qk_scale,
        offs_m, offs_m, offs_m, offs_m, offs_m, K_COORDS, K_SEG, LIMITS, offs_d, b, h,
        HEAD_DIM, D_PAD, BLOCK_N, False, METRIC, NUM_LIMITS, HAS_KV_ORDER, HAS_KEY_MASK, UPCAST, IEEE, KV_TMA,
    )  # fmt: skip

    # A row that may attend nothing has l = 0 and acc = 0: its output is zero, its LSE -inf.
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    OUT += b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    out_ptrs = OUT + rows[:, None] * stride_os + offs_d[None, :] * stride_od
    tl.store(out_ptrs, out.to(OUT.dtype.element_ty), mask=m_ok[:, None] & d_ok)
    lse2 = m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i))
    lse = tl.where(l_i == 0.0, float("-inf"), lse2 / 1.4426950408889634)  # natural log
    tl.store(LSE + pid_bh.to(tl.int64) * q_len + rows, lse, mask=m_ok)


@triton.jit
def _dkdv_blocks(
    dk, dv, k, v, Q, DO, LSE, DELTA, stride_qs, stride_qd, stride_dos, stride_dod, Q_ORDER,
    INDEX, count, q_len, qk_scale, n_ok,
    k_seg, k_t, k_y, k_x, Q_COORDS, Q_SEG, ALLOW_BITS, SPATIAL_BITS, LIMITS, offs_d,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, SUB_M: tl.constexpr, PARTIAL: tl.constexpr,
    METRIC: tl.constexpr, NUM_LIMITS: tl.constexpr, HAS_Q_ORDER: tl.constexpr, UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
):  # fmt: skip
    """dK, dV of one key block from the query blocks in one list, SUB_M query rows at a time: whole
    128-row blocks would not fit in registers. One flat loop over (block, slice) keeps it pipelinable."""
    SLICES: tl.constexpr = BLOCK_M // SUB_M
    for j in range(0, count * SLICES):
        block = tl.load(INDEX + j // SLICES)
        dk, dv = _dkdv_rows(
            dk, dv, k, v, Q, DO, LSE, DELTA, stride_qs, stride_qd, stride_dos, stride_dod, Q_ORDER,
            block * BLOCK_M + (j % SLICES) * SUB_M + tl.arange(0, SUB_M), q_len, qk_scale, n_ok,
            k_seg, k_t, k_y, k_x, Q_COORDS, Q_SEG, ALLOW_BITS, SPATIAL_BITS, LIMITS, offs_d,
            HEAD_DIM, PARTIAL, METRIC, NUM_LIMITS, HAS_Q_ORDER, UPCAST, IEEE,
        )  # fmt: skip
    return dk, dv


@triton.jit
def _dkdv_rows(
    dk, dv, k, v, Q, DO, LSE, DELTA, stride_qs, stride_qd, stride_dos, stride_dod, Q_ORDER,
    offs_m, q_len, qk_scale, n_ok,
    k_seg, k_t, k_y, k_x, Q_COORDS, Q_SEG, ALLOW_BITS, SPATIAL_BITS, LIMITS, offs_d,
    HEAD_DIM: tl.constexpr, PARTIAL: tl.constexpr, METRIC: tl.constexpr, NUM_LIMITS: tl.constexpr,
    HAS_Q_ORDER: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    m_ok = offs_m < q_len
    q_rows = _rows(Q_ORDER, offs_m, m_ok, HAS_Q_ORDER)
    qd_mask = m_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + q_rows[:, None] * stride_qs + offs_d[None, :] * stride_qd, mask=qd_mask, other=0.0)
    do = tl.load(DO + q_rows[:, None] * stride_dos + offs_d[None, :] * stride_dod, mask=qd_mask, other=0.0)
    lse = tl.load(LSE + q_rows, mask=m_ok, other=0.0) * 1.4426950408889634
    lse = tl.where(lse == float("-inf"), 0.0, lse)  # a row with nothing allowed: every p is masked anyway
    delta = tl.load(DELTA + q_rows, mask=m_ok, other=0.0)
    keep = n_ok[:, None] & m_ok[None, :]
    if PARTIAL:
        q_allow, q_spatial, q_t, q_y, q_x = _token_side(
            Q_COORDS, Q_SEG, ALLOW_BITS, SPATIAL_BITS, offs_m, m_ok, True
        )
        keep = keep & _allowed(
            q_allow[None, :], q_spatial[None, :], q_t[None, :], q_y[None, :], q_x[None, :],
            k_seg[:, None], k_t[:, None], k_y[:, None], k_x[:, None], LIMITS, METRIC, NUM_LIMITS,
        )  # fmt: skip
    qk_t = _dot(k, tl.trans(q), UPCAST, IEEE) * qk_scale
    p_t = tl.where(keep, tl.exp2(qk_t - lse[None, :]), 0.0)
    dv += _dot(p_t.to(do.dtype), do, UPCAST, IEEE)
    dp_t = _dot(v, tl.trans(do), UPCAST, IEEE)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += _dot(ds_t.to(q.dtype), q, UPCAST, IEEE)
    return dk, dv


@triton.jit
def _dq_blocks(
    dq, q, do, lse, delta, K, V, stride_ks, stride_kd, stride_vs, stride_vd, KV_ORDER, KEY_OK,
    INDEX, count, kv_len, qk_scale, m_ok,
    q_allow, q_spatial, q_t, q_y, q_x, K_COORDS, K_SEG, LIMITS, offs_d,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, PARTIAL: tl.constexpr, METRIC: tl.constexpr,
    NUM_LIMITS: tl.constexpr, HAS_KV_ORDER: tl.constexpr, HAS_KEY_MASK: tl.constexpr, UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
):  # fmt: skip
    """dQ of one query block from the key blocks in one list."""
    d_ok = offs_d[None, :] < HEAD_DIM
    for i in range(0, count):
        block = tl.load(INDEX + i)
        offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
        n_in = offs_n < kv_len
        k_rows = _rows(KV_ORDER, offs_n, n_in, HAS_KV_ORDER)
        n_ok = _key_ok(KEY_OK, k_rows, n_in, HAS_KEY_MASK)
        kd_mask = n_ok[:, None] & d_ok
        k = tl.load(K + k_rows[:, None] * stride_ks + offs_d[None, :] * stride_kd, mask=kd_mask, other=0.0)
        v = tl.load(V + k_rows[:, None] * stride_vs + offs_d[None, :] * stride_vd, mask=kd_mask, other=0.0)
        keep = m_ok[:, None] & n_ok[None, :]
        if PARTIAL:
            k_seg, _, k_t, k_y, k_x = _token_side(K_COORDS, K_SEG, K_SEG, K_SEG, offs_n, n_ok, False)
            keep = keep & _allowed(
                q_allow[:, None], q_spatial[:, None], q_t[:, None], q_y[:, None], q_x[:, None],
                k_seg[None, :], k_t[None, :], k_y[None, :], k_x[None, :], LIMITS, METRIC, NUM_LIMITS,
            )  # fmt: skip
        qk = _dot(q, tl.trans(k), UPCAST, IEEE) * qk_scale
        p = tl.where(keep, tl.exp2(qk - lse[:, None]), 0.0)
        dp = _dot(do, tl.trans(v), UPCAST, IEEE)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, UPCAST, IEEE)
    return dq


@triton.jit
def _dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_dob, stride_dos, stride_doh, stride_dod,
    stride_dkb, stride_dks, stride_dkh, stride_dkd,
    stride_dvb, stride_dvs, stride_dvh, stride_dvd,
    Q_ORDER, KV_ORDER, KEY_OK, FULL_COUNT, FULL_INDEX, full_width, PART_COUNT, PART_INDEX, part_width, Q_COORDS,
    Q_SEG, K_COORDS, K_SEG, ALLOW_BITS, SPATIAL_BITS, LIMITS,
    q_len, kv_len, num_heads, heads_per_group, num_kv_blocks, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    METRIC: tl.constexpr, NUM_LIMITS: tl.constexpr, HAS_RULE: tl.constexpr, HAS_Q_ORDER: tl.constexpr,
    HAS_KV_ORDER: tl.constexpr, HAS_KEY_MASK: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    SUB_M: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    group = h // heads_per_group
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    n_in = offs_n < kv_len
    d_ok = offs_d[None, :] < HEAD_DIM
    k_rows = _rows(KV_ORDER, offs_n, n_in, HAS_KV_ORDER)
    # padding keys take part in nothing: their gradients are written as zeros
    n_ok = _key_ok(KEY_OK + b.to(tl.int64) * kv_len, k_rows, n_in, HAS_KEY_MASK)

    Q += b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    K += b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    V += b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    DO += b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
    LSE += pid_bh.to(tl.int64) * q_len
    DELTA += pid_bh.to(tl.int64) * q_len
    k = tl.load(
        K + k_rows[:, None] * stride_ks + offs_d[None, :] * stride_kd, mask=n_ok[:, None] & d_ok, other=0.0
    )
    v = tl.load(
        V + k_rows[:, None] * stride_vs + offs_d[None, :] * stride_vd, mask=n_ok[:, None] & d_ok, other=0.0
    )
    if HAS_RULE:
        k_seg, _, k_t, k_y, k_x = _token_side(K_COORDS, K_SEG, K_SEG, K_SEG, offs_n, n_ok, False)
    else:  # placeholders: without a rule there are no partial blocks to read them
        k_seg, k_t, k_y, k_x = offs_n, offs_n, offs_n, offs_n

    dk = tl.zeros((BLOCK_N, D_PAD), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, D_PAD), dtype=tl.float32)
    row = group * num_kv_blocks + pid_n
    if HAS_RULE:
        dk, dv = _dkdv_blocks(
            dk, dv, k, v, Q, DO, LSE, DELTA, stride_qs, stride_qd, stride_dos, stride_dod, Q_ORDER,
            PART_INDEX + row.to(tl.int64) * part_width, tl.load(PART_COUNT + row), q_len, qk_scale, n_ok,
            k_seg, k_t, k_y, k_x, Q_COORDS, Q_SEG, ALLOW_BITS, SPATIAL_BITS, LIMITS, offs_d,
            HEAD_DIM, BLOCK_M, SUB_M, True, METRIC, NUM_LIMITS, HAS_Q_ORDER, UPCAST, IEEE,
        )  # fmt: skip
    dk, dv = _dkdv_blocks(
        dk, dv, k, v, Q, DO, LSE, DELTA, stride_qs, stride_qd, stride_dos, stride_dod, Q_ORDER,
        FULL_INDEX + row.to(tl.int64) * full_width, tl.load(FULL_COUNT + row), q_len, qk_scale, n_ok,
        k_seg, k_t, k_y, k_x, Q_COORDS, Q_SEG, ALLOW_BITS, SPATIAL_BITS, LIMITS, offs_d,
        HEAD_DIM, BLOCK_M, SUB_M, False, METRIC, NUM_LIMITS, HAS_Q_ORDER, UPCAST, IEEE,
    )  # fmt: skip

    DK += b.to(tl.int64) * stride_dkb + h.to(tl.int64) * stride_dkh
    DV += b.to(tl.int64) * stride_dvb + h.to(tl.int64) * stride_dvh
    kd_mask = n_in[:, None] & d_ok
    tl.store(
        DK + k_rows[:, None] * stride_dks + offs_d[None, :] * stride_dkd,
        (dk * sm_scale).to(DK.dtype.element_ty),
        mask=kd_mask,
    )
    tl.store(
        DV + k_rows[:, None] * stride_dvs + offs_d[None, :] * stride_dvd,
        dv.to(DV.dtype.element_ty),
        mask=kd_mask,
    )


@triton.jit
def _dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_dob, stride_dos, stride_doh, stride_dod,
    stride_dqb, stride_dqs, stride_dqh, stride_dqd,
    Q_ORDER, KV_ORDER, KEY_OK, FULL_COUNT, FULL_INDEX, full_width, PART_COUNT, PART_INDEX, part_width, Q_COORDS,
    Q_SEG, K_COORDS, K_SEG, ALLOW_BITS, SPATIAL_BITS, LIMITS,
    q_len, kv_len, num_heads, heads_per_group, num_q_blocks, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    METRIC: tl.constexpr, NUM_LIMITS: tl.constexpr, HAS_RULE: tl.constexpr, HAS_Q_ORDER: tl.constexpr,
    HAS_KV_ORDER: tl.constexpr, HAS_KEY_MASK: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    SUB_M: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)  # SUB_M rows of pattern block pid_m // (BLOCK_M // SUB_M)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    group = h // heads_per_group
    offs_m = pid_m * SUB_M + tl.arange(0, SUB_M)
    offs_d = tl.arange(0, D_PAD)
    m_ok = offs_m < q_len
    d_ok = offs_d[None, :] < HEAD_DIM
    q_rows = _rows(Q_ORDER, offs_m, m_ok, HAS_Q_ORDER)

    Q += b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    K += b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    V += b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    DO += b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
    KEY_OK += b.to(tl.int64) * kv_len
    qd_mask = m_ok[:, None] & d_ok
    q = tl.load(Q + q_rows[:, None] * stride_qs + offs_d[None, :] * stride_qd, mask=qd_mask, other=0.0)
    do = tl.load(DO + q_rows[:, None] * stride_dos + offs_d[None, :] * stride_dod, mask=qd_mask, other=0.0)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * q_len + q_rows, mask=m_ok, other=0.0) * 1.4426950408889634
    lse = tl.where(lse == float("-inf"), 0.0, lse)
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * q_len + q_rows, mask=m_ok, other=0.0)
    if HAS_RULE:
        q_allow, q_spatial, q_t, q_y, q_x = _token_side(
            Q_COORDS, Q_SEG, ALLOW_BITS, SPATIAL_BITS, offs_m, m_ok, True
        )
    else:  # placeholders: without a rule there are no partial blocks to read them
        q_allow, q_spatial, q_t, q_y, q_x = offs_m, offs_m, offs_m, offs_m, offs_m

    dq = tl.zeros((SUB_M, D_PAD), dtype=tl.float32)
    row = group * num_q_blocks + pid_m // (BLOCK_M // SUB_M)
    if HAS_RULE:
        dq = _dq_blocks(
            dq, q, do, lse, delta, K, V, stride_ks, stride_kd, stride_vs, stride_vd, KV_ORDER, KEY_OK,
            PART_INDEX + row.to(tl.int64) * part_width, tl.load(PART_COUNT + row), kv_len, qk_scale, m_ok,
            q_allow, q_spatial, q_t, q_y, q_x, K_COORDS, K_SEG, LIMITS, offs_d,
            HEAD_DIM, BLOCK_N, True, METRIC, NUM_LIMITS, HAS_KV_ORDER, HAS_KEY_MASK, UPCAST, IEEE,
        )  # fmt: skip
    dq = _dq_blocks(
        dq, q, do, lse, delta, K, V, stride_ks, stride_kd, stride_vs, stride_vd, KV_ORDER, KEY_OK,
        FULL_INDEX + row.to(tl.int64) * full_width, tl.load(FULL_COUNT + row), kv_len, qk_scale, m_ok,
        q_allow, q_spatial, q_t, q_y, q_x, K_COORDS, K_SEG, LIMITS, offs_d,
        HEAD_DIM, BLOCK_N, False, METRIC, NUM_LIMITS, HAS_KV_ORDER, HAS_KEY_MASK, UPCAST, IEEE,
    )  # fmt: skip

    DQ += b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh
    tl.store(
        DQ + q_rows[:, None] * stride_dqs + offs_d[None, :] * stride_dqd,
        (dq * sm_scale).to(DQ.dtype.element_ty),
        mask=qd_mask,
    )


# ---- launchers


@functools.cache
def _placeholder(device: torch.device) -> torch.Tensor:
    """What an unused pointer argument points at (one per device, not an allocation per launch)."""
    return torch.zeros(1, dtype=torch.int32, device=device)


def _pattern_arguments(pattern, transposed: bool, device, key_ok: torch.Tensor | None) -> list:
    """Pointers and widths for the BSR lists, the token orders, the key mask and the element rule; all but
    the key mask made once per pattern, so that a launch does no device work before the kernel."""
    key = ("triton arguments", transposed)
    if key not in pattern.kernel_cache:
        pattern.kernel_cache[key] = _make_pattern_arguments(pattern, transposed, device)
    arguments = list(pattern.kernel_cache[key])
    if key_ok is not None:
        arguments[2] = key_ok
    return arguments


def _make_pattern_arguments(pattern, transposed: bool, device) -> list:
    suffix = "_t" if transposed else ""
    full_count, full_index = pattern.lists("full" + suffix)
    part_count, part_index = pattern.lists("partial" + suffix)
    rule, q_tokens, kv_tokens = pattern.rule, pattern.q_tokens, pattern.kv_tokens
    dummy = _placeholder(device)
    if pattern.has_partial:
        allow_bits, spatial_bits = rule.segment_bits()
        tables = [
            q_tokens.coords,
            q_tokens.segments,
            kv_tokens.coords,
            kv_tokens.segments,
            allow_bits,
            spatial_bits,
        ]
        limits = rule.limits
    else:
        tables = [dummy] * 6
        limits = torch.zeros(1, dtype=torch.float32, device=device)
    return [
        dummy if pattern.q_order is None else pattern.q_order,
        dummy if pattern.kv_order is None else pattern.kv_order,
        dummy,  # the key mask: the call's
        full_count,
        full_index,
        full_index.shape[-1],
        part_count,
        part_index,
        part_index.shape[-1],
        *tables,
        limits,
    ]


def _tma_readable(x: torch.Tensor) -> bool:
    """Whether x (B, S, H, D) can be read by bulk tensor copies: unit last stride, 16-byte aligned base
    and strides (TMA's requirements)."""
    size = x.element_size()
    return x.stride(-1) == 1 and x.data_ptr() % 16 == 0 and all(st * size % 16 == 0 for st in x.stride()[:-1])


def _use_tma(q: torch.Tensor) -> bool:
    """K / V through TMA descriptors: on Hopper and newer; ATTNPACK_TMA=0 turns it off, =1 turns it on in
    Triton's interpreter (which runs descriptors too), so the CPU tests cover both paths."""
    setting = os.environ.get("ATTNPACK_TMA", "auto")
    if setting == "0":
        return False
    if interpreting():
        return setting == "1"
    return q.is_cuda and torch.cuda.get_device_capability(q.device)[0] >= 9


def _kv_operands(pattern, q, k, v, key_ok, block_n: int, d_pad: int):
    """(K, V, key mask, reads through the kv order, TMA) for the forward kernel. With TMA, keys in the
    pattern's order are gathered into position order once per call (an O(S) copy), so that every key
    block is a run of rows that one bulk copy reads; the kernel then needs no per-element pointers."""
    if not _use_tma(q):
        return k, v, key_ok, pattern.kv_order is not None, False
    if pattern.kv_order is not None:
        k, v = k.index_select(1, pattern.kv_order), v.index_select(1, pattern.kv_order)
        key_ok = None if key_ok is None else key_ok[:, pattern.kv_order].contiguous()
    elif not (_tma_readable(k) and _tma_readable(v)):
        return k, v, key_ok, False, False
    block = [1, block_n, 1, d_pad]
    k_desc, v_desc = (TensorDescriptor(x, list(x.shape), list(x.stride()), block) for x in (k, v))
    return k_desc, v_desc, key_ok, False, True


def _meta(pattern, q: torch.Tensor, key_ok: torch.Tensor | None) -> dict:
    head_dim = q.shape[-1]
    rule = pattern.rule
    return dict(
        HEAD_DIM=head_dim,
        D_PAD=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_M=pattern.block_q,
        BLOCK_N=pattern.block_kv,
        METRIC=int(rule.metric) if rule is not None else 0,
        NUM_LIMITS=len(rule.limits) if rule is not None else 1,
        HAS_RULE=pattern.has_partial,
        HAS_Q_ORDER=pattern.q_order is not None,
        HAS_KV_ORDER=pattern.kv_order is not None,
        HAS_KEY_MASK=key_ok is not None,
        UPCAST=interpreting() and q.dtype == torch.bfloat16,
        IEEE=q.dtype == torch.float32,
    )


# Launch configurations: (num_warps, num_stages, and for the backward kernels SUB_M, the query rows per
# step). On a GPU the kernels are autotuned over CONFIGS the first time a shape class runs (keyed on head
# dim, blocks, rule and dtype); ATTNPACK_AUTOTUNE=0 uses the first config instead. The candidates were
# picked from the SASS of sm_80 / sm_90 builds (tools/kernel_resources.py, held by
# tests/test_kernel_compile.py): on sm_90 the first of each list issues warpgroup MMAs (HGMMA), loads
# through TMA (forward) or cp.async (backward) over two stages, and does not spill at head dims 64 and 128.
# dQ needs 64-row slices for HGMMA (32 rows compile to mma.sync); dK/dV spills at 64 at head dim 128.
CONFIGS = {
    "forward": [
        dict(num_warps=8, num_stages=2),
        dict(num_warps=8, num_stages=3),
        dict(num_warps=8, num_stages=1),
    ],
    "dkdv": [
        dict(SUB_M=32, num_warps=8, num_stages=2),
        dict(SUB_M=64, num_warps=8, num_stages=2),
        dict(SUB_M=32, num_warps=4, num_stages=2),
        dict(SUB_M=16, num_warps=4, num_stages=3),
    ],
    "dq": [
        dict(SUB_M=64, num_warps=8, num_stages=2),
        dict(SUB_M=32, num_warps=8, num_stages=3),
        dict(SUB_M=32, num_warps=4, num_stages=2),
    ],
}
TUNING_KEY = ["HEAD_DIM", "BLOCK_M", "BLOCK_N", "METRIC", "NUM_LIMITS", "HAS_RULE", "HAS_KEY_MASK", "IEEE"]


def _launch_config(kernel: str, meta: dict, dtype: torch.dtype) -> dict:
    """The untuned configuration: the interpreter's, or the first candidate that fits the block."""
    if interpreting():
        return {"SUB_M": 16} if kernel != "forward" else {}  # 16 rows: the interpreter tests split blocks too
    return next(c for c in CONFIGS[kernel] if c.get("SUB_M", 0) <= meta["BLOCK_M"]).copy()


def _autotune() -> bool:
    return not interpreting() and os.environ.get("ATTNPACK_AUTOTUNE", "1") != "0"


@functools.cache
def _tuned(kernel: str):
    jit = {"forward": _fwd_kernel, "dkdv": _dkdv_kernel, "dq": _dq_kernel}[kernel]
    configs = [
        triton.Config(
            {k: v for k, v in c.items() if k == "SUB_M"}, num_warps=c["num_warps"], num_stages=c["num_stages"]
        )
        for c in CONFIGS[kernel]
    ]

    def prune(configs, named_args, **kwargs):
        block_m = named_args.get("BLOCK_M", kwargs.get("BLOCK_M"))
        return [c for c in configs if c.kwargs.get("SUB_M", 0) <= block_m]

    return triton.autotune(
        configs=configs,
        key=TUNING_KEY + (["KV_TMA"] if kernel == "forward" else []),
        prune_configs_by={"early_config_prune": prune},
    )(jit)


def _launch(kernel: str, grid, args: tuple, meta: dict, dtype: torch.dtype) -> None:
    if _autotune():
        _tuned(kernel)[grid](*args, **meta)
    else:
        config = _launch_config(kernel, meta, dtype)
        jit = {"forward": _fwd_kernel, "dkdv": _dkdv_kernel, "dq": _dq_kernel}[kernel]
        jit[grid(meta | config) if callable(grid) else grid](*args, **meta, **config)


def forward(
    q, k, v, pattern, scale: float, key_ok: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """o (B, Sq, H, D) like q, and the natural-log LSE as (B, H, Sq) float32. `key_ok`: (B, Skv) int8,
    contiguous, 0 for padding keys."""
    batch, q_len, heads, _ = q.shape
    pattern = pattern.to(q.device)
    o = torch.empty_like(q)
    lse = torch.empty(batch, heads, q_len, dtype=torch.float32, device=q.device)
    meta = _meta(pattern, q, key_ok)
    k_arg, v_arg, key_ok, through_order, tma = _kv_operands(
        pattern, q, k, v, key_ok, meta["BLOCK_N"], meta["D_PAD"]
    )
    arguments = _pattern_arguments(pattern, False, q.device, key_ok)
    if not through_order:
        arguments[1] = _placeholder(q.device)
    meta |= dict(HAS_KEY_MASK=key_ok is not None, HAS_KV_ORDER=through_order, KV_TMA=tma)
    args = (
        q, k_arg, v_arg, o, lse,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        *arguments,
        q_len, k.shape[1], heads, heads // pattern.num_groups, pattern.num_q_blocks, scale * LOG2E,
    )  # fmt: skip
    _launch("forward", (pattern.num_q_blocks, batch * heads), args, meta, q.dtype)
    return o, lse


def backward(do, q, k, v, o, lse, pattern, scale: float, key_ok: torch.Tensor | None = None):
    """dq, dk, dv for `forward`'s output gradient `do`."""
    batch, q_len, heads, _ = q.shape
    pattern = pattern.to(q.device)
    delta = (o.float() * do.float()).sum(-1).transpose(1, 2).contiguous()  # (B, H, Sq)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    meta = _meta(pattern, q, key_ok)
    common = (q_len, k.shape[1], heads, heads // pattern.num_groups)
    dkdv_args = (
        q, k, v, do, dk, dv, lse, delta,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
        *_pattern_arguments(pattern, True, q.device, key_ok),
        *common, pattern.num_kv_blocks, scale * LOG2E, scale,
    )  # fmt: skip
    _launch("dkdv", (pattern.num_kv_blocks, batch * heads), dkdv_args, meta, q.dtype)
    dq_args = (
        q, k, v, do, dq, lse, delta,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
        *_pattern_arguments(pattern, False, q.device, key_ok),
        *common, pattern.num_q_blocks, scale * LOG2E, scale,
    )  # fmt: skip
    slices = lambda config: (pattern.num_q_blocks * (pattern.block_q // config["SUB_M"]), batch * heads)  # noqa: E731
    _launch("dq", slices, dq_args, meta, q.dtype)
    return dq, dk, dv
