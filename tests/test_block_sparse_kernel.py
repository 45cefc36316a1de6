"""The Triton block-sparse kernels against the reference: forward, LSE and backward.

On the CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by conftest); the `gpu`
tests compile them for a CUDA device at real block sizes.
"""

import pytest
import torch
from kernel_cases import CASES, TOLERANCE, disc2d, inputs, relative_error

from attnpack.kernels import block_sparse_attention
from attnpack.patterns import BlockSparsePattern


def run(pattern, q, k, v, backend, grad):
    out, lse = block_sparse_attention(q, k, v, pattern, return_lse=True, backend=backend)
    out.backward(grad)
    grads = [x.grad.clone() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None
    return out.detach(), lse, grads


def check(pattern, heads=2, head_dim=64, dtype=torch.float32, batch=1, device="cpu"):
    q, k, v = inputs(pattern, heads, head_dim, dtype, batch, device)
    grad = torch.randn_like(q)
    out, lse, grads = run(pattern, q, k, v, "triton", grad)
    ref_out, ref_lse, ref_grads = run(pattern, q, k, v, "reference", grad)
    tolerance = TOLERANCE[dtype]
    assert out.dtype == dtype and out.shape == q.shape
    assert relative_error(out, ref_out) < tolerance
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert (lse[finite] - ref_lse[finite]).abs().max() < 1e-3
    for name, got, expected in zip("qkv", grads, ref_grads, strict=True):
        assert torch.isfinite(got).all(), name
        assert relative_error(got, expected) < tolerance * 2, name
    return out, lse


@pytest.mark.parametrize("case", list(CASES))
def test_cases(case):
    pattern = CASES[case]()
    heads = 4 if case == "head_groups" else 2
    out, lse = check(pattern, heads=heads)
    if case == "empty_rows":
        empty = ~pattern.to_dense()[0].any(-1)
        assert empty.any()
        assert torch.all(out[:, empty] == 0) and torch.all(lse[:, empty] == float("-inf"))


@pytest.mark.parametrize("case", list(CASES))
def test_cases_through_tma_descriptors(case, monkeypatch):
    """Hopper's forward reads K / V through TMA descriptors (keys gathered into position order first);
    Triton's interpreter runs descriptors too, so the same cases hold that path to the reference."""
    import importlib

    kernels = importlib.import_module("attnpack.kernels.block_sparse_attention.triton_kernels")
    monkeypatch.setenv("ATTNPACK_TMA", "1")
    used = []
    original = kernels._kv_operands
    monkeypatch.setattr(kernels, "_kv_operands", lambda *args: used.append(original(*args)) or used[-1])
    pattern = CASES[case]()
    check(pattern, heads=4 if case == "head_groups" else 2, head_dim=40)
    assert used and all(operands[-1] for operands in used)  # every forward call took the TMA path


def test_key_padding_through_tma_descriptors(monkeypatch):
    monkeypatch.setenv("ATTNPACK_TMA", "1")
    test_key_padding()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [40, 64, 80, 128])
def test_dtypes_and_head_dims(dtype, head_dim):
    check(disc2d(), head_dim=head_dim, dtype=dtype)


def test_strided_inputs_need_no_copies():
    """q, k, v as views into one packed projection, the way fused qkv layers produce them."""
    pattern = disc2d()
    g = torch.Generator().manual_seed(3)
    packed = torch.randn(2, pattern.q_len, 3, 2, 32, generator=g)
    q, k, v = packed.unbind(2)
    assert not q.is_contiguous()
    out = block_sparse_attention(q, k, v, pattern, backend="triton")
    expected = block_sparse_attention(
        q.contiguous(), k.contiguous(), v.contiguous(), pattern, backend="reference"
    )
    assert relative_error(out, expected) < 1e-5


def test_scale():
    pattern = disc2d()
    q, k, v = (x.detach() for x in inputs(pattern))
    out = block_sparse_attention(q, k, v, pattern, scale=0.05, backend="triton")
    assert (
        relative_error(out, block_sparse_attention(q, k, v, pattern, scale=0.05, backend="reference")) < 1e-5
    )


# ---- on a CUDA device, at the block sizes the GPU uses


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_dim", [40, 64, 80, 128])
def test_gpu_dense_pattern_matches_sdpa(dtype, head_dim):
    pattern = BlockSparsePattern.dense(1000, 1337, block_q=128, block_kv=64)
    q, k, v = (torch.randn(2, n, 4, head_dim, device="cuda", dtype=dtype) for n in (1000, 1337, 1337))
    out = block_sparse_attention(q, k, v, pattern)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    ).transpose(1, 2)
    assert relative_error(out, expected) < TOLERANCE[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_cases(case, dtype):
    check(CASES[case](), heads=4, head_dim=128, dtype=dtype, batch=2, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_real_blocks(head_dim):
    """128 x 64 blocks over a 48 x 64 image with 64 text tokens."""
    from kernel_cases import TEXT_AND_SPATIAL, _text_then_grid

    from attnpack.patterns import ElementRule, Metric

    tokens, order = _text_then_grid(64, (48, 64), (8, 16))
    rule = ElementRule(*TEXT_AND_SPATIAL, Metric.EUCLIDEAN, torch.tensor([12.0**2]))
    pattern = BlockSparsePattern.from_rule(
        rule, tokens.to("cuda"), tokens.to("cuda"), block_q=128, block_kv=64, q_order=order, kv_order=order
    )
    check(pattern, heads=4, head_dim=head_dim, dtype=torch.bfloat16, batch=1, device="cuda")


def test_key_padding():
    """Per-batch padded keys (HunyuanVideo's text) are masked on top of the pattern, in one call."""
    from kernel_cases import assert_triton_matches_reference, disc2d

    pattern = disc2d()
    key_padding = torch.ones(2, pattern.kv_len, dtype=torch.bool)
    key_padding[0, 2:5] = False  # text tokens 2..4 of the first prompt are padding
    key_padding[1, 40:] = False
    _, _, dk, _ = assert_triton_matches_reference(pattern, key_padding=key_padding)
    assert torch.all(dk[0, 2:5] == 0) and torch.all(dk[1, 40:] == 0)  # padding keys get zero gradients
    q, k, v = (x.detach() for x in inputs(pattern, batch=2))
    reference = block_sparse_attention(q, k, v, pattern, key_padding=key_padding, backend="reference")
    flex = block_sparse_attention(q, k, v, pattern, key_padding=key_padding, backend="flex")
    assert relative_error(flex, reference) < 1e-5
    with pytest.raises(ValueError, match=r"key_padding must be a bool tensor of shape \(B, Sk\)"):
        block_sparse_attention(q, k, v, pattern, key_padding=key_padding[:, :-1])
