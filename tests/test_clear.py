"""CLEAR: the pattern against its formula, the kernel on it, ClearAttention on a tiny FLUX, weights."""

import pytest
import torch
from helpers import max_diff, run_tiny, tiny_pipeline
from kernel_cases import assert_triton_matches_reference
from safetensors.torch import save_file

import attnpack
from attnpack import ClearAttention
from attnpack.methods.clear import released_file
from attnpack.patterns import clear_window

SIZE = dict(height=48, width=96)  # tiny FLUX: 24 x 48 tokens after packing


def formula(grid, radius, text, down_factor):
    """CLEAR's mask written out, in the caller's order: queries [text, image], keys [text, image, pooled]."""
    height, width = grid
    image = height * width
    pooled = image // down_factor**2 if down_factor else 0
    queries, keys = text + image, text + image + pooled
    mask = torch.zeros(queries, keys, dtype=torch.bool)
    mask[:text, : text + image] = True  # text: text and full-resolution image, not the pooled tokens
    mask[text:, :text] = True
    mask[text:, text + image :] = True
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    mask[text:, text : text + image] = (ys[:, None] - ys[None]) ** 2 + (
        xs[:, None] - xs[None]
    ) ** 2 < radius**2
    return mask


@pytest.mark.parametrize(
    ("grid", "radius", "text", "down_factor", "tile"),
    [((12, 20), 4, 7, None, (4, 8)), ((16, 16), 3.5, 5, 4, (2, 8)), ((9, 13), 2, 0, None, (8, 16))],
)
def test_pattern_equals_the_formula(grid, radius, text, down_factor, tile):
    pattern = clear_window(
        grid, radius, text_tokens=text, down_factor=down_factor, tile=tile, blocks=(16, 16)
    )
    assert torch.equal(pattern.to_dense()[0], formula(grid, radius, text, down_factor))


def test_tiles_halve_the_wasted_work_at_2048():
    """2048 px: 128 x 128 tokens, r = 16, 128-token blocks; raster order computes 5.2x what the disc needs."""
    raster = clear_window((128, 128), 16, text_tokens=0, tile=(1, 128), blocks=(128, 128))
    tiled = clear_window((128, 128), 16, text_tokens=0, blocks=(128, 128))
    assert raster.block_density / raster.element_density == pytest.approx(5.2, abs=0.1)
    assert tiled.block_density / tiled.element_density <= 2.4


def test_text_last_layout():
    pattern = clear_window((8, 8), 2, text_tokens=6, text_first=False, tile=(2, 8), blocks=(16, 16))
    dense = pattern.to_dense()[0]
    assert dense[:, 64:].all() and dense[64:].all()  # text after the image: seen by all, sees all


@pytest.mark.parametrize("down_factor", [None, 4])
def test_kernel_on_clear_patterns(down_factor):
    pattern = clear_window((8, 16), 3, text_tokens=9, down_factor=down_factor, tile=(2, 8), blocks=(16, 16))
    assert_triton_matches_reference(pattern)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(grid=(8,)), r"grid=\(8,\) must be \(H, W\)"),
        (dict(radius=0), r"radius=0 must be a number > 0"),
        (dict(down_factor=1), r"down_factor=1 must be None or an integer >= 2"),
        (dict(down_factor=3), r"down_factor=3 must divide the token grid \(8, 8\)"),
        (dict(text_tokens=-2), r"text_tokens=-2 must be an integer >= 0"),
    ],
)
def test_pattern_bad_arguments(kwargs, message):
    arguments = dict(grid=(8, 8), radius=2) | kwargs
    with pytest.raises(ValueError, match=message):
        clear_window(arguments.pop("grid"), arguments.pop("radius"), **arguments)


# ---- the method


def test_radius_covering_the_image_equals_stock():
    pipe = tiny_pipeline("tiny-flux")
    stock = run_tiny(pipe, "tiny-flux", **SIZE)
    with attnpack.apply(pipe, "clear", radius=1000):
        assert max_diff(run_tiny(pipe, "tiny-flux", **SIZE), stock) <= 1e-5
    assert torch.equal(run_tiny(pipe, "tiny-flux", **SIZE), stock)


@pytest.mark.parametrize("down_factor", [None, 4])
def test_local_attention_runs_on_double_and_single_blocks(down_factor):
    pipe = tiny_pipeline("tiny-flux")
    stock = run_tiny(pipe, "tiny-flux", **SIZE)
    with attnpack.apply(pipe, "clear", radius=3, down_factor=down_factor) as handle:
        out = run_tiny(pipe, "tiny-flux", **SIZE)
        assert handle.num_layers == 3  # one double-stream and two single-stream blocks
        names = [n for n, _ in pipe.transformer.named_parameters() if n.endswith("spatial_weight")]
        assert len(names) == (3 if down_factor else 0)
    assert torch.isfinite(out).all() and max_diff(out, stock) > 1e-4
    assert not any(n.endswith("spatial_weight") for n, _ in pipe.transformer.named_parameters())


def test_pooling_needs_a_divisible_grid():
    pipe = tiny_pipeline("tiny-flux")
    with (
        attnpack.apply(pipe, "clear", radius=3, down_factor=4),
        pytest.raises(ValueError, match="down_factor=4"),
    ):
        run_tiny(pipe, "tiny-flux", height=36, width=96)  # 18 x 48 tokens


def test_proportional_attention_and_ntk_rope():
    pipe = tiny_pipeline("tiny-flux")
    theta = pipe.transformer.pos_embed.theta
    plain = run_tiny(pipe, "tiny-flux", **SIZE)
    with attnpack.apply(pipe, "clear", radius=1000, ntk_factor=10.0):
        assert pipe.transformer.pos_embed.theta == theta * 10
        stretched = run_tiny(pipe, "tiny-flux", **SIZE)
    assert pipe.transformer.pos_embed.theta == theta and max_diff(stretched, plain) > 1e-5
    with attnpack.apply(pipe, "clear", radius=1000, proportional_attention=True):
        proportional = run_tiny(pipe, "tiny-flux", **SIZE)
    assert max_diff(proportional, plain) > 1e-5


# ---- weights


def clear_weights_file(pipe, path, down_factor=None, seed=0):
    """A file in the released format, made from the model: perturbed projections (and spatial weights)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in pipe.transformer.named_modules():
        if type(module).__name__ != "FluxAttention":
            continue
        for projection in ("to_q", "to_k", "to_v", "to_out.0"):
            try:
                layer = module.get_submodule(projection)
            except AttributeError:
                continue
            for kind in ("weight", "bias"):
                tensor = getattr(layer, kind)
                state[f"{name}.{projection}.{kind}"] = tensor.detach() + 0.05 * torch.randn(
                    tensor.shape, generator=g
                )
        if down_factor:
            f = down_factor
            state[f"{name}.processor.spatial_weight"] = torch.rand(1, 1, 1, f, 1, f, 1, generator=g)
    save_file(state, path)
    return state


@pytest.mark.parametrize("down_factor", [None, 4])
def test_weights_load_and_unload(tmp_path, down_factor):
    pipe = tiny_pipeline("tiny-flux")
    path = tmp_path / released_file(16, down_factor)
    state = clear_weights_file(pipe, path, down_factor)
    original = pipe.transformer.transformer_blocks[0].attn.to_q.weight.detach().clone()
    with attnpack.apply(pipe, ClearAttention(radius=16, down_factor=down_factor, weights=str(path))):
        loaded = pipe.transformer.transformer_blocks[0].attn.to_q.weight
        assert torch.equal(loaded, state["transformer_blocks.0.attn.to_q.weight"])
        if down_factor:
            processor = pipe.transformer.single_transformer_blocks[1].attn.processor
            expected = state["single_transformer_blocks.1.attn.processor.spatial_weight"]
            assert torch.equal(processor.spatial_weight.detach(), expected)
        run_tiny(pipe, "tiny-flux", height=64, width=64)
    assert torch.equal(pipe.transformer.transformer_blocks[0].attn.to_q.weight, original)


def test_weights_that_do_not_fit(tmp_path):
    pipe = tiny_pipeline("tiny-flux")
    state = clear_weights_file(pipe, tmp_path / "mine.safetensors")
    state.pop("single_transformer_blocks.1.attn.to_k.bias")
    with pytest.raises(
        ValueError,
        match=r"does not fit this model: 1 missing keys \['single_transformer_blocks.1.attn.to_k.bias'\]",
    ):
        attnpack.apply(pipe, ClearAttention(weights=state))
    pooled = clear_weights_file(pipe, tmp_path / "pooled.safetensors", down_factor=4)
    with pytest.raises(
        ValueError, match=r"holds pooled-token weights \(down_factor=4\); the method has down_factor=None"
    ):
        attnpack.apply(pipe, ClearAttention(weights=pooled))
    named = tmp_path / "clear_local_8.safetensors"
    clear_weights_file(pipe, named)
    with pytest.raises(
        ValueError, match=r"holds weights for radius=8, down_factor=None; the method has radius=16"
    ):
        attnpack.apply(pipe, ClearAttention(radius=16, weights=str(named)))
    wrong = clear_weights_file(pipe, tmp_path / "wrong.safetensors")
    wrong["transformer_blocks.0.attn.to_q.weight"] = wrong["transformer_blocks.0.attn.to_q.weight"][:, :8]
    with pytest.raises(ValueError, match=r"to_q.weight has shape \(32, 8\), the model expects \(32, 32\)"):
        attnpack.apply(pipe, ClearAttention(weights=wrong))
    # nothing was changed by the refused loads
    assert not any(isinstance(p, ClearAttention) for p in pipe.transformer.attn_processors.values())


def test_weights_from_the_hub_offline_say_how_to_get_them():
    pipe = tiny_pipeline("tiny-flux")
    with pytest.raises(
        ValueError,
        match=r"could not get clear_local_16_down_4.safetensors from the Hugging Face Hub repo 'Huage001/CLEAR'.*huggingface-cli download",
    ):
        attnpack.apply(pipe, ClearAttention(radius=16, down_factor=4, weights="Huage001/CLEAR"))
    with pytest.raises(ValueError, match=r"no released weights for radius=12"):
        attnpack.apply(pipe, ClearAttention(radius=12, weights="Huage001/CLEAR"))
    with pytest.raises(
        ValueError, match=r"weights='missing/file.safetensors' is neither a safetensors file nor a Hub id"
    ):
        attnpack.apply(pipe, ClearAttention(weights="missing/file.safetensors"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(radius=-1), r"radius=-1 is out of range"),
        (dict(down_factor=1), r"down_factor=1 is out of range; expected an integer in \[2, inf\)"),
        (dict(ntk_factor=0), r"ntk_factor=0 is out of range"),
        (dict(proportional_attention="yes"), r"proportional_attention='yes' must be True or False"),
        (dict(weights=3), r"weights=3 must be a safetensors path, a Hub repo id"),
    ],
)
def test_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ClearAttention(**kwargs)


def test_upscale_pipeline():
    from PIL import Image

    from attnpack.pipelines import clear_upscale

    pipe = tiny_pipeline("tiny-flux")
    processors = dict(pipe.transformer.attn_processors)
    scheduler_config = dict(pipe.scheduler.config)
    small = Image.new("RGB", (32, 32), (200, 80, 40))
    result = clear_upscale(
        pipe, small, "a red fox", height=64, width=96, num_inference_steps=4, radius=4,
        generator=torch.Generator().manual_seed(0), max_sequence_length=16,
    )  # fmt: skip
    assert result.images[0].size == (96, 64)
    assert dict(pipe.transformer.attn_processors) == processors
    assert dict(pipe.scheduler.config) == scheduler_config
    assert not pipe.vae.use_tiling
    with pytest.raises(ValueError, match=r"strength=1.5 must be in \(0, 1\]"):
        clear_upscale(pipe, small, "x", height=64, width=64, strength=1.5)


def test_distillation_lowers_the_loss_and_saves_loadable_weights(tmp_path):
    from PIL import Image

    from attnpack.training import distill_clear

    images = tmp_path / "teacher"
    images.mkdir()
    for i, color in enumerate([(200, 30, 30), (30, 200, 90), (20, 40, 220)]):
        Image.new("RGB", (64, 64), color).save(images / f"image{i}.png")
        (images / f"image{i}.txt").write_text(f"a plain color number {i}")
    pipe = tiny_pipeline("tiny-flux")
    out = tmp_path / "clear.safetensors"
    result = distill_clear(
        pipe, images, out, radius=3, down_factor=4, steps=60, learning_rate=3e-3, resolution=64,
        max_sequence_length=16, batch_size=2,
    )  # fmt: skip
    first, last = sum(result.losses[:10]) / 10, sum(result.losses[-10:]) / 10
    assert last < 0.95 * first, (first, last)
    # the teacher is untouched, and the weights load back through the method
    assert not any(isinstance(p, ClearAttention) for p in pipe.transformer.attn_processors.values())
    with attnpack.apply(pipe, ClearAttention(radius=3, down_factor=4, weights=str(out))):
        run_tiny(pipe, "tiny-flux", height=64, width=64)
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        distill_clear(pipe, images, out, radius=3, steps=1, resolution=64, max_sequence_length=16)


def test_sd3_joint_and_dual_attention():
    pipe = tiny_pipeline("tiny-sd3")
    stock = run_tiny(pipe, "tiny-sd3")
    with attnpack.apply(pipe, "clear", radius=1000) as handle:
        assert max_diff(run_tiny(pipe, "tiny-sd3"), stock) <= 1e-5
        assert handle.num_layers == 3  # two joint blocks and SD 3.5's image-only attn2
    with attnpack.apply(pipe, "clear", radius=2, down_factor=4):
        local = run_tiny(pipe, "tiny-sd3")
    assert torch.isfinite(local).all() and max_diff(local, stock) > 1e-4


def test_pooling_weights_follow_the_model_to_its_device():
    """apply() on a model already on its GPU: the layer's spatial_weight moves to the call's device on the
    first call instead of failing with a device mismatch."""
    from types import SimpleNamespace

    from attnpack.methods.clear import ClearLayer

    layer = ClearLayer(ClearAttention(radius=16, down_factor=4))
    call = SimpleNamespace(key=torch.empty(1, 4, 2, 8, device="meta"))
    weights = layer.pooling_weights(call)
    assert weights.device.type == "meta" and weights.shape == (4, 4)
    assert layer.spatial_weight.device.type == "meta"


@pytest.mark.parametrize("down_factor", [None, 2])
def test_proportional_scale_counts_the_sequence_as_the_public_code(down_factor):
    """log_4608(N) with N the text + image tokens before the pooled keys join (10 N with pooling)."""
    import math
    from types import SimpleNamespace

    from attnpack.layout import Role, TokenLayout

    grid, text, head_dim = (8, 12), 7, 16
    tokens = text + grid[0] * grid[1]
    layout = TokenLayout(Role.JOINT, tokens, tokens, grid=grid, text_len=text)
    call = SimpleNamespace(layout=layout, query=torch.zeros(1, tokens, 2, head_dim), scale=None, site=None)
    method = attnpack.ClearAttention(radius=3, down_factor=down_factor, proportional_attention=True)
    expected = math.sqrt(math.log(tokens * (10 if down_factor else 1), 64**2 + 512) / head_dim)
    assert method.sparse_attention(call).scale == pytest.approx(expected, rel=1e-12)
