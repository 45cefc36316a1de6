"""Off CUDA: the chunked path over the pattern's block lists against the reference, and what "auto" picks.

The chunked path is what runs on the CPU (and MPS, ROCm, CUDA without triton) once the dense mask would be
large, so it answers to the same spec as the Triton kernels: output, LSE and gradients of the reference,
rows without a key as zeros with an LSE of -inf, key padding, head groups, odd lengths and orders.
"""

import logging

import pytest
import torch
from kernel_cases import CASES, disc2d, inputs, relative_error

from attnpack.kernels import block_sparse_attention, block_sparse_attention_backward
from attnpack.kernels.block_sparse_attention import (
    DENSE_MASK_MAX_BYTES,
    dense_bytes,
    resolve_backend,
)
from attnpack.kernels.block_sparse_attention.chunked import chunked_backward, chunked_forward


def forward_and_grads(pattern, q, k, v, grad, backend, **options):
    out, lse = block_sparse_attention(q, k, v, pattern, return_lse=True, backend=backend, **options)
    out.backward(grad)
    grads = [x.grad.clone() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None
    return out.detach(), lse, grads


def assert_matches(got, expected, tolerance):
    (out, lse, grads), (ref_out, ref_lse, ref_grads) = got, expected
    assert out.dtype == ref_out.dtype and out.shape == ref_out.shape
    assert relative_error(out, ref_out) < tolerance
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert (lse[finite] - ref_lse[finite]).abs().max() < 1e-4
    for name, g, r in zip("qkv", grads, ref_grads, strict=True):
        assert torch.isfinite(g).all(), name
        assert relative_error(g, r) < tolerance, name


@pytest.mark.parametrize("run_queries", [16, 1024], ids=["one-block-runs", "long-runs"])
@pytest.mark.parametrize("fused", [True, False], ids=["sdpa-cpu-kernel", "torch-math"])
@pytest.mark.parametrize("case", list(CASES))
def test_chunked_matches_the_reference(case, fused, run_queries, monkeypatch):
    """Runs of one query block or of all of them, and small budgets that cut a run's keys into many parts,
    so that merging by LSE and masks of mixed block categories are exercised."""
    from attnpack.kernels.block_sparse_attention import chunked

    monkeypatch.setattr(chunked, "RUN_QUERIES", run_queries)
    pattern = CASES[case]()
    heads = 4 if case == "head_groups" else 2
    q, k, v = inputs(pattern, heads=heads, head_dim=32, batch=2)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(5))
    reference = forward_and_grads(pattern, q, k, v, grad, "reference")
    for budget in (1 << 10, 1 << 14, 1 << 22):
        out, lse = chunked_forward(
            q.detach(), k.detach(), v.detach(), pattern, 32**-0.5, budget=budget, fused=fused
        )
        grads = chunked_backward(
            grad, q.detach(), k.detach(), v.detach(), out, lse, pattern, 32**-0.5, budget=budget, fused=fused
        )
        assert_matches((out, lse, list(grads)), reference, 1e-5)
    if case == "empty_rows":
        empty = ~pattern.to_dense()[0].any(-1)
        assert empty.any() and torch.all(out[:, empty] == 0) and torch.all(lse[:, empty] == float("-inf"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_chunked_in_half_precision(dtype):
    pattern = disc2d()
    q, k, v = inputs(pattern, heads=2, head_dim=64, dtype=dtype)
    grad = torch.randn_like(q)
    got = forward_and_grads(pattern, q, k, v, grad, "chunked")
    assert_matches(
        got, forward_and_grads(pattern, q, k, v, grad, "reference"), 3e-2 if dtype == torch.bfloat16 else 5e-3
    )


def test_chunked_with_key_padding():
    pattern = disc2d()
    key_padding = torch.ones(2, pattern.kv_len, dtype=torch.bool)
    key_padding[0, 2:5] = False
    key_padding[1, 40:] = False
    q, k, v = inputs(pattern, batch=2)
    grad = torch.randn_like(q)
    got = forward_and_grads(pattern, q, k, v, grad, "chunked", key_padding=key_padding)
    assert_matches(got, forward_and_grads(pattern, q, k, v, grad, "reference", key_padding=key_padding), 1e-5)
    dk = got[2][1]
    assert torch.all(dk[0, 2:5] == 0) and torch.all(dk[1, 40:] == 0)


def test_backward_of_a_key_chunk_off_cuda():
    """Ring attention's per-chunk backward: the chunked one and the reference agree, from any backend name."""
    pattern = CASES["empty_rows"]()
    q, k, v = (x.detach() for x in inputs(pattern, batch=2))
    out, lse = block_sparse_attention(q, k, v, pattern, return_lse=True, backend="reference")
    grad = torch.randn_like(q)
    expected = block_sparse_attention_backward(grad, q, k, v, out, lse, pattern, backend="reference")
    for backend in ("chunked", "sdpa", "flex"):
        got = block_sparse_attention_backward(grad, q, k, v, out, lse, pattern, backend=backend)
        for g, e in zip(got, expected, strict=True):
            assert relative_error(g, e) < 1e-5


def test_auto_picks_by_the_size_of_the_dense_mask(caplog, monkeypatch):
    import importlib

    monkeypatch.setattr(importlib.import_module("attnpack.kernels.dispatch"), "_logged", set())
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == "sdpa"
    assert resolve_backend("auto", cpu, need_lse=True) == "reference"
    with caplog.at_level(logging.INFO, logger="attnpack"):
        assert resolve_backend("auto", cpu, dense=DENSE_MASK_MAX_BYTES + 1) == "chunked"
    assert "chunked path" in caplog.text and "GiB" in caplog.text
    pattern = disc2d()
    q = torch.zeros(1, pattern.q_len, 24, 64)
    small = dense_bytes(pattern, q)
    assert 0 < small < DENSE_MASK_MAX_BYTES
    assert dense_bytes(pattern, q, need_lse=True) > small  # float32 scores per head for the LSE


def test_auto_runs_chunked_where_the_dense_mask_would_be_large(monkeypatch):
    """Lower the threshold instead of building a large problem: same result, and no S x S mask is made."""
    import importlib

    module = importlib.import_module("attnpack.kernels.block_sparse_attention")
    pattern = disc2d()
    q, k, v = inputs(pattern)
    grad = torch.randn_like(q)
    expected = forward_and_grads(pattern, q, k, v, grad, "reference")
    monkeypatch.setattr(module, "DENSE_MASK_MAX_BYTES", 0)
    monkeypatch.setattr(
        type(pattern), "to_dense", lambda self: pytest.fail("the chunked path built the dense mask")
    )
    assert_matches(forward_and_grads(pattern, q, k, v, grad, "auto"), expected, 1e-5)


def test_chunked_memory_stays_bounded():
    """A sequence whose dense mask would take ~1 GiB: the chunked call allocates a small multiple of q, k, v."""
    from attnpack.patterns import BlockSparsePattern

    length, heads, dim = 8192, 4, 32
    blocks = length // 64
    block_mask = torch.zeros(1, blocks, blocks, dtype=torch.bool)
    for offset in (-1, 0, 1):  # a band of three key blocks per query block
        block_mask[0].diagonal(offset).fill_(True)
    pattern = BlockSparsePattern.from_block_mask(
        block_mask, q_len=length, kv_len=length, block_q=64, block_kv=64
    )
    q, k, v = (torch.randn(1, length, heads, dim) for _ in range(3))
    assert dense_bytes(pattern, q) > 2 * DENSE_MASK_MAX_BYTES
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = block_sparse_attention(q, k, v, pattern, backend="auto")
    largest = max(event.cpu_memory_usage for event in prof.events())  # what one op allocated
    assert out.shape == q.shape and torch.isfinite(out).all()
    assert largest < 32 << 20, f"one op allocated {largest / 2**20:.0f} MB"
