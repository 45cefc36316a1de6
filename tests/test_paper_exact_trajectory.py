"""DiTraj variant="official" against a literal re-implementation of the public code (HaofeiDing/DiTraj
`utils.plan_path`, `run.py`'s box mask, `transformer_wan.py`'s rotary re-index, `pipe.py`'s masks): boxes,
positions and masks equal, a tiny Wan within 1e-5; variant="attnpack" kept and different."""

import itertools

import pytest
import torch
from helpers import max_diff, run_tiny, tiny_pipeline

import attnpack
from attnpack.methods.trajectory import parse_trajectory, r_tokens, remap_index, token_boxes
from attnpack.pipelines import trajectory_video

# ---- the public code, re-implemented literally


def public_plan_path(keyframes, video_length):
    """plan_path for keyframes from frame 0 to the last frame (where the public code runs)."""
    path = [list(keyframes[0][1:])]
    for start, end in itertools.pairwise(keyframes):
        changes = [(end[i] - start[i]) / (end[0] - start[0]) for i in range(1, 5)]
        for j in range(start[0] + 1, end[0] + 1):
            step = j - start[0]
            path.append([step * changes[i] + start[i + 1] for i in range(4)])
    assert len(path) == video_length
    return path


def public_bbox_mask(keyframes, num_frame, bbox_h, bbox_w):
    paths = public_plan_path(keyframes, num_frame)[::4]
    mask = torch.zeros(num_frame // 4 + 1, 1, bbox_h, bbox_w)
    for i, p in enumerate(paths):
        mask[i, :, int(p[0] * bbox_h) : int(p[1] * bbox_h), int(p[2] * bbox_w) : int(p[3] * bbox_w)] = 1
    return mask


def find_corners(matrix):
    top_left, bottom_right = (float("inf"), float("inf")), (-1, -1)
    for i in range(len(matrix)):
        for j in range(len(matrix[0])):
            if matrix[i][j] == 1:
                if i < top_left[0] or (i == top_left[0] and j < top_left[1]):
                    top_left = (i, j)
                if i > bottom_right[0] or (i == bottom_right[0] and j > bottom_right[1]):
                    bottom_right = (i, j)
    return top_left, bottom_right


def scale_complex_tensor(tensor, target_size):
    _, h, w = tensor.shape
    y = torch.linspace(0, h - 1, target_size[0], dtype=torch.float32).round().long()
    x = torch.linspace(0, w - 1, target_size[1], dtype=torch.float32).round().long()
    return tensor[:, y[:, None], x]


def public_fixrope(bbox_mask, with_mask=True):
    """create_fixrope_self_attention_mask's re-indexed (f, h, w) per token, and the mask (True: attend;
    S x S: small grids only)."""
    f, _, h, w = bbox_mask.shape
    i, j, k = torch.meshgrid(torch.arange(f), torch.arange(h), torch.arange(w), indexing="ij")
    rope = torch.stack([i, j, k], dim=-1)
    (f0_h1, f0_w1), (f0_h2, f0_w2) = find_corners(bbox_mask[0].squeeze(0))
    for frame in range(1, f):
        (h1, w1), (h2, w2) = find_corners(bbox_mask[frame].squeeze(0))
        if (h2 - h1) * (w2 - w1) < (f0_h2 - f0_h1) * (f0_w2 - f0_w1):
            f0_h1, f0_w1, f0_h2, f0_w2 = h1, w1, h2, w2
    for frame in range(f):
        (h1, w1), (h2, w2) = find_corners(bbox_mask[frame].squeeze(0))
        tmp = rope[frame].clone()
        if f0_h2 - f0_h1 == h2 - h1 and f0_w2 - f0_w1 == w2 - w1:
            rope[frame, h1:h2, w1:w2] = tmp[f0_h1:f0_h2, f0_w1:f0_w2]
        else:
            scaled = scale_complex_tensor(tmp[f0_h1:f0_h2, f0_w1:f0_w2].permute(2, 0, 1), (h2 - h1, w2 - w1))
            rope[frame, h1:h2, w1:w2] = scaled.permute(1, 2, 0)
    rope = rope.reshape(-1, 3)
    if not with_mask:
        return rope, None
    equality = (rope.unsqueeze(1) == rope.unsqueeze(0)).all(dim=-1) & ~torch.eye(len(rope), dtype=torch.bool)
    overlap, token = equality.any(dim=1), bbox_mask.flatten().bool()
    redundant = overlap & ~(overlap & token)
    result = (redundant.unsqueeze(0) & token.unsqueeze(1)) | (redundant.unsqueeze(1) & token.unsqueeze(0))
    return rope, ~result


def public_cross_mask(bbox_mask, text_mask):
    x = bbox_mask.flatten()
    return ((x == 1)[:, None] & (text_mask == 1)[None, :]) | ((x == 0)[:, None] & (text_mask == 0)[None, :])


CASES = [  # keyframes from frame 0 to the last, the video's frames, the token grid (height, width)
    ([[0, 0.3, 0.7, 0.1, 0.4], [80, 0.3, 0.7, 0.7, 1.0]], 81, (30, 52)),  # run.py's default path, 480p
    ([[0, 0.3, 0.7, 0.1, 0.4], [80, 0.3, 0.7, 0.7, 1.0]], 81, (45, 80)),  # 720p
    ([[0, 0.05, 0.55, 0.05, 0.45], [20, 0.05, 0.55, 0.55, 0.95], [40, 0.45, 0.95, 0.55, 0.95],
      [60, 0.45, 0.95, 0.05, 0.45], [80, 0.05, 0.55, 0.05, 0.45]], 81, (30, 52)),  # run.py's complex path
    ([[0, 0.1, 0.3, 0.1, 0.3], [32, 0.3, 0.9, 0.2, 0.9]], 33, (12, 20)),  # a growing box
    ([[0, 0.2, 0.9, 0.05, 0.7], [16, 0.1, 0.4, 0.5, 0.8]], 17, (8, 8)),  # a shrinking one, the toy grid
]  # fmt: skip


def _grid_positions(grid):
    i, j, k = torch.meshgrid(*(torch.arange(n) for n in grid), indexing="ij")
    return torch.stack([i, j, k], -1).reshape(-1, 3)


@pytest.mark.parametrize("keyframes, num_frame, hw", CASES)
def test_boxes_positions_and_masks_are_the_public_ones(keyframes, num_frame, hw):
    bbox_mask = public_bbox_mask(keyframes, num_frame, *hw)
    grid = (bbox_mask.shape[0], *hw)
    keys = parse_trajectory(keyframes)
    source, foreground = remap_index(grid, token_boxes(keys, grid, 4))  # variant="official", the default
    assert torch.equal(foreground, bbox_mask.flatten().bool())
    small = grid[0] * grid[1] * grid[2] <= 4096
    rope, self_mask = public_fixrope(bbox_mask, with_mask=small)
    assert torch.equal(_grid_positions(grid)[source], rope)
    if not small:
        return
    r = r_tokens(source, foreground)
    assert torch.equal(~((foreground[:, None] & r[None, :]) | (r[:, None] & foreground[None, :])), self_mask)
    # the whole method's patterns
    method = attnpack.TrajectoryRoPE(trajectory=keyframes)
    from attnpack.methods.trajectory import _r_token_pattern, _text_pattern

    pattern = _r_token_pattern(tuple(method.keyframes), 4, "official", grid, 0, False, "cpu")
    assert torch.equal(pattern.to_dense()[0], self_mask)
    text = _text_pattern(tuple(method.keyframes), 4, "official", grid, (7, 5), "cpu")
    assert torch.equal(text.to_dense()[0], public_cross_mask(bbox_mask, torch.tensor([0] * 7 + [1] * 5)))


def test_the_attnpack_variant_is_kept_and_differs_at_720p():
    keyframes, num_frame, hw = CASES[1]
    keys = parse_trajectory(keyframes)
    grid = (num_frame // 4 + 1, *hw)
    official = remap_index(grid, token_boxes(keys, grid, 4))
    ours = remap_index(grid, token_boxes(keys, grid, 4, variant="attnpack"), variant="attnpack")
    moved = (official[0] != ours[0]).sum().item()
    assert moved > 1000  # the issue counts 9,834 tokens with another rotary position
    assert not torch.equal(official[1], ours[1])  # ceil-ended boxes cover more tokens


def test_official_runs_where_the_public_code_fails(caplog):
    """A smallest box one token high (the public re-index has no reference: an IndexError there): the
    smallest box of two tokens or more each way is the reference, thinner boxes keep their positions."""
    keys = parse_trajectory([[0, 0.1, 0.5, 0.0, 0.4], [8, 0.4, 0.9, 0.5, 1.0]])
    grid = (3, 4, 6)
    boxes = token_boxes(keys, grid, 4)
    assert boxes == [(0, 2, 0, 2), (1, 2, 1, 4), (1, 3, 3, 6)]  # frame 1: one row
    with caplog.at_level("INFO", logger="attnpack"):
        source, foreground = remap_index(grid, boxes)
    assert "where the public code fails" in caplog.text
    frame = torch.arange(24)
    assert torch.equal(source[frame + 24], frame + 24)  # frame 1 keeps its own positions
    assert source[0] == 0 and foreground.sum() == 4 + 3 + 6
    # frame 2's 1 x 2 region samples frame 0's 1 x 1 reference: token (2, 1, 3) and (2, 1, 4) take (2, 0, 0)
    assert source[48 + 6 + 3] == source[48 + 6 + 4] == 48
    empty = remap_index((1, 4, 6), [(1, 1, 0, 3)])  # a box covering no token: no foreground
    assert not empty[1].any() and torch.equal(empty[0], torch.arange(24))
    with pytest.raises(ValueError, match=r"variant='paper'.*official, attnpack"):
        attnpack.TrajectoryRoPE(trajectory=keys, variant="paper")


# ---- a tiny Wan against the public processor and rotary re-index

WAN = "tiny-wan-t2v"


class PublicSelfMask:
    """MyWanAttnProcessor2_0 in the fixRope steps: self-attention under the public mask, text plain."""

    def __init__(self, stock, mask):
        self.stock, self.mask = stock, mask

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        mask = self.mask if encoder_hidden_states is None else None
        return self.stock(attn, hidden_states, encoder_hidden_states, mask, rotary_emb)


def test_official_trajectory_on_wan_is_the_public_code():
    keyframes = [[0, 0.1, 0.6, 0.0, 0.45], [8, 0.35, 0.95, 0.5, 1.0]]
    size = dict(height=128, width=192, num_frames=9)  # 3 x 8 x 12 tokens; every step a fixRope step
    pipe = tiny_pipeline(WAN)
    bbox_mask = public_bbox_mask(keyframes, 9, 8, 12)
    rope, self_mask = public_fixrope(bbox_mask)
    grid = (3, 8, 12)
    rows = (rope[:, 0] * grid[1] + rope[:, 1]) * grid[2] + rope[:, 2]  # the token whose position it takes

    def reindex(module, args, output):
        return tuple(t[:, rows] for t in output)

    hook = pipe.transformer.rope.register_forward_hook(reindex)
    original = dict(pipe.transformer.attn_processors)
    pipe.transformer.set_attn_processor({n: PublicSelfMask(p, self_mask) for n, p in original.items()})
    theirs = run_tiny(pipe, WAN, **size)
    pipe.transformer.set_attn_processor(original)
    hook.remove()
    with attnpack.apply(pipe, attnpack.TrajectoryRoPE(trajectory=keyframes, rope_steps=5)):
        ours = run_tiny(pipe, WAN, **size)
    with attnpack.apply(
        pipe, attnpack.TrajectoryRoPE(trajectory=keyframes, rope_steps=5, variant="attnpack")
    ):
        kept = run_tiny(pipe, WAN, **size)
    assert max_diff(ours, theirs) < 1e-5
    assert max_diff(kept, theirs) > 1e-4


def test_frames_per_latent_must_match_the_pipeline():
    pipe = tiny_pipeline(WAN)
    with pytest.raises(ValueError, match=r"frames_per_latent=8 .* accepted: None or 4"):
        trajectory_video(pipe, prompt="a fox", trajectory=[[0, 0, 0.5, 0, 0.5], [8, 0.5, 1, 0.5, 1]],
                         frames_per_latent=8)  # fmt: skip
