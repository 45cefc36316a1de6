"""Patterns restricted to (query shard x key chunk): what ring attention runs on each rank."""

import itertools

import pytest
import torch
from helpers import max_diff

from attnpack.kernels import block_sparse_attention, block_sparse_attention_backward
from attnpack.parallel import shard_tokens
from attnpack.patterns import BlockSparsePattern, clear_window, radial
from attnpack.patterns.shards import allows_own_token, restrict

B, H, D = 2, 2, 8


def diffusers_merge(prev_out, prev_lse, out, lse):
    """How diffusers' TemplatedRingAttention folds one more chunk into the running output and LSE."""
    lse, prev_lse = lse[..., None], prev_lse[..., None]
    merged = prev_out - torch.sigmoid(lse - prev_lse) * (prev_out - out)
    merged_lse = prev_lse - torch.nn.functional.logsigmoid(prev_lse - lse)
    return merged, merged_lse[..., 0]


def uneven_shards(length: int, parts: int) -> list[torch.Tensor]:
    """Contiguous shards whose edges do not fall on block boundaries."""
    edges = [round(i * length / parts) + (3 if 0 < i < parts else 0) for i in range(parts + 1)]
    return [torch.arange(a, b) for a, b in itertools.pairwise(edges)]


PATTERNS = {
    "clear, tiled, pooled keys": lambda: clear_window((16, 16), 3, text_tokens=8, down_factor=2),
    "radial, block level": lambda: radial(8, (4, 8), decay_factor=0.05, block_size=16, text_tokens=5),
    "radial spatial, text last": lambda: radial(
        6, (4, 8), decay_factor=0.2, block_size=16, variant="spatial", text_tokens=4, text_first=False
    ),
}


@pytest.mark.parametrize("name", list(PATTERNS))
def test_shard_chunks_merged_by_lse_equal_the_whole_attention(name):
    pattern = PATTERNS[name]()
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, pattern.q_len, H, D, generator=g)
    k, v = (torch.randn(B, pattern.kv_len, H, D, generator=g) for _ in range(2))
    padding = torch.rand(B, pattern.kv_len, generator=g) > 0.1
    out, lse = block_sparse_attention(
        q, k, v, pattern, key_padding=padding, return_lse=True, backend="reference"
    )
    grad = torch.randn_like(out, generator=g)
    q_shards, kv_chunks = uneven_shards(pattern.q_len, 3), uneven_shards(pattern.kv_len, 3)
    empty_rows = 0
    for rows in q_shards:
        merged = None
        for keys in kv_chunks:
            shard = restrict(pattern, rows, keys)
            assert shard.pattern is None or shard.pattern.block_q == pattern.block_q
            if shard.pattern is None:
                part = torch.zeros(B, len(rows), H, D)
                part_lse = torch.full((B, len(rows), H), float("-inf"))
            else:
                chunk_padding = torch.cat([padding[:, keys], torch.zeros(B, 1, dtype=torch.bool)], 1)
                o, chunk_lse = block_sparse_attention(
                    shard.gather(q[:, rows], shard.q_index),
                    shard.gather(k[:, keys], shard.kv_index),
                    shard.gather(v[:, keys], shard.kv_index),
                    shard.pattern,
                    key_padding=chunk_padding[:, shard.kv_index],
                    return_lse=True,
                    backend="reference",
                )
                part = shard.scatter(o, len(rows), shard.q_positions, shard.q_rows)
                part_lse = shard.scatter(chunk_lse, len(rows), shard.q_positions, shard.q_rows, float("-inf"))
            empty_rows += int(torch.isneginf(part_lse).sum())
            # the merge starts from the first chunk that has keys for every row, as ring's own chunk does
            merged = (part, part_lse) if merged is None else diffusers_merge(*merged, part, part_lse)
        assert torch.isfinite(merged[0]).all()
        assert max_diff(merged[0], out[:, rows]) <= 1e-5 and max_diff(merged[1], lse[:, rows]) <= 1e-4
    if "pooled" in name:  # the text rows see no pooled key: empty in the last chunk, merged exactly
        assert empty_rows > 0

    # backward: each chunk's share, given the merged output and LSE, sums to the whole gradient
    q_, k_, v_ = (x.clone().requires_grad_() for x in (q, k, v))
    expected = torch.autograd.grad(
        block_sparse_attention(q_, k_, v_, pattern, key_padding=padding, backend="reference"),
        (q_, k_, v_),
        grad,
    )
    got = [torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)]
    for rows in q_shards:
        for keys in kv_chunks:
            shard = restrict(pattern, rows, keys)
            if shard.pattern is None:
                continue
            gather_rows = lambda x: shard.gather(x[:, rows], shard.q_index)  # noqa: E731, B023
            row_lse = torch.cat([lse[:, rows], torch.zeros(B, 1, H)], 1)[:, shard.q_index]
            chunk_padding = torch.cat([padding[:, keys], torch.zeros(B, 1, dtype=torch.bool)], 1)
            dq, dk, dv = block_sparse_attention_backward(
                gather_rows(grad), gather_rows(q), shard.gather(k[:, keys], shard.kv_index),
                shard.gather(v[:, keys], shard.kv_index), gather_rows(out), row_lse, shard.pattern,
                key_padding=chunk_padding[:, shard.kv_index],
            )  # fmt: skip
            got[0][:, rows[shard.q_rows]] += dq[:, shard.q_positions]
            got[1][:, keys[shard.kv_rows]] += dk[:, shard.kv_positions]
            got[2][:, keys[shard.kv_rows]] += dv[:, shard.kv_positions]
    for mine, theirs in zip(got, expected, strict=True):
        assert max_diff(mine, theirs) <= 1e-5


def test_backward_with_every_key_is_the_plain_backward():
    pattern = clear_window((8, 8), 2, text_tokens=4)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, pattern.q_len, H, D, generator=g, requires_grad=True) for _ in range(3))
    out, lse = block_sparse_attention(q, k, v, pattern, return_lse=True, backend="reference")
    grad = torch.randn_like(out)
    expected = torch.autograd.grad(out, (q, k, v), grad)
    got = block_sparse_attention_backward(grad, q, k, v, out.detach(), lse, pattern)
    for mine, theirs in zip(got, expected, strict=True):
        assert max_diff(mine, theirs) <= 1e-5


def test_own_token_check():
    assert bool(allows_own_token(clear_window((8, 8), 2, text_tokens=4), torch.arange(68)).all())
    assert bool(allows_own_token(radial(4, (4, 8), decay_factor=0.1, block_size=16), torch.arange(128)).all())
    no_diagonal = BlockSparsePattern.from_block_mask(
        ~torch.eye(4, dtype=torch.bool)[None], q_len=64, kv_len=64, block_q=16, block_kv=16
    )
    own = allows_own_token(no_diagonal, torch.arange(64))
    assert not bool(own.any())


def test_shard_tokens_follow_the_streams():
    # FLUX: [text, image] streams of 4 and 12 tokens over 2 shards: a rank holds [text_r, image_r]
    assert shard_tokens((4, 12), 2, (1,)).tolist() == [2, 3, 10, 11, 12, 13, 14, 15]
    gathered = shard_tokens((4, 12), 2, (0, 1)).tolist()
    assert gathered == [0, 1, 4, 5, 6, 7, 8, 9, 2, 3, 10, 11, 12, 13, 14, 15]
    assert shard_tokens((8,), 4, (2, 3)).tolist() == [4, 5, 6, 7]


def test_restriction_is_cached_and_skips_empty_blocks():
    pattern = radial(8, (4, 8), decay_factor=0.05, block_size=16)
    rows, keys = torch.arange(0, 100), torch.arange(150, 256)
    shard = restrict(pattern, rows, keys)
    assert restrict(pattern, rows, keys) is shard
    assert shard.pattern is not None and shard.pattern.num_blocks <= pattern.num_blocks
    assert len(shard.q_rows) <= len(rows)
