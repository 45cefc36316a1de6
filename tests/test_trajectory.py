"""DiTraj trajectory control: trajectories, the RoPE remap against the model's own frequency tables, the
R-token and text masks, tiny Wan / CogVideoX / HunyuanVideo pipelines, an empty trajectory = stock."""

import pytest
import torch
from helpers import max_diff, record_calls, run_tiny, tiny_pipeline

import attnpack
from attnpack.methods import base as method_base
from attnpack.methods.trajectory import (
    box_at,
    parse_trajectory,
    points_to_trajectory,
    r_tokens,
    remap_index,
    token_boxes,
    trajectory_picture,
)
from attnpack.pipelines import parse_split, split_prompt, tiny_call_kwargs, trajectory_video

PATH = [[0, 0.1, 0.5, 0.0, 0.4], [8, 0.4, 0.9, 0.5, 1.0]]
VIDEO_DITS = ["tiny-wan-t2v", "tiny-cogvideox", "tiny-hunyuanvideo"]


# ---- trajectories


def test_keyframes_are_interpolated_and_held():
    keys = parse_trajectory([[0, 0.0, 0.2, 0.0, 0.2], [10, 0.5, 0.7, 0.6, 0.8]])
    assert box_at(keys, 5) == pytest.approx((0.25, 0.45, 0.3, 0.5))
    assert box_at(keys, 20) == (0.5, 0.7, 0.6, 0.8) and box_at(keys, 0) == (0.0, 0.2, 0.0, 0.2)
    # latent frame f is video frame 4 f: at frame 4, rows 0.2-0.4 and columns 0.24-0.44 of 10 tokens
    assert token_boxes(keys, (3, 10, 10), 4, variant="attnpack") == [(0, 2, 0, 2), (2, 4, 2, 5), (4, 6, 4, 7)]
    # the public code's int() of every edge (tests/test_paper_exact_trajectory.py holds it to run.py)
    assert token_boxes(keys, (3, 10, 10), 4) == [(0, 2, 0, 2), (2, 4, 2, 4), (4, 6, 4, 6)]


@pytest.mark.parametrize(
    "trajectory, message",
    [
        ([[0, 0.1, 0.5, 0.0, 0.4]], "at least two keyframes"),
        ([[0, 0.1, 0.5, 0.0, 0.4], [0, 0.1, 0.5, 0.0, 0.4]], "keyframe 1: frame 0 must come after frame 0"),
        ([[0, 0.1, 0.5, 0.0, 0.4], [4, 0.1, 1.5, 0.0, 0.4]], r"keyframe 1: box .* inside \[0, 1\]"),
        ([[0, 0.5, 0.5, 0.0, 0.4], [4, 0.1, 0.5, 0.0, 0.4]], "keyframe 0: box .* is empty"),
        ([[-1, 0.1, 0.5, 0.0, 0.4], [4, 0.1, 0.5, 0.0, 0.4]], "keyframe 0: frame -1"),
        ([[0, 0.1, 0.5, 0.0], [4, 0.1, 0.5, 0.0, 0.4]], r"keyframe 0: .* must be \[frame, y1, y2, x1, x2\]"),
    ],
)
def test_bad_trajectories_name_the_keyframe(trajectory, message):
    with pytest.raises(ValueError, match=message):
        attnpack.TrajectoryRoPE(trajectory=trajectory)


def test_point_tracks_become_boxes():
    keys = points_to_trajectory([[{"x": 0.5, "y": 0.5}, {"x": 0.95, "y": 0.02}]], (0.2, 0.4))
    assert keys[0] == pytest.approx((0, 0.4, 0.6, 0.3, 0.7))
    assert keys[1] == pytest.approx((1, 0.0, 0.2, 0.6, 1.0))  # held inside the frame
    pixels = points_to_trajectory(
        [[{"x": 320, "y": 240}, {"x": 0, "y": 0}]], (0.2, 0.2), width=640, height=480
    )
    assert pixels[0] == pytest.approx((0, 0.4, 0.6, 0.4, 0.6))
    with pytest.raises(ValueError, match="point 1"):
        points_to_trajectory([[{"x": 0.5, "y": 0.5}, {"x": 0.2}]])
    method = attnpack.TrajectoryRoPE(points=[[{"x": 0.5, "y": 0.5}, {"x": 0.6, "y": 0.5}]])
    assert len(method.keyframes) == 2


# ---- STD-RoPE against the model's own tables


def test_rope_remap_matches_the_wan_frequency_tables():
    pipe = tiny_pipeline("tiny-wan-t2v")
    rope = pipe.transformer.rope
    latents = torch.zeros(1, 16, 3, 8, 12)  # patch (1, 2, 2): a 3 x 4 x 6 token grid
    grid = (3, 4, 6)
    cos, sin = rope(latents)
    method = attnpack.TrajectoryRoPE(
        trajectory=[[0, 0.0, 0.5, 0.0, 0.5], [8, 0.25, 1.0, 0.5, 1.0]], variant="attnpack"
    )  # the whole box re-indexed; the official variant's positions: tests/test_paper_exact_trajectory.py
    new_cos, new_sin = method.remap((cos, sin), grid)
    boxes = token_boxes(method.keyframes, grid, 4, variant="attnpack")
    smallest = min(boxes, key=lambda b: (b[1] - b[0]) * (b[3] - b[2]))
    t_dim, h_dim, w_dim = rope.t_dim, rope.h_dim, rope.w_dim
    tables = [t.split([t_dim, h_dim, w_dim], dim=1) for t in (rope.freqs_cos, rope.freqs_sin)]

    def row(table, f, h, w):  # the model's own table at (f, h, w)
        return torch.cat([table[0][f], table[1][h], table[2][w]])

    for f, (h1, h2, w1, w2) in enumerate(boxes):
        for h in range(grid[1]):
            for w in range(grid[2]):
                token = (f * grid[1] + h) * grid[2] + w
                inside = h1 <= h < h2 and w1 <= w < w2
                if inside:  # nearest sample of the smallest box, the frame's own time
                    hh = round(smallest[0] + (h - h1) * (smallest[1] - 1 - smallest[0]) / max(h2 - h1 - 1, 1))
                    ww = round(smallest[2] + (w - w1) * (smallest[3] - 1 - smallest[2]) / max(w2 - w1 - 1, 1))
                else:
                    hh, ww = h, w
                for new, table in ((new_cos, tables[0]), (new_sin, tables[1])):
                    assert torch.allclose(new[0, token, 0], row(table, f, hh, ww), atol=1e-6), (f, h, w)


def test_r_tokens_match_the_position_equality_definition():
    grid = (2, 5, 5)
    boxes = [(0, 2, 0, 2), (2, 5, 2, 5)]  # frame 0 is the smallest; frame 1 samples it
    source, foreground = remap_index(grid, boxes)
    positions = torch.stack(torch.meshgrid(*(torch.arange(n) for n in grid), indexing="ij"), -1).reshape(
        -1, 3
    )
    remapped = positions[source]
    same = (remapped[:, None] == positions[None, :]).all(-1)  # a foreground token takes a token's place
    expected = same[foreground].any(0) & ~foreground
    assert torch.equal(r_tokens(source, foreground), expected)
    assert r_tokens(source, foreground).sum() > 0


def test_r_token_mask_in_the_kernel(monkeypatch):
    seen = record_calls(
        monkeypatch, method_base, "block_sparse_attention", lambda q, k, v, pattern, **_: pattern
    )
    pipe = tiny_pipeline("tiny-wan-t2v")
    method = attnpack.TrajectoryRoPE(trajectory=PATH)
    with attnpack.apply(pipe, method):
        run_tiny(pipe, "tiny-wan-t2v", num_inference_steps=1)
    grid = attnpack.attach(pipe).grid
    source, foreground = method.layout(grid)
    r = r_tokens(source, foreground)
    expected = ~((foreground[:, None] & r[None, :]) | (r[:, None] & foreground[None, :]))
    assert seen and torch.equal(seen[0].to_dense()[0].cpu(), expected)


# ---- pipelines


@pytest.mark.parametrize("name", VIDEO_DITS)
def test_tiny_video_dits(name):
    pipe = tiny_pipeline(name)
    stock = run_tiny(pipe, name)
    with attnpack.apply(pipe, attnpack.TrajectoryRoPE(trajectory=[])):
        assert max_diff(run_tiny(pipe, name), stock) == 0  # no foreground: the stock output
    # attnpack's boxes: at these 2 x 3 token grids the official boxes minus their last row and column are
    # empty, so the public re-index moves nothing there
    with attnpack.apply(pipe, attnpack.TrajectoryRoPE(trajectory=PATH, variant="attnpack")):
        out = run_tiny(pipe, name)
    assert torch.isfinite(out).all() and max_diff(out, stock) > 0
    assert max_diff(run_tiny(pipe, name), stock) == 0  # hooks gone after remove
    with attnpack.apply(pipe, attnpack.TrajectoryRoPE(trajectory=PATH, rope_steps=0)):
        assert max_diff(run_tiny(pipe, name), stock) == 0  # no RoPE steps, no text split: stock


def test_wan_foreground_and_background_text(monkeypatch):
    seen = record_calls(
        monkeypatch,
        method_base,  # where the methods' one kernel call is (run_sparse)
        "block_sparse_attention",
        lambda q, k, *_, **__: (q.shape[1], k.shape[1]),
    )
    pipe = tiny_pipeline("tiny-wan-t2v")
    kwargs = tiny_call_kwargs("tiny-wan-t2v") | {"output_type": "pt"}
    out = trajectory_video(
        pipe,
        trajectory=PATH,
        fg_prompt="a red ball",
        bg_prompt="a green lawn",
        rope_steps=1,
        mask_steps=1,
        **kwargs,
    )
    text = kwargs["max_sequence_length"]
    assert any(keys == 2 * text for _, keys in seen), "the separated text never ran"
    assert torch.isfinite(out.frames).all() and out.plan.width == 8 * 256
    assert getattr(pipe, attnpack.api.STATE_ATTR, None) is None
    with pytest.raises(ValueError, match="run on Wan"):
        trajectory_video(
            tiny_pipeline("tiny-cogvideox"), trajectory=PATH, fg_prompt="a", bg_prompt="b",
            **tiny_call_kwargs("tiny-cogvideox"),
        )  # fmt: skip


def test_prompt_splitting():
    assert parse_split('Sure: {"foreground": "a red ball", "background": "a lawn"}') == (
        "a red ball",
        "a lawn",
    )
    with pytest.raises(ValueError, match="did not answer"):
        parse_split("a red ball on a lawn")
    with pytest.raises(ValueError, match="'no/such-model' cannot be loaded"):
        split_prompt("a red ball rolls over a lawn", "no/such-model")
    pipe = tiny_pipeline("tiny-wan-t2v")
    calls = []

    def splitter(prompt):
        calls.append(prompt)
        return "a red ball", "a lawn"

    trajectory_video(
        pipe, trajectory=PATH, prompt="a red ball rolls over a lawn", splitter=splitter,
        **(tiny_call_kwargs("tiny-wan-t2v") | {"num_inference_steps": 1, "output_type": "pt"}),
    )  # fmt: skip
    assert calls == ["a red ball rolls over a lawn"]


def test_plan_picture():
    picture = trajectory_picture(PATH, 9, size=(64, 36), columns=3)
    assert picture.size == (192, 50)
    pixels = picture.load()
    assert pixels[0 + 1, int(0.1 * 36) + 1][1] > 150  # the green box edge of frame 0


@pytest.mark.gpu
def test_gpu_tiny_wan_in_half_precision():
    pipe = tiny_pipeline("tiny-wan-t2v").to("cuda", torch.bfloat16)
    with attnpack.apply(pipe, attnpack.TrajectoryRoPE(trajectory=PATH)):
        out = run_tiny(pipe, "tiny-wan-t2v")
    assert torch.isfinite(out).all()
