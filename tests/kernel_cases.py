"""Small block-sparse problems that cover the kernel's paths: every metric, orders, odd lengths, S_q != S_kv,
rows with no allowed key, block-level patterns and head groups."""

import torch

from attnpack.patterns import (
    BlockSparsePattern,
    ElementRule,
    Metric,
    TokenTable,
    concat_orders,
    grid_coordinates,
    identity_order,
    tile_order,
)


def _text_then_grid(text: int, grid: tuple, tile_shape: tuple):
    n = int(torch.tensor(grid).prod())
    order = concat_orders(identity_order(text), tile_order(grid, tile_shape, offset=text))
    coords = torch.cat([torch.zeros(text, 3, dtype=torch.int32), grid_coordinates(grid)])
    segments = torch.cat([torch.zeros(text, dtype=torch.int32), torch.ones(n, dtype=torch.int32)])
    return TokenTable(coords[order], segments[order]), order


TEXT_AND_SPATIAL = (
    torch.tensor([[True, True], [True, False]]),
    torch.tensor([[False, False], [False, True]]),
)


def disc2d(block_q=16, block_kv=16):
    """5 text tokens + a 6 x 9 image tiled 4 x 4; image tokens see a disc of radius 2.5."""
    tokens, order = _text_then_grid(5, (6, 9), (4, 4))
    rule = ElementRule(*TEXT_AND_SPATIAL, Metric.EUCLIDEAN, torch.tensor([2.5**2]))
    return BlockSparsePattern.from_rule(
        rule, tokens, tokens, block_q=block_q, block_kv=block_kv, q_order=order, kv_order=order
    )


def band():
    """3 text tokens + 42 tokens in a band of half-width 7 on their raster index."""
    coords = torch.zeros(45, 3, dtype=torch.int32)
    coords[3:, 2] = torch.arange(42)
    segments = torch.tensor([0] * 3 + [1] * 42)
    rule = ElementRule(*TEXT_AND_SPATIAL, Metric.BAND, torch.tensor([7.5]))
    tokens = TokenTable(coords, segments)
    return BlockSparsePattern.from_rule(rule, tokens, tokens, block_q=16, block_kv=32)


def box3d():
    """A 3 x 4 x 6 video tiled 1 x 4 x 4; a box window that narrows with frame distance and stops at 2."""
    tokens, order = _text_then_grid(0, (3, 4, 6), (1, 4, 4))
    rule = ElementRule(*TEXT_AND_SPATIAL, Metric.BOX, torch.tensor([2.5, 1.5, -1.0]))
    return BlockSparsePattern.from_rule(
        rule, tokens, tokens, block_q=32, block_kv=16, q_order=order, kv_order=order
    )


def cross():
    """37 queries, 50 keys: segment visibility only (no metric), like masked cross-attention."""
    g = torch.Generator().manual_seed(1)
    q = TokenTable(torch.zeros(37, 3, dtype=torch.int32), torch.randint(0, 3, (37,), generator=g))
    k = TokenTable(torch.zeros(50, 3, dtype=torch.int32), torch.randint(0, 3, (50,), generator=g))
    allow = torch.tensor([[True, False, True], [False, True, True], [True, True, False]])
    return BlockSparsePattern.from_rule(ElementRule(allow, torch.zeros(3, 3)), q, k, block_q=16, block_kv=16)


def empty_rows():
    """Segment 2 sees nothing at all: its outputs are zero and its LSE -inf."""
    tokens, order = _text_then_grid(4, (5, 7), (2, 4))
    segments = tokens.segments.clone()
    segments[::5] = 2
    allow = torch.tensor([[True, True, False], [True, False, False], [False, False, False]])
    spatial = torch.tensor([[False, False, False], [False, True, False], [False, False, False]])
    rule = ElementRule(allow, spatial, Metric.EUCLIDEAN, torch.tensor([4.0]))
    tokens = TokenTable(tokens.coords, segments)
    return BlockSparsePattern.from_rule(
        rule, tokens, tokens, block_q=16, block_kv=16, q_order=order, kv_order=order
    )


def blocks_only():
    """No element rule: a block map over 40 queries x 70 keys."""
    g = torch.Generator().manual_seed(2)
    block_mask = torch.rand(1, 3, 5, generator=g) > 0.4
    block_mask[0, :, 0] = True
    return BlockSparsePattern.from_block_mask(block_mask, q_len=40, kv_len=70, block_q=16, block_kv=16)


def head_groups():
    """Two head groups: the disc, and the disc's blocks taken whole."""
    disc = disc2d()
    whole = BlockSparsePattern(
        q_len=disc.q_len, kv_len=disc.kv_len, block_q=16, block_kv=16, full=disc.full | disc.partial,
        partial=torch.zeros_like(disc.partial), rule=disc.rule, q_tokens=disc.q_tokens, kv_tokens=disc.kv_tokens,
        q_order=disc.q_order, kv_order=disc.kv_order,
    )  # fmt: skip
    return BlockSparsePattern.stack([disc, whole])


CASES = {f.__name__: f for f in (disc2d, band, box3d, cross, empty_rows, blocks_only, head_groups)}


def inputs(pattern, heads=2, head_dim=64, dtype=torch.float32, batch=1, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)

    def make(length):
        return torch.randn(batch, length, heads, head_dim, generator=g).to(device=device, dtype=dtype)

    q, k, v = make(pattern.q_len), make(pattern.kv_len), make(pattern.kv_len)
    return [x.requires_grad_() for x in (q, k, v)]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def assert_triton_matches_reference(pattern, tolerance: float = 1e-5, **options):
    """Output and q / k / v gradients of the Triton kernel against the reference, on random inputs."""
    from attnpack.kernels import block_sparse_attention

    q, k, v = inputs(pattern, batch=options.get("key_padding", torch.empty(1, 0)).shape[0])
    grad = torch.randn_like(q)
    results = []
    for backend in ("triton", "reference"):
        out = block_sparse_attention(q, k, v, pattern, backend=backend, **options)
        out.backward(grad)
        results.append([out.detach(), *(x.grad.clone() for x in (q, k, v))])
        for x in (q, k, v):
            x.grad = None
    for name, got, expected in zip(("out", "dq", "dk", "dv"), *results, strict=True):
        assert relative_error(got, expected) < tolerance, name
    return results[0]
