"""Dense attention in diffusers' (B, S, H, D) layout.

PyTorch's scaled_dot_product_attention is the fast path (FlashAttention / memory-efficient / cuDNN on
CUDA, fused math on the CPU): attnpack has no faster dense kernel to offer, so it does not ship one.
`reference.py` is the spec the block-sparse kernels are tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import dispatch
from .reference import dense_attention_reference

DENSE_OP = dispatch.register_op("dense_attention", lambda **_: ("sdpa", None), "sdpa, everywhere")
DENSE_OP.register("sdpa", "PyTorch's scaled_dot_product_attention (Flash / memory-efficient / cuDNN / CPU)")
DENSE_OP.register("reference", "float32 math: the spec")
BACKENDS = DENSE_OP.names


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Attention of q (B, Sq, H, D) over k, v (B, Sk, H, D); returns (B, Sq, H, D).

    `attn_mask` broadcasts to (B, H, Sq, Sk): boolean (True = may attend) or additive. `backend` is
    "sdpa" or "reference" (float32 math, for checking); None: `set_backend` / ATTNPACK_KERNEL_BACKEND, else
    "auto", which is "sdpa".
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"dense_attention: q, k, v must be (B, S, H, D); got shapes {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if DENSE_OP.resolve(backend, device=q.device) == "sdpa":
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask, scale=scale
        )
        return out.transpose(1, 2)
    return dense_attention_reference(q, k, v, attn_mask=attn_mask, scale=scale)


__all__ = ["BACKENDS", "dense_attention", "dense_attention_reference"]
