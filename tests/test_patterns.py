"""BlockSparsePattern, element rules and token orders: exact block classification, dense masks, densities."""

import pytest
import torch

from attnpack.patterns import (
    MAX_SEGMENTS,
    BlockSparsePattern,
    ElementRule,
    Metric,
    TokenTable,
    block_counts,
    concat_orders,
    grid_coordinates,
    identity_order,
    inverse_order,
    tile,
    tile_order,
    untile,
)


def text_and_image(text: int, grid: tuple, tile_shape: tuple | None = None):
    """Tokens [text, image]: segment 0 text, 1 image; the image optionally tiled."""
    n = int(torch.tensor(grid).prod())
    image = tile_order(grid, tile_shape, offset=text) if tile_shape else identity_order(n, offset=text)
    order = concat_orders(identity_order(text), image)
    coords = torch.cat([torch.zeros(text, 3, dtype=torch.int32), grid_coordinates(grid)])
    segments = torch.cat([torch.zeros(text, dtype=torch.int32), torch.ones(n, dtype=torch.int32)])
    return TokenTable(coords[order], segments[order]), order


def disc_rule(radius: float) -> ElementRule:
    """Text sees everything and is seen by everything; image tokens see image tokens in a disc."""
    allow = torch.tensor([[True, True], [True, False]])
    spatial = torch.tensor([[False, False], [False, True]])
    return ElementRule(allow, spatial, Metric.EUCLIDEAN, torch.tensor([radius**2]))


def brute_force(rule: ElementRule, q: TokenTable, k: TokenTable) -> torch.Tensor:
    out = torch.zeros(len(q), len(k), dtype=torch.bool)
    for i in range(len(q)):
        for j in range(len(k)):
            sq, sk = int(q.segments[i]), int(k.segments[j])
            if rule.allow[sq, sk]:
                out[i, j] = True
                continue
            if not rule.spatial[sq, sk] or rule.metric is Metric.NONE:
                continue
            (tq, yq, xq), (tk, yk, xk) = q.coords[i].tolist(), k.coords[j].tolist()
            limit = float(rule.limits[min(abs(tq - tk), len(rule.limits) - 1)])
            if rule.metric is Metric.BAND:
                distance = abs(xq - xk)
            elif rule.metric is Metric.BOX:
                distance = max(abs(yq - yk), abs(xq - xk))
            else:
                distance = (yq - yk) ** 2 + (xq - xk) ** 2
            out[i, j] = distance < limit
    return out


# ---- token orders


def test_tile_order_2d_blocks_are_tiles():
    order = tile_order((8, 12), (4, 4))
    assert sorted(order.tolist()) == list(range(96))
    coords = grid_coordinates((8, 12))[order]
    for block in coords.split(16):  # 16 = one 4 x 4 tile
        assert block[:, 1].max() - block[:, 1].min() == 3 and block[:, 2].max() - block[:, 2].min() == 3


def test_tile_order_3d_and_ragged_edges():
    order = tile_order((3, 5, 7), (2, 2, 4), offset=10)
    assert sorted(order.tolist()) == list(range(10, 10 + 105))
    coords = grid_coordinates((3, 5, 7))[order - 10]
    first = coords[:16]  # the first tile is whole: 2 frames x 2 rows x 4 columns
    assert first[:, 0].tolist() == [0] * 8 + [1] * 8 and first[:, 2].max() == 3


def test_tile_and_untile_round_trip():
    x = torch.randn(2, 35, 3, 4)
    order = tile_order((5, 7), (2, 4))
    tiled = tile(x, order)
    assert torch.equal(tiled[:, 0], x[:, order[0]])
    assert torch.equal(untile(tiled, order), x)
    assert torch.equal(inverse_order(order)[order], torch.arange(35))


@pytest.mark.parametrize(("grid", "tile_shape"), [((4,), (2,)), ((4, 4), (2, 2, 2)), ((0, 4), (1, 1))])
def test_tile_order_rejects_bad_shapes(grid, tile_shape):
    with pytest.raises(ValueError, match="tile_order"):
        tile_order(grid, tile_shape)


# ---- rules


@pytest.mark.parametrize("metric", [Metric.BAND, Metric.BOX, Metric.EUCLIDEAN])
def test_rule_matches_brute_force(metric):
    g = torch.Generator().manual_seed(0)
    q = TokenTable(torch.randint(0, 4, (23, 3), generator=g), torch.randint(0, 3, (23,), generator=g))
    k = TokenTable(torch.randint(0, 4, (19, 3), generator=g), torch.randint(0, 3, (19,), generator=g))
    allow = torch.rand(3, 3, generator=g) > 0.7
    spatial = torch.rand(3, 3, generator=g) > 0.3
    limits = torch.tensor([4.5, 2.0, -1.0])  # frame distance 0, 1, and >= 2 (nothing)
    rule = ElementRule(allow, spatial, metric, limits)
    assert torch.equal(rule.evaluate(q, k), brute_force(rule, q, k))


def test_segment_bits_use_all_32_bits():
    allow = torch.zeros(MAX_SEGMENTS, MAX_SEGMENTS, dtype=torch.bool)
    allow[0, 31] = allow[1, 0] = True
    bits, _ = ElementRule(allow, torch.zeros_like(allow)).segment_bits()
    assert bits.dtype == torch.int32
    assert ((bits[0] >> 31) & 1) == 1 and ((bits[0] >> 30) & 1) == 0 and bits[1] == 1


def test_rule_and_table_validation():
    with pytest.raises(ValueError, match="33 segments; accepted: 1 to 32"):
        ElementRule(torch.zeros(33, 33), torch.zeros(33, 33))
    with pytest.raises(ValueError, match="metric euclidean needs limits"):
        ElementRule(torch.ones(1, 1), torch.ones(1, 1), Metric.EUCLIDEAN)
    with pytest.raises(ValueError, match=r"coords must be \(S, 3\)"):
        TokenTable(torch.zeros(4, 2), torch.zeros(4))
    with pytest.raises(ValueError, match="one per token"):
        TokenTable(torch.zeros(4, 3), torch.zeros(5))


# ---- patterns


@pytest.mark.parametrize(("block_q", "block_kv"), [(16, 16), (32, 16), (16, 64)])
def test_from_rule_classifies_blocks_exactly(block_q, block_kv):
    tokens, order = text_and_image(7, (10, 13), (4, 4))
    rule = disc_rule(3.0)
    pattern = BlockSparsePattern.from_rule(
        rule, tokens, tokens, block_q=block_q, block_kv=block_kv, q_order=order, kv_order=order
    )
    mask = rule.evaluate(tokens, tokens)
    counts = block_counts(mask[None], block_q, block_kv)[0]
    assert torch.equal(pattern.full[0] | pattern.partial[0], counts > 0)
    assert torch.equal(pattern.to_dense(order="positions")[0], mask)
    assert pattern.allowed_elements == int(mask.sum())
    assert pattern.element_density == pytest.approx(float(mask.float().mean()))
    assert pattern.block_density >= pattern.element_density


@pytest.mark.parametrize("metric", [Metric.NONE, Metric.BAND, Metric.BOX, Metric.EUCLIDEAN])
@pytest.mark.parametrize("table", ["random", "video"])
def test_from_rule_full_and_partial_are_exact(metric, table):
    """Full means every element allowed and partial some, whatever the tokens: random tables (repeated
    coordinates, segments mixed in every block) and a tiled video whose tiles and frames straddle blocks."""
    g = torch.Generator().manual_seed(int(metric) + 10 * (table == "video"))
    if table == "random":
        coords = torch.randint(0, 5, (150, 3), generator=g)
        segments = torch.randint(0, 3, (150,), generator=g)
    else:
        order = tile_order((4, 6, 10), (1, 4, 4))
        coords = grid_coordinates((4, 6, 10), order)
        segments = (coords[:, 0] > 0).to(torch.int32) + 1  # 1: the first frame, 2: the others
        coords, segments = (
            torch.cat([torch.zeros(9, 3, dtype=torch.int32), coords]),
            torch.cat([torch.zeros(9, dtype=torch.int32), segments]),
        )
    tokens = TokenTable(coords, segments)
    allow = torch.rand(3, 3, generator=g) > 0.6
    spatial = torch.rand(3, 3, generator=g) > 0.3
    limits = None if metric is Metric.NONE else torch.tensor([9.5, 4.0, 2.0, -1.0])
    rule = ElementRule(allow, spatial, metric, limits)
    for block_q, block_kv in [(16, 16), (32, 16), (16, 64)]:
        pattern = BlockSparsePattern.from_rule(rule, tokens, tokens, block_q=block_q, block_kv=block_kv)
        counts = block_counts(rule.evaluate(tokens, tokens)[None], block_q, block_kv)[0]
        area = pattern._block_area()
        assert torch.equal(pattern.full[0], counts == area)
        assert torch.equal(pattern.partial[0], (counts > 0) & (counts < area))
        assert pattern.allowed_elements == int(counts.sum())


def test_to_dense_answers_in_token_order():
    tokens, order = text_and_image(5, (6, 9), (3, 3))
    rule = disc_rule(2.5)
    pattern = BlockSparsePattern.from_rule(
        rule, tokens, tokens, block_q=16, block_kv=16, q_order=order, kv_order=order
    )
    raster, _ = text_and_image(5, (6, 9))  # the same tokens in the caller's order
    assert torch.equal(pattern.to_dense()[0], rule.evaluate(raster, raster))


def test_tiling_lowers_block_density():
    # a block of 64 raster tokens is one row of the grid; a block of tiled tokens is an 8 x 8 square
    rule = disc_rule(8.0)
    raster, _ = text_and_image(0, (64, 64))
    tiled, order = text_and_image(0, (64, 64), (8, 8))
    flat = BlockSparsePattern.from_rule(rule, raster, raster, block_q=64, block_kv=64)
    tiles = BlockSparsePattern.from_rule(
        rule, tiled, tiled, block_q=64, block_kv=64, q_order=order, kv_order=order
    )
    assert tiles.element_density == pytest.approx(flat.element_density)
    assert tiles.block_density < 0.6 * flat.block_density


def test_cross_attention_pattern():
    q = TokenTable(grid_coordinates((5, 6)), torch.ones(30, dtype=torch.int32))
    k = TokenTable(torch.zeros(20, 3, dtype=torch.int32), torch.tensor([0] * 10 + [1] * 10))
    allow = torch.tensor([[False, False], [True, False]])  # image queries see only the segment-0 keys
    pattern = BlockSparsePattern.from_rule(
        ElementRule(allow, torch.zeros(2, 2)), q, k, block_q=16, block_kv=16
    )
    dense = pattern.to_dense()[0]
    assert dense.shape == (30, 20) and dense[:, :10].all() and not dense[:, 10:].any()
    assert pattern.partial.any()  # the second key block mixes both segments


def test_block_mask_dense_and_lists():
    block_mask = torch.tensor([[[1, 0, 1], [0, 0, 0]]], dtype=torch.bool)
    pattern = BlockSparsePattern.from_block_mask(block_mask, q_len=20, kv_len=40, block_q=16, block_kv=16)
    count, index = pattern.lists("full")
    assert count.tolist() == [[2, 0]] and index[0, 0].tolist() == [0, 2]
    count_t, index_t = pattern.lists("full_t")
    assert count_t.tolist() == [[1, 0, 1]] and index_t[0, 2, 0] == 0
    assert pattern.computed_elements == 16 * 16 + 16 * 8  # the last key block holds 8 tokens
    assert pattern.element_density == pattern.block_density
    dense = BlockSparsePattern.dense(20, 40, block_q=16, block_kv=16)
    assert dense.block_density == 1.0 and dense.to_dense().all()


def test_head_groups():
    tokens, _ = text_and_image(0, (6, 6))
    a = BlockSparsePattern.from_rule(disc_rule(2.0), tokens, tokens, block_q=16, block_kv=16)
    b = BlockSparsePattern(
        q_len=36, kv_len=36, block_q=16, block_kv=16, full=a.full, partial=torch.zeros_like(a.partial),
        rule=a.rule, q_tokens=a.q_tokens, kv_tokens=a.kv_tokens,
    )  # fmt: skip
    both = BlockSparsePattern.stack([a, b])
    assert both.num_groups == 2 and both.to_dense().shape == (2, 36, 36)
    assert both.computed_elements == a.computed_elements + b.computed_elements


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(block_q=24), r"block_q=24 must be a power of two >= 16"),
        (dict(block_kv=8), r"block_kv=8 must be a power of two >= 16"),
        (dict(q_len=50), r"block maps \(1, 2, 2\) .* must be \(groups, 4, 2\)"),
        (
            dict(full=torch.zeros(1, 2, 2, dtype=torch.bool), partial=torch.ones(1, 2, 2, dtype=torch.bool)),
            r"need an element rule",
        ),
        (dict(partial=torch.ones(1, 2, 2, dtype=torch.bool)), r"cannot be both full and partial"),
    ],
)
def test_pattern_validation(kwargs, message):
    arguments = dict(
        q_len=20, kv_len=20, block_q=16, block_kv=16, full=torch.ones(1, 2, 2, dtype=torch.bool),
        partial=torch.zeros(1, 2, 2, dtype=torch.bool),
    )  # fmt: skip
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        BlockSparsePattern(**arguments)


@pytest.mark.parametrize("case", ["disc2d", "band", "box3d", "cross", "empty_rows"])
def test_pruned_classification_is_exact(case):
    """Block bounds may only rule out pairs that truly hold nothing: the dense mask equals the rule."""
    from kernel_cases import CASES

    pattern = CASES[case]()
    expected = pattern.rule.evaluate(pattern.q_tokens, pattern.kv_tokens)
    assert torch.equal(pattern.to_dense(order="positions")[0], expected)
    counts = block_counts(expected[None], pattern.block_q, pattern.block_kv)[0]
    assert torch.equal(pattern.full[0] | pattern.partial[0], counts > 0)


def test_default_blocks():
    from attnpack.patterns import default_blocks

    assert default_blocks(128) == (128, 64) and default_blocks(80, "cpu") == (128, 64)
    assert default_blocks(256) == (64, 32)
