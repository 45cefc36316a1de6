"""What methods ask a model family for beyond q, k, v: its rotary embedding, its temporal blocks, where its
deep layers start, the text at the front of a module's hidden states. Families that lack one say so."""

import pytest
import torch
from helpers import max_diff, run_tiny, tiny_pipeline

import attnpack
from attnpack.families import FAMILIES, family_of
from attnpack.families.base import RotaryArgument, RotaryModule, RotaryTheta, reindex_tables


def test_each_family_offers_its_rotary_embedding():
    flux = tiny_pipeline("tiny-flux").transformer
    rotary = family_of(flux).rotary(flux)
    assert isinstance(rotary, RotaryTheta)
    theta = flux.pos_embed.theta
    undo = rotary.scale_theta(10.0)
    assert flux.pos_embed.theta == theta * 10
    undo()
    assert flux.pos_embed.theta == theta
    with pytest.raises(ValueError, match="cannot be re-indexed"):
        rotary.reindex(lambda: None)  # FLUX's tables hold text rows too

    for name, kind in (
        ("tiny-wan-t2v", RotaryModule),
        ("tiny-hunyuanvideo", RotaryModule),
        ("tiny-cogvideox", RotaryArgument),
    ):
        model = tiny_pipeline(name).transformer
        rotary = family_of(model).rotary(model)
        assert isinstance(rotary, kind)
        with pytest.raises(ValueError, match="no base"):
            rotary.scale_theta(2.0)

    sd3 = tiny_pipeline("tiny-sd3").transformer
    assert family_of(sd3).rotary(sd3) is None


def test_reindex_hooks_the_rotary_module_and_undoes():
    pipe = tiny_pipeline("tiny-wan-t2v")
    model = pipe.transformer
    latents = torch.zeros(1, 16, 3, 8, 12)  # a 3 x 4 x 6 token grid
    cos, sin = model.rope(latents)
    source = torch.randperm(72, generator=torch.Generator().manual_seed(0))
    undo = family_of(model).rotary(model).reindex(lambda: source)
    new_cos, new_sin = model.rope(latents)
    assert torch.equal(new_cos, cos[:, source]) and torch.equal(new_sin, sin[:, source])
    undo()
    assert torch.equal(model.rope(latents)[0], cos)
    with pytest.raises(ValueError, match="no axis of the 5 video tokens"):
        reindex_tables(cos, torch.arange(5))


def test_clear_ntk_needs_a_rotary_embedding():
    pipe = tiny_pipeline("tiny-sd3")
    with pytest.raises(ValueError, match=r"ntk_factor=2\.0 .* no rotary embedding"):
        attnpack.apply(pipe, "clear", radius=2, ntk_factor=2.0)
    stock = run_tiny(pipe, "tiny-sd3")
    assert max_diff(run_tiny(pipe, "tiny-sd3"), stock) == 0  # nothing was left behind


def test_temporal_blocks():
    unet = tiny_pipeline("tiny-animatediff").unet
    assert family_of(unet).temporal_blocks(unet) is not None
    wan = tiny_pipeline("tiny-wan-t2v").transformer
    assert family_of(wan).temporal_blocks(wan) is None


def test_deep_layers_start_and_leading_text():
    assert FAMILIES["unet"].deep_layers_start == 36 and FAMILIES["flux"].deep_layers_start == 19
    with pytest.deprecated_call():
        from attnpack.methods.isolation import DEFAULT_START_LAYER
    assert DEFAULT_START_LAYER == {"unet": 36, "flux": 19}

    pipe = tiny_pipeline("tiny-flux")
    ctx = attnpack.attach(pipe)
    ctx.text_len = 7
    sites = {site.local_name: site for site in ctx.sites}
    double = sites["transformer_blocks.0.attn"]
    single = sites["single_transformer_blocks.0.attn"]
    assert single.adapter.leading_text_len(single, None) == 7  # [text, image] in one sequence
    assert double.adapter.leading_text_len(double, torch.zeros(1, 7, 8)) == 0
    sdxl_site = attnpack.attach(tiny_pipeline("tiny-sdxl")).sites[0]
    assert sdxl_site.adapter.leading_text_len(sdxl_site, None) == 0


def test_pipelines_recognise_families_not_class_names():
    from attnpack.pipelines import long_video, multi_subject, trajectory_video

    pipe = tiny_pipeline("tiny-sd3")
    with pytest.raises(ValueError, match="runs Wan, CogVideoX and HunyuanVideo"):
        trajectory_video(pipe, trajectory=[], prompt="a fox")
    with pytest.raises(ValueError, match="SDXL-family and FLUX"):
        multi_subject(pipe, [{"name": "fox", "prompt": "a fox"}], "a fox")
    with pytest.raises(ValueError, match="AnimateDiff and Wan"):
        long_video(pipe, "a fox", num_frames=8)
