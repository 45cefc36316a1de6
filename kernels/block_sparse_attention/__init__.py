"""Block-sparse attention in diffusers' (B, S, H, D) layout: the kernel every sparse method runs on.

    out = block_sparse_attention(q, k, v, pattern)                     # (B, Sq, H, D)
    out, lse = block_sparse_attention(q, k, v, pattern, return_lse=True)  # lse: (B, Sq, H), natural log

Backends: "triton" (attnpack's kernels: forward and backward), "chunked" (the pattern's block lists a chunk
of query blocks at a time: only listed key blocks are computed, the element rule only inside partial blocks,
parts merged by LSE; memory bounded, no S x S tensor), "reference" (float32 math under `pattern.to_dense()`:
the spec), "sdpa" (SDPA with the dense mask) and "flex" (FlexAttention with the same block mask, a comparison
backend). A query row with no allowed key returns zeros (and an LSE of -inf), whatever the backend.

What "auto" runs on each device:

- CUDA (with triton installed): Triton.
- CPU: below DENSE_MASK_MAX_BYTES of dense mask (`dense_bytes`, 64 MB: ~700 tokens at 24 heads, ~1500 at
  2), SDPA with the dense mask (the reference when the LSE is asked for), which is fastest there;
  above, "chunked", each part through SDPA's fused CPU kernel (float32 accumulation, AMX / AVX-512 for
  bfloat16). It needs a few hundred MB whatever S is, where the dense mask needs ~20 bytes per query-key
  pair per head (FLUX 2048² tens of GB, Wan 480p 81 frames more).
- Apple MPS, ROCm or CUDA without triton: the same choice, "chunked" running each part as float32 torch
  math (any device; not measured on MPS or ROCm).

FlexAttention is not an auto choice off CUDA: in torch 2.13 its eager CPU path materialises the S x S scores
and its compiled CPU path is inference-only, without the LSE.

    dq, dk, dv = block_sparse_attention_backward(grad_out, q, k, v, out, lse, pattern)

is the backward of one part of a larger attention, given that attention's `out` and `lse`: ring
attention runs it on each key chunk (Triton on CUDA; elsewhere the reference with the dense mask when it is
small, the chunked backward otherwise).
"""

from __future__ import annotations

import torch

from .. import dispatch
from ..dispatch import log_once
from .chunked import chunked_backward, chunked_forward
from .reference import (
    block_sparse_attention_backward_reference,
    block_sparse_attention_reference,
    head_mask,
)

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256

# Off CUDA, "auto" builds an S x S mask only below this many bytes (see `dense_bytes`). Measured on a 2-core
# CPU (bf16 forward, CLEAR r8 + 64 text, 24 heads): dense mask 38 ms, chunked 41 ms at 640 tokens (36 MB);
# 171 ms and 119 ms at 1,088 tokens (105 MB).
DENSE_MASK_MAX_BYTES = 64 << 20


def dense_bytes(pattern, q: torch.Tensor, *, need_lse: bool = False, key_padding: bool = False) -> int:
    """About what the dense-mask paths allocate for one call: `pattern.to_dense()` (a bool per pair and
    group, ~20 bytes a pair while the element rule is evaluated), then SDPA's per-head mask (bool and q's
    dtype, per batch element with key padding) or, for the LSE / backward, the reference's float32 scores."""
    batch, _, heads, _ = q.shape
    pairs = pattern.q_len * pattern.kv_len
    total = pairs * (pattern.num_groups + (20 if pattern.has_partial else 0))
    if need_lse:
        return total + pairs * batch * heads * 16
    return total + pairs * (batch if key_padding else 1) * heads * (1 + q.element_size())


def _auto(device: torch.device, need_lse: bool = False, dense: int | None = None) -> tuple[str, str | None]:
    """Triton on CUDA (where triton is installed); elsewhere SDPA with the dense mask (the reference when the
    LSE is asked for), or the chunked path when `dense` is over DENSE_MASK_MAX_BYTES."""
    where = dispatch.triton_runs_fast(device)
    if where is None:
        return "triton", None
    if dense is not None and dense > DENSE_MASK_MAX_BYTES:
        return "chunked", (
            f"{where} ({device.type}), running the chunked path over the pattern's block lists (memory "
            f"bounded; the dense mask would take {dense / 2**30:.1f} GiB)"
        )
    fallback = "reference" if need_lse else "sdpa"
    return fallback, (
        f"{where} ({device.type}), running {fallback} with the dense mask "
        "(memory and time grow with the square of the sequence)"
    )


def _no_lse(need_lse: bool = False, **_) -> str | None:
    return "does not return the LSE; use another backend" if need_lse else None


_AUTO_SUMMARY = (
    "triton on CUDA with triton installed; elsewhere sdpa with the dense mask (reference for the LSE) below "
    f"DENSE_MASK_MAX_BYTES ({DENSE_MASK_MAX_BYTES >> 20} MB), else chunked"
)
FORWARD_OP = dispatch.register_op("block_sparse_attention", _auto, _AUTO_SUMMARY)
FORWARD_OP.register("triton", **dispatch.triton_backend("attnpack's Triton kernels, forward and backward"))
FORWARD_OP.register("reference", "float32 math under the dense mask: the spec")
FORWARD_OP.register("flex", **dispatch.flex_backend("FlexAttention with the same block mask (comparison)"))
FORWARD_OP.register("sdpa", "SDPA with the dense mask (no LSE)", can_run=_no_lse)
FORWARD_OP.register("chunked", "the pattern's block lists a chunk of query blocks at a time (memory bounded)")

BACKWARD_OP = dispatch.register_op(
    "block_sparse_attention_backward",
    lambda device, dense=None, **_: _auto(device, need_lse=True, dense=dense),
    "triton on CUDA with triton installed; elsewhere the reference below DENSE_MASK_MAX_BYTES, else chunked",
)
BACKWARD_OP.register("triton", **dispatch.triton_backend("attnpack's Triton backward kernels"))
BACKWARD_OP.register("reference", "float32 math under the dense mask: the spec")
BACKWARD_OP.register("chunked", "the chunked backward over the pattern's block lists (memory bounded)")
# No backward of a key chunk for these two: they run the reference or the chunked path by size.
BACKWARD_OP.register("flex", "runs the reference or chunked (no FlexAttention backward of a key chunk)")
BACKWARD_OP.register("sdpa", "runs the reference or chunked (no SDPA backward of a key chunk)")

BACKENDS = (dispatch.AUTO, *FORWARD_OP.names)


def resolve_backend(
    backend: str | None, device: torch.device, need_lse: bool = False, dense: int | None = None
) -> str:
    """The backend a block_sparse_attention call runs on: the argument, else `set_backend` /
    ATTNPACK_KERNEL_BACKEND, else auto.

    Auto: Triton on CUDA (where triton is installed); elsewhere SDPA with the dense mask (the reference when
    the LSE is asked for), or the chunked path when `dense` (the bytes the dense mask would take, see
    `dense_bytes`) is over DENSE_MASK_MAX_BYTES."""
    return FORWARD_OP.resolve(backend, device=device, need_lse=need_lse, dense=dense)


def _check(q, k, v, pattern) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"block_sparse_attention: q, k, v must be (B, S, H, D); got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"block_sparse_attention: q, k, v must share one dtype of float16, bfloat16, float32; got "
            f"{q.dtype}, {k.dtype}, {v.dtype}"
        )
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(
            f"block_sparse_attention: k and v must be equal and match q's batch, heads and head dim; got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if not 1 <= q.shape[-1] <= MAX_HEAD_DIM:
        raise ValueError(f"block_sparse_attention: head dim {q.shape[-1]} is not in 1..{MAX_HEAD_DIM}")
    if (pattern.q_len, pattern.kv_len) != (q.shape[1], k.shape[1]):
        raise ValueError(
            f"block_sparse_attention: the pattern is for {pattern.q_len} queries x {pattern.kv_len} keys; "
            f"q has {q.shape[1]} tokens and k {k.shape[1]}"
        )
    if q.shape[2] % pattern.num_groups:
        raise ValueError(
            f"block_sparse_attention: {q.shape[2]} heads do not split into the pattern's {pattern.num_groups} head groups"
        )


class _TritonBlockSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pattern, scale, key_ok):
        from . import triton_kernels

        o, lse = triton_kernels.forward(q, k, v, pattern, scale, key_ok)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.pattern, ctx.scale, ctx.key_ok = pattern, scale, key_ok
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        from . import triton_kernels

        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = triton_kernels.backward(grad_out, q, k, v, o, lse, ctx.pattern, ctx.scale, ctx.key_ok)
        return dq, dk, dv, None, None, None


class _ChunkedBlockSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pattern, scale, key_padding):
        o, lse = chunked_forward(q, k, v, pattern, scale, key_padding)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.pattern, ctx.scale, ctx.key_padding = pattern, scale, key_padding
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = chunked_backward(grad_out, q, k, v, o, lse, ctx.pattern, ctx.scale, ctx.key_padding)
        return dq, dk, dv, None, None, None


def _prepare(
    q, k, v, pattern, scale, key_padding, backend, need_lse: bool, op=FORWARD_OP
) -> tuple[float, str]:
    """Check the arguments; the softmax scale and the backend that runs."""
    _check(q, k, v, pattern)
    if key_padding is not None and (
        key_padding.shape != (k.shape[0], k.shape[1]) or key_padding.dtype != torch.bool
    ):
        raise ValueError(
            f"block_sparse_attention: key_padding must be a bool tensor of shape (B, Sk) = "
            f"{(k.shape[0], k.shape[1])}; got {key_padding.dtype} {tuple(key_padding.shape)}"
        )
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    dense = dense_bytes(pattern, q, need_lse=need_lse, key_padding=key_padding is not None)
    return scale, op.resolve(backend, device=q.device, need_lse=need_lse, dense=dense)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern,
    *,
    scale: float | None = None,
    key_padding: torch.Tensor | None = None,
    return_lse: bool = False,
    backend: str | None = None,
):
    """Attention of q (B, Sq, H, D) over k, v (B, Sk, H, D) where `pattern` allows it.

    `key_padding` (B, Sk) bool, True for real keys, masks keys per batch element on top of the pattern
    (padded text tokens). Returns the output (B, Sq, H, D), and with `return_lse` also the natural-log LSE
    (B, Sq, H) float32. Differentiable on every backend (the Triton backend with its own backward kernels).
    """
    scale, name = _prepare(q, k, v, pattern, scale, key_padding, backend, need_lse=return_lse)
    if name == "triton":
        key_ok = None if key_padding is None else key_padding.to(torch.int8).contiguous()
        out, lse = _TritonBlockSparseAttention.apply(q, k, v, pattern, scale, key_ok)
        lse = lse.transpose(1, 2)
    elif name == "chunked":
        out, lse = _ChunkedBlockSparseAttention.apply(q, k, v, pattern, scale, key_padding)
    elif name == "reference":
        out, lse = block_sparse_attention_reference(q, k, v, pattern, scale, key_padding)
    elif name == "flex":
        from .flex import flex_block_sparse_attention

        out, lse = flex_block_sparse_attention(q, k, v, pattern, scale, key_padding=key_padding)
    else:  # sdpa (its check refused the LSE)
        mask = head_mask(pattern.to(q.device), q.shape[2], key_padding)
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale
        ).transpose(1, 2)
        out = torch.where(mask.any(-1).transpose(1, 2)[..., None], out, 0.0)
        lse = None
    return (out, lse) if return_lse else out


def block_sparse_attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    pattern,
    *,
    scale: float | None = None,
    key_padding: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv of q's attention over k, v where `pattern` allows it, when these keys are one part of a
    larger attention whose output is `out` (B, Sq, H, D) and natural-log LSE `lse` (B, Sq, H): the
    softmax weights here are exp(s - lse). With every key in k, this is the plain backward."""
    scale, name = _prepare(q, k, v, pattern, scale, key_padding, backend, need_lse=True, op=BACKWARD_OP)
    if name == "triton":
        from . import triton_kernels

        key_ok = None if key_padding is None else key_padding.to(torch.int8).contiguous()
        lse = lse.transpose(1, 2).contiguous()
        return triton_kernels.backward(grad_out.contiguous(), q, k, v, out, lse, pattern, scale, key_ok)
    if name in ("flex", "sdpa"):
        dense = dense_bytes(pattern, q, need_lse=True)
        name = "chunked" if dense > DENSE_MASK_MAX_BYTES else "reference"
        log_once(f"block_sparse_attention_backward: no backward of a key chunk there, running {name}")
    if name == "chunked":
        return chunked_backward(grad_out, q, k, v, out, lse, pattern, scale, key_padding)
    return block_sparse_attention_backward_reference(grad_out, q, k, v, out, lse, pattern, scale, key_padding)


__all__ = [
    "BACKENDS",
    "block_sparse_attention",
    "block_sparse_attention_backward",
    "block_sparse_attention_reference",
    "dense_bytes",
    "resolve_backend",
]
