"""RadialAttention on tiny Wan, HunyuanVideo and CogVideoX pipelines: schedule, families, equivalence, LoRA."""

from dataclasses import dataclass, field

import pytest
import torch
from helpers import max_diff, run_tiny, tiny_pipeline

import attnpack
from attnpack import RadialAttention, Role

# Geometries with 32 tokens per latent frame, so that 16-token blocks tile the frames.
SIZES = {
    "tiny-wan-t2v": dict(height=64, width=128),
    "tiny-wan2.2": dict(height=64, width=128),
    "tiny-wan-i2v": dict(height=64, width=128),
    "tiny-hunyuanvideo": dict(height=32, width=64),
    "tiny-cogvideox": dict(height=64, width=128),
}
# Windows wider than the frames: every block kept. The spatial variant skips far frame pairs by its block
# size; the official one by the public code's 128 tokens whatever the block, so at 16-token blocks it skips
# distance 2 of these 32-token frames (tested in test_radial_pattern.py).
EVERYTHING = dict(decay_factor=100.0, block_size=16, variant="spatial")
SPARSE = dict(decay_factor=0.05, block_size=16)


@pytest.mark.parametrize("name", list(SIZES))
def test_everything_kept_equals_stock(name):
    pipe = tiny_pipeline(name)
    stock = run_tiny(pipe, name, **SIZES[name])
    with attnpack.apply(pipe, "radial", **EVERYTHING):
        assert max_diff(run_tiny(pipe, name, **SIZES[name]), stock) <= 1e-5


@pytest.mark.parametrize("name", ["tiny-wan-t2v", "tiny-hunyuanvideo", "tiny-cogvideox"])
def test_all_dense_schedule_equals_stock_and_sparse_differs(name):
    pipe = tiny_pipeline(name)
    sizes = dict(SIZES[name], num_frames=33, num_inference_steps=3)  # 9 latent frames: far pairs get skipped
    stock = run_tiny(pipe, name, **sizes)
    with attnpack.apply(pipe, "radial", dense_steps=3, **SPARSE):
        assert torch.equal(run_tiny(pipe, name, **sizes), stock)
    with attnpack.apply(pipe, "radial", **SPARSE):
        sparse = run_tiny(pipe, name, **sizes)
    assert torch.isfinite(sparse).all() and max_diff(sparse, stock) > 1e-3


@dataclass(eq=False, repr=False)
class Recording(RadialAttention):
    seen: list = field(default_factory=list)

    def dense_now(self, call):
        dense = super().dense_now(call)
        self.seen.append((call.context.step_index, call.site.role_index, dense))
        return dense


def test_schedule_reads_steps_and_layers_from_the_context():
    pipe = tiny_pipeline("tiny-wan-t2v")
    method = Recording(dense_layers=1, dense_steps=1, dense_last_steps=1, **SPARSE)
    handle = attnpack.apply(pipe, method)
    assert handle.num_layers == 2  # the two attn1 layers; attn2 (cross-attention) keeps its processor
    run_tiny(pipe, "tiny-wan-t2v", **SIZES["tiny-wan-t2v"], num_inference_steps=4)
    sparse = sorted({(step, layer) for step, layer, dense in method.seen if not dense})
    assert sparse == [(1, 1), (2, 1)]  # steps 0 and 3 dense, layer 0 dense
    for module, _ in pipe.transformer.attn_processors.items():
        assert "attn2" not in module or not isinstance(
            pipe.transformer.attn_processors[module], RadialAttention
        )


def test_layers_and_roles_per_family():
    pipe = tiny_pipeline("tiny-hunyuanvideo")
    handle = attnpack.apply(pipe, "radial")
    ctx = attnpack.attach(pipe)
    assert handle.num_layers == ctx.count_of(Role.JOINT) == 2  # the token refiner (text only) is left alone
    with pytest.raises(
        ValueError,
        match=r"RadialAttention \('radial'\) acts on the families \['wan', 'hunyuan_video', 'cogvideox'\]",
    ):
        attnpack.apply(tiny_pipeline("tiny-flux"), "radial")


def test_presets():
    wan = RadialAttention.preset("wan2.1")
    assert (wan.dense_layers, wan.dense_steps, wan.decay_factor, wan.sink) == (1, 12, 0.2, True)
    hunyuan = RadialAttention.preset("hunyuanvideo", dense_last_steps=2)
    assert (hunyuan.dense_steps, hunyuan.decay_factor, hunyuan.sink, hunyuan.dense_last_steps) == (
        12,
        0.95,
        False,
        2,
    )
    assert RadialAttention.preset("wan2.2").decay_factor == 0.8
    with pytest.raises(ValueError, match=r"model='wan3' is not accepted; choose one of 'wan2.1', 'wan2.2'"):
        RadialAttention.preset("wan3")


def test_schedule_without_a_step_says_how_to_give_one():
    pipe = tiny_pipeline("tiny-wan-t2v")
    attnpack.apply(pipe.transformer, "radial", dense_steps=2, **SPARSE)
    with pytest.raises(
        RuntimeError, match=r"needs the denoising step: run the attached pipeline, or call ctx.set_step"
    ):
        run_tiny(pipe, "tiny-wan-t2v", **SIZES["tiny-wan-t2v"])
    attnpack.attach(pipe.transformer).set_step(0, 10)
    run_tiny(pipe, "tiny-wan-t2v", **SIZES["tiny-wan-t2v"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            dict(decay_factor=0),
            r"RadialAttention: decay_factor=0 is out of range; expected a number in \(0, inf\)",
        ),
        (dict(dense_steps=-1), r"dense_steps=-1 is out of range; expected an integer in \[0, inf\)"),
        (dict(dense_layers=1.5), r"dense_layers=1.5 is out of range; expected an integer"),
        (dict(variant="raster"), r"variant='raster' is not accepted; choose one of 'official', 'spatial'"),
        (dict(block_size=100), r"block_size=100 is not accepted; choose one of 16, 32, 64, 128, 256"),
        (dict(sink="yes"), r"sink='yes' is not accepted; choose one of True, False"),
    ],
)
def test_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RadialAttention(**kwargs)


def test_spatial_variant_runs():
    pipe = tiny_pipeline("tiny-cogvideox")
    sizes = dict(SIZES["tiny-cogvideox"], num_frames=33)
    stock = run_tiny(pipe, "tiny-cogvideox", **sizes)
    with attnpack.apply(pipe, "radial", variant="spatial", **SPARSE):
        spatial = run_tiny(pipe, "tiny-cogvideox", **sizes)
    assert torch.isfinite(spatial).all() and max_diff(spatial, stock) > 1e-4


def test_with_a_lora_loaded_through_diffusers(tmp_path):
    """Length-extension LoRAs load the usual way and work under the method."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    trained = tiny_pipeline("tiny-wan-t2v")
    config = LoraConfig(
        r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False
    )
    trained.transformer.add_adapter(config)
    type(trained).save_lora_weights(
        tmp_path, transformer_lora_layers=get_peft_model_state_dict(trained.transformer)
    )

    pipe = tiny_pipeline("tiny-wan-t2v")
    sizes = SIZES["tiny-wan-t2v"]
    without = run_tiny(pipe, "tiny-wan-t2v", **sizes)
    pipe.load_lora_weights(tmp_path / "pytorch_lora_weights.safetensors")
    with_lora = run_tiny(pipe, "tiny-wan-t2v", **sizes)
    assert max_diff(with_lora, without) > 1e-4
    with attnpack.apply(pipe, "radial", **EVERYTHING):
        assert max_diff(run_tiny(pipe, "tiny-wan-t2v", **sizes), with_lora) <= 1e-5


def test_lora_trains_through_the_method():
    """Gradients reach LoRA weights through radial attention: what length-extension training needs."""
    from peft import LoraConfig

    pipe = tiny_pipeline("tiny-wan-t2v")
    transformer = pipe.transformer
    transformer.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    )
    attnpack.apply(transformer, "radial", **SPARSE)
    latents = torch.randn(1, 16, 9, 8, 16)  # 9 latent frames of 4 x 8 tokens
    text = torch.randn(1, 16, 32)
    out = transformer(latents, timestep=torch.tensor([500]), encoder_hidden_states=text, return_dict=False)[0]
    out.square().mean().backward()
    grads = [p.grad for n, p in transformer.named_parameters() if "lora_" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
