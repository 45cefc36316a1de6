"""attnpack.kernels.dense_attention: SDPA and the float32 reference agree, in diffusers' (B, S, H, D) layout."""

import pytest
import torch

from attnpack.kernels import backends, dense_attention
from attnpack.kernels.dense import dense_attention_reference


def qkv(batch, q_len, k_len, heads, dim, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_len, heads, dim, generator=g).to(dtype)
    k = torch.randn(batch, k_len, heads, dim, generator=g).to(dtype)
    v = torch.randn(batch, k_len, heads, dim, generator=g).to(dtype)
    return q, k, v


def naive(q, k, v, mask=None, scale=None):
    """Per head, per query, in float64: the definition itself."""
    b, sq, h, d = q.shape
    scale = d**-0.5 if scale is None else scale
    out = torch.zeros(b, sq, h, d, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            scores = (q[bi, :, hi].double() @ k[bi, :, hi].double().T) * scale
            if mask is not None:
                m = mask.expand(b, h, sq, k.shape[1])[bi, hi]
                scores = (
                    scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m.double()
                )
            weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
            out[bi, :, hi] = weights @ v[bi, :, hi].double()
    return out


@pytest.mark.parametrize(
    ("q_len", "k_len", "dim"), [(37, 37, 64), (50, 77, 40), (16, 9, 80), (130, 130, 128)]
)
def test_backends_match_the_definition(q_len, k_len, dim):
    q, k, v = qkv(2, q_len, k_len, 3, dim)
    expected = naive(q, k, v)
    for backend in ("sdpa", "reference"):
        out = dense_attention(q, k, v, backend=backend)
        assert out.shape == q.shape
        assert (out.double() - expected).abs().max() < 1e-5, backend


def test_masks_and_scale():
    q, k, v = qkv(2, 12, 20, 2, 16)
    bool_mask = torch.rand(2, 1, 12, 20, generator=torch.Generator().manual_seed(1)) > 0.3
    bool_mask[..., 0] = True
    additive = torch.randn(1, 2, 12, 20)
    for mask in (bool_mask, additive):
        expected = naive(q, k, v, mask, scale=0.3)
        for backend in ("sdpa", "reference"):
            out = dense_attention(q, k, v, attn_mask=mask, scale=0.3, backend=backend)
            assert (out.double() - expected).abs().max() < 1e-5


def test_row_with_no_allowed_key_is_zero():
    q, k, v = qkv(1, 4, 6, 1, 8)
    mask = torch.ones(1, 1, 4, 6, dtype=torch.bool)
    mask[0, 0, 2] = False
    out = dense_attention_reference(q, k, v, attn_mask=mask)
    assert torch.all(out[0, 2] == 0) and torch.isfinite(out).all()
    assert torch.equal(dense_attention(q, k, v, attn_mask=mask, backend="sdpa")[0, 2], out[0, 2])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype):
    q, k, v = qkv(1, 33, 33, 2, 64, dtype=dtype)
    expected = naive(q, k, v)
    out = dense_attention(q, k, v)
    assert out.dtype == dtype
    assert (out.double() - expected).abs().max() < 2e-2


def test_bad_input():
    q, k, v = qkv(1, 4, 4, 1, 8)
    with pytest.raises(ValueError, match=r"q, k, v must be \(B, S, H, D\); got shapes \(4, 1, 8\)"):
        dense_attention(q[0], k, v)
    with pytest.raises(ValueError, match=r"backend='flex' is not one of 'sdpa', 'reference'"):
        dense_attention(q, k, v, backend="flex")


def test_backends_report():
    found = {backend.name: backend for backend in backends()}
    assert {"triton", "sdpa", "flex_attention", "xformers"} <= set(found)
    assert found["sdpa"].available
    assert found["triton"].available == torch.cuda.is_available()
