"""Best match per source token without materialising the Ns x Nd score matrix: each program owns a block of
source rows and walks the destination rows in tiles, keeping a running maximum and its index."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dispatch import interpreting


@triton.jit
def _best_match_kernel(
    SRC, DST, VALUE, INDEX,
    stride_sb, stride_ss, stride_sc, stride_db, stride_ds, stride_dc,
    num_src, num_dst, channels,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    pid_s = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    s_ok = offs_s < num_src
    best = tl.full((BLOCK_S,), float("-inf"), dtype=tl.float32)
    best_index = tl.zeros((BLOCK_S,), dtype=tl.int32)
    SRC += b * stride_sb
    DST += b * stride_db
    for start in range(0, num_dst, BLOCK_D):
        offs_d = start + tl.arange(0, BLOCK_D)
        d_ok = offs_d < num_dst
        scores = tl.zeros((BLOCK_S, BLOCK_D), dtype=tl.float32)
        for c in range(0, channels, BLOCK_C):
            offs_c = c + tl.arange(0, BLOCK_C)
            c_ok = offs_c < channels
            s = tl.load(
                SRC + offs_s[:, None] * stride_ss + offs_c[None, :] * stride_sc,
                mask=s_ok[:, None] & c_ok[None, :],
                other=0.0,
            )
            d = tl.load(
                DST + offs_d[:, None] * stride_ds + offs_c[None, :] * stride_dc,
                mask=d_ok[:, None] & c_ok[None, :],
                other=0.0,
            )
            if UPCAST:  # Triton's interpreter multiplies bf16 bit patterns as integers
                s, d = s.to(tl.float32), d.to(tl.float32)
            scores += tl.dot(s, tl.trans(d))
        scores = tl.where(d_ok[None, :], scores, float("-inf"))
        tile_best = tl.max(scores, axis=1)
        tile_index = tl.argmax(scores, axis=1).to(tl.int32) + start
        better = tile_best > best  # strictly: the first index wins ties, as torch's max does on the CPU
        best_index = tl.where(better, tile_index, best_index)
        best = tl.where(better, tile_best, best)
    out = b * num_src + offs_s
    tl.store(VALUE + out, best, mask=s_ok)
    tl.store(INDEX + out, best_index.to(tl.int64), mask=s_ok)


def best_match_triton(src: torch.Tensor, dst: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    batch, num_src, channels = src.shape
    num_dst = dst.shape[1]
    value = torch.empty(batch, num_src, dtype=torch.float32, device=src.device)
    index = torch.empty(batch, num_src, dtype=torch.int64, device=src.device)
    grid = (triton.cdiv(num_src, 64), batch)
    _best_match_kernel[grid](
        src, dst, value, index, *src.stride(), *dst.stride(), num_src, num_dst, channels,
        BLOCK_S=64, BLOCK_D=64, BLOCK_C=64, UPCAST=interpreting() and src.dtype == torch.bfloat16,
    )  # fmt: skip
    return value, index
