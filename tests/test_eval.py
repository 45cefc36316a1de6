"""Evaluation: metrics on synthetic images and videos whose values are known, tiny random CLIP / DINO models
saved by the test and loaded by path, a manifest and a batch run with their JSON + HTML reports."""

import json
import math

import numpy as np
import pytest
import torch

from attnpack import eval as ev
from attnpack.cli import main


def texture(height=64, width=80, seed=0):
    """A smooth random texture (optical flow needs structure)."""
    import cv2

    noise = np.random.default_rng(seed).integers(0, 255, (height, width, 3)).astype(np.uint8)
    return cv2.GaussianBlur(noise, (0, 0), 2.0)


def square_video(positions, size=8, height=48, width=64):
    frames = np.zeros((len(positions), height, width, 3), np.uint8)
    for i, (row, col) in enumerate(positions):
        frames[i, row : row + size, col : col + size] = (220, 30, 30)
    return frames


def test_identical_outputs():
    video = np.stack([texture(seed=1)] * 4)
    assert ev.frame_difference(video) == 0 and ev.temporal_flickering(video) == 1
    assert ev.psnr(video, video) == math.inf and ev.psnr(video, video, cap=ev.PSNR_CAP) == 100
    assert ev.ssim(video, video) == pytest.approx(1) and ev.ssim_luma(video, video) == pytest.approx(1)
    assert ev.motion_smoothness(video) == 1
    assert ev.dynamic_degree(video) < 0.01  # optical flow on identical frames: numerically zero


def test_known_differences():
    image = texture()
    brighter = np.clip(image.astype(int) + 1, 0, 255).astype(np.uint8)
    mask = image < 255
    assert ev.psnr(image[mask], brighter[mask]) == pytest.approx(10 * math.log10(255**2), rel=1e-6)  # MSE 1
    noisy = np.clip(image + np.random.default_rng(0).normal(0, 40, image.shape), 0, 255).astype(np.uint8)
    assert 0 < ev.ssim(image, noisy) < 0.9
    step = np.stack([np.zeros((8, 8, 3), np.uint8), np.full((8, 8, 3), 51, np.uint8)])
    assert ev.frame_difference(step) == 51 and ev.temporal_flickering(step) == pytest.approx((255 - 51) / 255)
    with pytest.raises(ValueError, match="differ in shape"):
        ev.psnr(image, image[:10])


def test_a_known_shift_gives_a_known_flow():
    big = texture(80, 120)
    a, b = big[8:72, 8:104], big[8:72, 5:101]  # the content moves 3 px to the right
    flow = ev.optical_flow(a, b)[10:-10, 10:-10]
    assert flow[..., 0].mean() == pytest.approx(3, abs=0.3) and abs(flow[..., 1].mean()) < 0.3
    assert ev.dynamic_degree(np.stack([a, b])) == pytest.approx(3, abs=0.5)


def test_motion_smoothness_prefers_steady_motion():
    """VBench's scale, (255 - interpolation error) / 255: a steady pan interpolates almost exactly; a pan that
    stops every other frame, or unrelated frames, do not."""
    big = texture(80, 200)
    steady = np.stack([big[8:72, 8 + 5 * i : 104 + 5 * i] for i in range(7)])  # 5 px a frame
    stutter = np.stack([big[8:72, 8 + o : 104 + o] for o in (0, 10, 10, 20, 20, 30, 30)])
    jumpy = np.stack([texture(64, 96, seed=i) for i in range(7)])
    assert ev.motion_smoothness(steady) > 0.995  # measured 0.998 (mean error 0.5 of 255)
    assert ev.motion_smoothness(stutter) < 0.97 and ev.motion_smoothness(jumpy) < 0.97  # measured 0.96, 0.96
    with pytest.raises(ValueError, match="at least 3 frames"):
        ev.motion_smoothness(steady[:2])


def test_trajectory_adherence_on_a_known_path():
    positions = [(8, 4 + 8 * i) for i in range(5)]
    video = square_video(positions)
    finder = ev.colour_box_finder((220, 30, 30))
    exact = [((r) / 48, (r + 8) / 48, (c) / 64, (c + 8) / 64) for r, c in positions]
    result = ev.trajectory_adherence(video, exact, finder)
    assert result["centroid_distance"] == pytest.approx(0) and result["miou"] == pytest.approx(1)
    shifted = [(y1, y2, x1 + 4 / 64, x2 + 4 / 64) for y1, y2, x1, x2 in exact]  # half a box to the right
    result = ev.trajectory_adherence(video, shifted, finder)
    assert result["centroid_distance"] == pytest.approx(4 / 64) and result["miou"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="one per frame"):
        ev.trajectory_adherence(video, exact[:2], finder)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from transformers import (
        BitImageProcessor,
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        Dinov2Config,
        Dinov2Model,
    )

    from attnpack.pipelines.tiny import clip_tokenizer

    clip, dino = tmp_path_factory.mktemp("clip"), tmp_path_factory.mktemp("dino")
    tokenizer = clip_tokenizer()
    small = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2)
    # The text model pools the features at the eos token: its id must be the tokenizer's (CLIP's default,
    # 49407, lies outside this 98-token vocabulary, and every prompt would pool the same bos position).
    ids = dict(eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
               pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    config = CLIPConfig(text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=77, **ids, **small),
                        vision_config=dict(image_size=32, patch_size=8, **small), projection_dim=16)  # fmt: skip
    torch.manual_seed(2)  # a random CLIP: with this seed some prompts have a positive cosine to the texture
    CLIPModel(config).save_pretrained(clip)
    square = dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=CLIPImageProcessor(**square), tokenizer=tokenizer).save_pretrained(clip)
    Dinov2Model(Dinov2Config(image_size=32, patch_size=8, **small)).save_pretrained(dino)
    BitImageProcessor(**square).save_pretrained(dino)
    return str(clip), str(dino)


def test_model_metrics_with_tiny_models(tiny_models):
    clip, dino = tiny_models
    image = texture()
    prompts = ("a red fox", "a blue car on a bridge", "x", "two green birds")
    scores = [ev.clip_score([image], prompt, clip) for prompt in prompts]
    assert all(0 <= v <= 100 for v in scores)
    # The text path reaches the score: prompts score differently on one image (some may clamp at 0).
    assert len({round(v, 4) for v in scores}) > 1, scores
    assert ev.reference_similarity(image, image, clip, "clip") == pytest.approx(1, abs=1e-5)
    assert ev.reference_similarity(image, image, dino) == pytest.approx(1, abs=1e-5)
    video = np.stack([image] * 3)
    assert ev.subject_consistency(video, dino) == pytest.approx(1, abs=1e-5)
    sims = ev.subject_similarity(image, [image[0:32, 0:40]], [(0, 0.5, 0, 0.5)], dino)
    assert sims == [pytest.approx(1, abs=1e-5)]  # the crop of its box is its reference


def test_missing_models_name_their_id():
    with pytest.raises(ev.MetricModelUnavailable, match="'no/such-clip' cannot be loaded"):
        ev.clip_score([texture()], "a fox", "no/such-clip")
    with pytest.raises(ev.MetricModelUnavailable, match="LPIPS"):
        ev.lpips(texture(), texture())


def test_manifest_report(tmp_path, tiny_models):
    from PIL import Image

    clip, dino = tiny_models
    image = texture()
    Image.fromarray(image).save(tmp_path / "dense.png")
    Image.fromarray(np.clip(image.astype(int) + 3, 0, 255).astype(np.uint8)).save(tmp_path / "method.png")
    import cv2

    positions = [(8, 4 + 8 * i) for i in range(5)]
    writer = cv2.VideoWriter(str(tmp_path / "ball.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 8, (64, 48))
    for frame in square_video(positions):
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    manifest = [
        {"output": "method.png", "dense": "dense.png", "prompt": "a fox", "method": "clear", "seed": 0},
        {"output": "ball.mp4", "method": "trajectory", "trajectory": [[0, 8 / 48, 16 / 48, 4 / 64, 12 / 64],
                                                                      [4, 8 / 48, 16 / 48, 36 / 64, 44 / 64]],
         "colour": [220, 30, 30]},
    ]  # fmt: skip
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    rows = ev.evaluate_manifest(tmp_path, clip_model=clip, dino_model=dino)
    assert rows[0]["metrics"]["psnr"] > 30 and "clip_score" in rows[0]["metrics"]
    assert rows[1]["metrics"]["trajectory"]["miou"] > 0.6  # MP4 compression blurs the square's edges a little
    written = ev.write_report(rows, tmp_path / "report")
    report = json.loads(written[0].read_text())
    assert set(report["summary"]) == {"clear", "trajectory"}
    page = written[1].read_text()
    assert "<table>" in page and page.count("data:image/png;base64") >= 3  # thumbnails and the plot
    with pytest.raises(FileExistsError):
        ev.write_report(rows, tmp_path / "report")


def test_cli_batch_run(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a large red circle over a plain grey background\na small blue star\n")
    argv = ["eval", "--prompts", str(prompts), "--preset", "toy-image", "--method", "clear", "--param", "radius=3",
            "--seeds", "0", "1", "--out", str(tmp_path / "run")]  # fmt: skip
    assert main(argv) == 0
    assert "scored 4 outputs" in capsys.readouterr().out
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert len(report["outputs"]) == 4 and report["summary"]["clear"]["psnr"] > 0
    assert len(list((tmp_path / "run").glob("*.png"))) == 8  # method and dense per prompt x seed
    assert main(["eval", "--out", str(tmp_path / "x")]) == 2
    assert "give a manifest" in capsys.readouterr().err
