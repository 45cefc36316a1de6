"""Attention implementations the benchmarks time against attnpack: SDPA backends and FlexAttention."""

from __future__ import annotations

import torch

from ..kernels.block_sparse_attention.flex import block_mask, compiled_flex_attention
from ..patterns import tile


def sdpa_runner(backend_name: str):
    """SDPA restricted to one backend ("flash", "cudnn", "efficient", "math"), in (B, S, H, D) layout."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}.get(
        backend_name, SDPBackend.EFFICIENT_ATTENTION if backend_name == "efficient" else SDPBackend.MATH
    )

    def run(q, k, v):
        with sdpa_kernel([backend]):
            return torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            ).transpose(1, 2)

    return run


def flex_runner(q, k, v, pattern):
    """FlexAttention on inputs already in the pattern's order: its kernel alone, with the same block mask."""
    if not q.is_cuda:
        from torch.nn.attention.flex_attention import flex_attention as run
    else:
        run = compiled_flex_attention()
    mask = block_mask(pattern, q.shape[2])

    def ordered(x, order):
        return (x if order is None else tile(x, order)).transpose(1, 2)

    qt, kt, vt = ordered(q, pattern.q_order), ordered(k, pattern.kv_order), ordered(v, pattern.kv_order)
    return lambda: run(qt, kt, vt, block_mask=mask)
