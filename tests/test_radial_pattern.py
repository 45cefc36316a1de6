"""attnpack.patterns.radial: the public code's pattern, reproduced, and its spatial variant."""

import itertools
import math

import pytest
import torch
from kernel_cases import assert_triton_matches_reference

from attnpack.patterns import radial
from attnpack.patterns.block_sparse import block_counts
from attnpack.patterns.radial import frame_budget


def public_window(distance, per_frame, decay, block):
    """The public code's band half-width for a frame pair (`get_window_width`, Wan): full up to distance 1,
    then 2^bits(tokens) / 2^bits(distance) x decay, at least a block."""
    if distance <= 1:
        return per_frame
    return max(2 ** per_frame.bit_length() / 2 ** distance.bit_length() * decay, block)


def public_kept(distance, per_frame):
    """The public code's skip rule (`get_diagonal_split_mask`): its threshold is 128 whatever the block.
    It runs at every distance there, so frames under 128 tokens would lose their neighbours too; attnpack
    keeps distances 0 and 1 whole (what the window rule gives them), which real geometries never reach."""
    length = 2 ** per_frame.bit_length() / 2 ** distance.bit_length()
    return distance <= 1 or length >= 128 or distance % int(128 / length) == 0


def brute_force_official(frames, shape, decay, sink, text, text_first, block):
    """The public code's reduction, the slow way: every frame pair's token mask, cut into blocks."""
    per_frame = shape[0] * shape[1]
    video_start = text if text_first else 0
    length = frames * per_frame + text
    count = -(-length // block)
    out = torch.zeros(count, count, dtype=torch.bool)
    index = torch.arange(per_frame)
    span = -(-per_frame // block)
    for i in range(frames):
        for j in range(frames):
            if sink and j == 0:
                local = torch.ones(per_frame, per_frame, dtype=torch.bool)
            else:
                width = public_window(abs(i - j), per_frame, decay, block)
                local = ((index[None, :] - index[:, None]).abs() <= width) & public_kept(
                    abs(i - j), per_frame
                )
            row, col = video_start + i * per_frame, video_start + j * per_frame
            padded = torch.zeros(row % block + span * block, col % block + span * block, dtype=torch.bool)
            padded[row % block : row % block + per_frame, col % block : col % block + per_frame] = local
            tiles = padded[: span * block, : span * block].view(span, block, span, block)
            density = tiles.sum(1).float() / block  # per row block, column block, column
            keep = (density > 1 / 3).sum(-1) / ((density > 0).sum(-1) + 1e-9) > 0.6
            r, c = row // block, col // block
            rows, cols = min(span, count - r), min(span, count - c)
            out[r : r + rows, c : c + cols] |= keep[:rows, :cols]
    if text:
        start = 0 if text_first else length - text
        blocks = slice(start // block, -(-(start + text) // block))
        out[blocks] = True
        out[:, blocks] = True
    return out


def test_published_density():
    """Wan at 768 x 1280, 69 frames: 18 latent frames of 48 x 80 tokens, decay 0.2 keeps 28.7% of blocks."""
    pattern = radial(18, (48, 80), decay_factor=0.2, sink=True)
    assert pattern.q_len == 18 * 3840
    assert pattern.block_density == pytest.approx(0.287, abs=0.0005)


def test_wan22_blocks_as_its_public_processor():
    """Wan 2.2 at 768 x 1280, 77 frames (20 latent frames of 48 x 80), decay 0.8: its processor's 64-token
    blocks keep 34.91% of the blocks, 128-token ones 35.25%; the preset runs 64."""
    from attnpack import RadialAttention

    settings = RadialAttention.preset("wan2.2")
    assert settings.block_size == 64
    for block, density in ((64, 0.3491), (128, 0.3525)):
        pattern = radial(20, (48, 80), decay_factor=settings.decay_factor, sink=True, block_size=block,
                         blocks=(block, block))  # fmt: skip
        assert pattern.block_density == pytest.approx(density, abs=5e-5)


@pytest.mark.parametrize(
    ("frames", "shape", "decay", "sink", "text", "text_first", "block"),
    [
        (6, (10, 30), 0.5, True, 0, False, 128),  # frames straddle blocks
        (7, (13, 17), 1.0, False, 70, False, 64),  # text last, like HunyuanVideo
        (9, (8, 16), 0.3, True, 33, True, 32),  # text first, like CogVideoX
        (12, (5, 9), 2.0, False, 0, False, 16),  # far pairs skipped by the split rule
        (8, (16, 16), 0.5, True, 0, False, 64),  # Wan 2.2's 64-token blocks: the skip rule still says 128
    ],
)
def test_official_matches_the_token_level_reduction(frames, shape, decay, sink, text, text_first, block):
    pattern = radial(
        frames, shape, decay_factor=decay, sink=sink, text_tokens=text, text_first=text_first, block_size=block,
        blocks=(block, block),
    )  # fmt: skip
    assert torch.equal(
        pattern.full[0], brute_force_official(frames, shape, decay, sink, text, text_first, block)
    )


def test_symmetric_without_sink_and_sink_column_with_it():
    without = radial(12, (16, 24), decay_factor=0.5, sink=False, block_size=64, blocks=(64, 64)).full[0]
    assert torch.equal(without, without.T)
    with_sink = radial(12, (16, 24), decay_factor=0.5, sink=True, block_size=64, blocks=(64, 64)).full[0]
    first_frame_blocks = -(-16 * 24 // 64)
    assert with_sink[:, : first_frame_blocks - 1].all()  # every query block sees the first frame
    assert not torch.equal(with_sink, with_sink.T)


def test_text_rows_and_columns_are_dense():
    last = radial(6, (8, 16), decay_factor=0.1, text_tokens=40, block_size=32, blocks=(32, 32))
    dense = last.to_dense()[0]
    assert dense[-40:].all() and dense[:, -40:].all()
    first = radial(
        6, (8, 16), decay_factor=0.1, text_tokens=40, text_first=True, block_size=32, blocks=(32, 32)
    )
    dense = first.to_dense()[0]
    assert dense[:40].all() and dense[:, :40].all()


def test_kept_blocks_grow_like_n_log_n():
    frames = (16, 32, 64, 128)
    kept = [radial(f, (16, 32), decay_factor=0.2, block_size=64, blocks=(64, 64)).num_blocks for f in frames]
    per_n_log_n = [n / (f * math.log2(f)) for n, f in zip(kept, frames, strict=True)]
    for small, large in itertools.pairwise(per_n_log_n):
        assert large / small < 1.3  # dense attention: 1.6 to 1.7 per doubling at these sizes


def test_kernel_blocks_split_the_paper_blocks():
    coarse = radial(8, (8, 12), decay_factor=0.3, sink=True, block_size=32, blocks=(32, 32))
    fine = radial(8, (8, 12), decay_factor=0.3, sink=True, block_size=32, blocks=(32, 16))
    assert torch.equal(coarse.to_dense(), fine.to_dense())


def test_spatial_windows_are_tile_discs_of_the_band_budget():
    frames, per_frame, decay = 6, 128, 0.4
    pattern = radial(frames, (8, 16), decay_factor=decay, variant="spatial", block_size=16, blocks=(16, 16))
    dense = pattern.to_dense()[0].view(
        frames, per_frame, frames, per_frame
    )  # query frame, token, key frame, token
    assert dense[:, :, 0].all()  # the sink: every query sees the whole first frame
    assert dense[2, :, 1].all() and dense[2, :, 3].all()  # neighbouring frames: full
    # frames 2 apart: the 4 x 4 tiles (16-token blocks) whose centres lie in a disc with the band's area
    # around the centre of the query's tile; the query at (3, 7) is in the tile centred at (1.5, 5.5)
    radius_squared = (2 * math.floor(frame_budget(per_frame, 2, decay, 16)) + 1) / math.pi
    ys, xs = torch.meshgrid(torch.arange(8), torch.arange(16), indexing="ij")
    centre_y, centre_x = ys // 4 * 4 + 1.5, xs // 4 * 4 + 1.5
    expected = ((centre_y - 1.5) ** 2 + (centre_x - 5.5) ** 2).flatten() < radius_squared
    assert torch.equal(dense[2, 3 * 16 + 7, 4], expected)
    assert 0 < int(expected.sum()) < per_frame
    assert pattern.block_density == pattern.element_density  # whole tiles: nothing computed is masked


def test_spatial_blocks_are_classified_exactly_where_tiles_do_not_fit():
    """Frames of 6 x 10 tokens in 4 x 4 tiles, with text: blocks straddle tiles, frames and the text."""
    pattern = radial(
        5, (6, 10), decay_factor=0.3, text_tokens=7, variant="spatial", block_size=16, blocks=(16, 16)
    )
    counts = block_counts(pattern.to_dense(order="positions"), 16, 16)[0]
    area = torch.full_like(counts, 256)
    area[-1, :] = area[:, -1] = 16 * ((5 * 60 + 7) % 16)
    area[-1, -1] = ((5 * 60 + 7) % 16) ** 2
    assert torch.equal(pattern.full[0], counts == area)
    assert torch.equal(pattern.partial[0], (counts > 0) & (counts < area))
    assert pattern.allowed_elements == int(counts.sum())
    assert pattern.block_density / pattern.element_density < 1.6


@pytest.mark.parametrize("variant", ["official", "spatial"])
def test_kernel_on_radial_patterns(variant):
    pattern = radial(
        5, (6, 8), decay_factor=0.3, text_tokens=10, variant=variant, block_size=16, blocks=(16, 16)
    )
    assert_triton_matches_reference(pattern)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(num_frames=0), r"num_frames=0 must be an integer >= 1"),
        (dict(frame_shape=(4,)), r"frame_shape=\(4,\) must be \(H, W\)"),
        (dict(decay_factor=0), r"decay_factor=0 must be a number > 0"),
        (dict(text_tokens=-1), r"text_tokens=-1 must be an integer >= 0"),
        (dict(variant="log"), r"variant='log' is not one of 'official', 'spatial'"),
        (dict(block_size=100), r"block_size=100 must be a power of two >= 16"),
        (dict(blocks=(64, 64), block_size=32), r"blocks=\(64, 64\) must divide block_size=32"),
    ],
)
def test_bad_arguments(kwargs, message):
    arguments = dict(num_frames=4, frame_shape=(4, 4), decay_factor=0.5) | kwargs
    with pytest.raises(ValueError, match=message):
        radial(arguments.pop("num_frames"), arguments.pop("frame_shape"), **arguments)
