"""The toy models' pieces: the caption grammar, the word tokenizer, the shape detector on the world's own
pictures, and training (resumable to the same weights, refusing to overwrite, the CLI)."""

import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d
from safetensors.torch import load_file

from attnpack.cli import main
from attnpack.eval.shapes import (
    background_colour,
    detect_objects,
    mean_scores,
    object_finder,
    scene_adherence,
)
from attnpack.eval.toy import video_adherence
from attnpack.training.toy import (
    RECIPES,
    WorkFolder,
    init_per_frame,
    init_posterior_logvar,
    train_toy,
    vae_batch,
)
from attnpack.training.toy_models import (
    SPECIAL_TOKENS,
    build_toy_video,
    load_toy,
    word_tokenizer,
)
from attnpack.training.world import VOCABULARY, Scene, Thing, caption, parse_caption, sample


def test_captions_parse_back_to_what_was_drawn():
    for seed in range(60):
        s = sample(seed, size=32, frames=4)
        scene = parse_caption(s.caption)
        assert scene == Scene(tuple(s.things), s.background, s.textured)
        still = parse_caption(caption(s.things, s.background, s.textured, video=False))
        assert [t.path for t in still.things] == [None] * len(s.things)
    loose = parse_caption("A Red circle, and a blue star!")
    assert loose == Scene((Thing("circle", "red", None), Thing("star", "blue", None)), None, None)
    with pytest.raises(ValueError, match="'a red fox'"):
        parse_caption("a red fox over a plain grey background")
    with pytest.raises(ValueError, match="'a plain pink background'"):
        parse_caption("a red circle over a plain pink background")


def test_word_tokenizer_reads_the_world_vocabulary():
    t5, clip = word_tokenizer("$A </s>"), word_tokenizer("<s> $A </s>")
    ids = t5("A red circle, over a FOX").input_ids
    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *VOCABULARY))}
    assert ids == [
        vocab["a"],
        vocab["red"],
        vocab["circle"],
        vocab["over"],
        vocab["a"],
        vocab["<unk>"],
        vocab["</s>"],
    ]
    assert clip("a star").input_ids == [vocab["<s>"], vocab["a"], vocab["star"], vocab["</s>"]]
    padded = t5("a star", padding="max_length", max_length=8).input_ids
    assert padded[3:] == [vocab["<pad>"]] * 5 and vocab["<pad>"] == 0 and vocab["</s>"] == 1


def test_the_detector_reads_the_world_pictures():
    scores, boxes_checked = [], 0
    for seed in range(120):
        s = sample(seed, size=64, frames=1)
        scores.append(scene_adherence(s.frames[0], s.caption))
        assert background_colour(s.frames[0]) == s.background
        if len(s.things) == 1:
            (found,) = [d for d in detect_objects(s.frames[0]) if d.colour == s.things[0].colour]
            assert np.allclose(found.box, s.boxes[0][0], atol=1.01 / 64)
            boxes_checked += 1
    mean = mean_scores(scores)
    assert mean["colour"] > 0.99 and mean["shape"] > 0.95 and mean["background"] == 1.0, mean
    assert boxes_checked > 20
    blank = np.full((64, 64, 3), 128, np.uint8)
    assert detect_objects(blank) == [] and scene_adherence(blank, "a red circle")["exact"] == 0.0


def test_world_videos_move_the_way_their_captions_say():
    for seed in range(12):
        s = sample(seed, size=64, frames=17)
        scores = video_adherence(s.frames, s.caption)
        assert scores["motion"] >= 0.5, (s.caption, scores)  # one of two objects may hide behind the other
    s = sample(3, size=64, frames=17, max_things=1)
    find = object_finder(s.things[0].colour, s.things[0].shape)
    assert find(s.frames[0]) is not None
    still = np.repeat(s.frames[:1], 17, axis=0)
    if s.things[0].path is not None:
        assert video_adherence(still, s.caption)["motion"] == 0.0


def _tiny_recipe(**overrides):
    settings = dict(samples=12, vae_steps=2, vae_batch=2, steps=4, batch=2, checkpoint_every=2, log_every=1,
                    warmup=2)  # fmt: skip
    return RECIPES["image"].with_overrides(**{**settings, **overrides})


@pytest.mark.slow
def test_training_resumes_to_the_same_weights(tmp_path):
    whole = train_toy("image", tmp_path / "whole", work_dir=tmp_path / "w1", recipe=_tiny_recipe(),
                      check_prompts=1)  # fmt: skip
    train_toy(
        "image", tmp_path / "half", work_dir=tmp_path / "w2", recipe=_tiny_recipe(steps=2), check_prompts=1
    )
    resumed = train_toy("image", tmp_path / "resumed", work_dir=tmp_path / "w2", recipe=_tiny_recipe(),
                        check_prompts=1)  # fmt: skip
    for part in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        (a,) = (tmp_path / "whole" / part).glob("*.safetensors")
        (b,) = (tmp_path / "resumed" / part).glob("*.safetensors")
        first, second = load_file(a), load_file(b)
        assert all(torch.equal(first[k], second[k]) for k in first), part
    assert [e["step"] for e in resumed.log if e["stage"] == "denoiser"] == [1, 2, 3, 4]
    assert [e["loss"] for e in resumed.log] == pytest.approx([e["loss"] for e in whole.log])

    folder = tmp_path / "whole"
    for name in ("README.md", "recipe.json", "training-log.jsonl", "metrics.json", "model_index.json"):
        assert (folder / name).is_file(), name
    assert json.loads((folder / "recipe.json").read_text())["steps"] == 4
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["count"] == 1 and set(metrics["adherence"]) >= {"colour", "shape", "exact"}
    pipe = load_toy("image", folder)
    assert type(pipe).__name__ == "FluxPipeline" and pipe.vae.config.shift_factor != 0.0
    image = pipe("a red circle", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (64, 64, 3)  # the trained size without asking: not FluxPipeline's 512

    with pytest.raises(FileExistsError, match="--overwrite"):
        train_toy("image", folder, work_dir=tmp_path / "w1", recipe=_tiny_recipe(), check_prompts=1)
    with pytest.raises(ValueError, match="another recipe"):
        WorkFolder(tmp_path / "w1", _tiny_recipe(samples=13), restart=False)


def test_recipes_refuse_bad_settings():
    with pytest.raises(ValueError, match=r"caption_dropout=1\.5"):
        RECIPES["image"].with_overrides(caption_dropout=1.5)
    with pytest.raises(ValueError, match="vae_clip_frames=8"):
        RECIPES["video"].with_overrides(vae_clip_frames=8)
    with pytest.raises(ValueError, match=r"unknown recipe settings \['lr'\]"):
        RECIPES["video"].with_overrides(lr=1.0)
    with pytest.raises(ValueError, match="vae_long_frames=32"):
        RECIPES["video"].with_overrides(vae_long_frames=32)
    with pytest.raises(ValueError, match=r"vae_long_share=1\.5 must be in \[0, 1\]"):
        RECIPES["video"].with_overrides(vae_long_share=1.5)


def test_the_video_vae_goes_from_single_frames_to_whole_long_videos():
    recipe = RECIPES["video"].with_overrides(vae_steps=10, vae_image_share=0.3, vae_long_share=0.2)
    shapes = [tuple(vae_batch(recipe, step).shape) for step in range(10)]
    assert shapes == [(30, 3, 1, 64, 64)] * 3 + [(6, 3, 5, 64, 64)] * 5 + [(1, 3, 33, 64, 64)] * 2
    assert vae_batch(recipe, 8).equal(vae_batch(recipe, 8))  # drawn from the seed and step: resumes agree
    with pytest.raises(ValueError, match=r"vae_image_share \+ vae_long_share = 1\.1 must be <= 1"):
        recipe.with_overrides(vae_image_share=0.9)
    shipped = RECIPES["video"]  # single frames throughout: the per-frame start holds at every length
    assert {tuple(vae_batch(shipped, s).shape) for s in (0, shipped.vae_steps - 1)} == {(30, 3, 1, 64, 64)}


def test_the_video_vae_starts_with_a_narrow_posterior():
    def widest_std(vae):
        with torch.no_grad():
            return vae.encode(torch.rand(1, 3, 5, 64, 64) * 2 - 1).latent_dist.std.max().item()

    vae = build_toy_video(0).vae
    assert (
        widest_std(vae) > 0.5
    )  # diffusers' init: latents nearly all noise, what the first video VAE learnt from
    init_posterior_logvar(vae, RECIPES["video"].vae_logvar_init)
    assert widest_std(vae) < 0.1  # about exp(-6 / 2)

    flat = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4, use_quant_conv=False)
    init_posterior_logvar(flat, 0.0)  # 0: the VAE as built, whatever its layers
    with pytest.raises(ValueError, match=r"vae_logvar_init=-6\.0 needs a VAE with a quant_conv"):
        init_posterior_logvar(flat, -6.0)


def test_the_video_vae_starts_as_an_image_vae_frame_by_frame():
    vae = build_toy_video(0).vae.eval()
    init_per_frame(vae)
    video = torch.rand(1, 3, 9, 64, 64) * 2 - 1

    def round_trip(x):
        return vae.decode(vae.encode(x).latent_dist.mode()).sample

    with torch.no_grad():
        whole = round_trip(video)
        # each latent frame holds the last of its 4 frames (frame 0 alone), decoded 4 times over
        for kept, frames in ((0, [0]), (4, [1, 2, 3, 4]), (8, [5, 6, 7, 8])):
            alone = round_trip(video[:, :, kept : kept + 1])[:, :, 0]
            for frame in frames:
                torch.testing.assert_close(whole[:, :, frame], alone, rtol=0, atol=1e-5)
    # and the single-frame phase keeps it so: the past taps get no gradient from single frames
    vae.train()
    round_trip(video[:, :, :1]).square().mean().backward()
    past = [m.weight.grad[:, :, :-1] for m in vae.modules()
        if isinstance(m, WanCausalConv3d) and m.kernel_size[0] > 1 and m.weight.grad is not None]  # fmt: skip
    assert past and all(g.abs().max() == 0 for g in past)


@pytest.mark.slow
def test_cli_trains_a_video_model(tmp_path, capsys):
    out = tmp_path / "toy-video"
    argv = ["train", "toy-video", "--out", str(out), "--work-dir", str(tmp_path / "work"), "--samples", "4",
            "--vae-steps", "1", "--steps", "1", "--batch", "1"]  # fmt: skip
    assert main(argv) == 0
    assert "adherence on 6 held-out prompts" in capsys.readouterr().out
    pipe = load_toy("video", out)
    assert type(pipe).__name__ == "WanPipeline" and pipe.vae_scale_factor_spatial == 4
    assert main(argv) == 2  # the folder exists now
    assert "--overwrite" in capsys.readouterr().err
