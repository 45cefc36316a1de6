"""attnpack beside diffusers' own features (issue 25): offloading, VAE tiling, LoRA, the caches (first-block,
PAB, TaylorSeer), layerwise casting and bf16. With each feature on, attnpack's dense attention reproduces the
stock pipeline exactly (so the feature sees the same model), and the sparse methods run under it and act."""

import logging

import pytest
import torch
from diffusers.hooks import FirstBlockCacheConfig, PyramidAttentionBroadcastConfig, TaylorSeerCacheConfig
from helpers import max_diff, run_tiny, tiny_pipeline
from peft import LoraConfig

import attnpack
from attnpack import fallback

STEPS = 4  # enough for the caches to skip work: they keep the first step(s) whole

CPU = torch.device("cpu")


def group_offload(pipe):
    pipe.transformer.enable_group_offload(
        CPU, offload_device=CPU, offload_type="block_level", num_blocks_per_group=1
    )


def lora(pipe):
    torch.manual_seed(0)  # the same random LoRA for the stock and the attnpack run
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False)
    pipe.transformer.add_adapter(config, adapter_name="style")
    pipe.transformer.set_adapters(["style"], weights=[0.8])


def cache(config):
    return lambda pipe: pipe.transformer.enable_cache(config(pipe))


FEATURES = {
    "model CPU offload": (lambda pipe: pipe.enable_model_cpu_offload(device=CPU), 0.0),  # accelerate's hooks
    "group offload": (group_offload, 0.0),
    "VAE tiling": (lambda pipe: pipe.vae.enable_tiling(), 0.0),
    "LoRA": (lora, 0.0),
    "first-block cache": (cache(lambda pipe: FirstBlockCacheConfig(threshold=0.5)), 0.0),
    "PAB": (
        cache(
            lambda pipe: PyramidAttentionBroadcastConfig(
                spatial_attention_block_skip_range=2,
                spatial_attention_timestep_skip_range=(-1, 1001),
                current_timestep_callback=lambda: pipe.current_timestep,
            )
        ),
        0.0,
    ),
    "TaylorSeer": (
        cache(
            lambda pipe: TaylorSeerCacheConfig(
                cache_interval=2, disable_cache_before_step=1, taylor_factors_dtype=torch.float32
            )
        ),
        0.0,
    ),
    "layerwise casting": (
        lambda pipe: pipe.transformer.enable_layerwise_casting(
            storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32
        ),
        0.0,
    ),
    "bf16": (lambda pipe: pipe.to(torch.bfloat16), 0.0),
}

# A sparse method on each family, set to act at the tiny sizes and from the first step.
SPARSE = {
    "tiny-wan-t2v": ("radial", {"dense_steps": 0, "dense_layers": 0}),
    "tiny-flux": ("clear", {"radius": 2}),
}


def with_feature(name, feature):
    pipe = tiny_pipeline(name)
    FEATURES[feature][0](pipe)
    return pipe


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("name", list(SPARSE))
def test_feature_with_attnpack(name, feature, caplog, monkeypatch):
    monkeypatch.setattr(fallback, "_warned", set())
    stock = run_tiny(with_feature(name, feature), name, num_inference_steps=STEPS)

    pipe = with_feature(name, feature)
    with attnpack.apply(pipe, "dense"):
        dense = run_tiny(pipe, name, num_inference_steps=STEPS)
    assert max_diff(dense, stock) <= FEATURES[feature][1], "attnpack's dense attention left the stock result"

    method, settings = SPARSE[name]
    with (
        caplog.at_level(logging.WARNING, logger="attnpack"),
        attnpack.apply(pipe, method, **settings) as handle,
    ):
        sparse = run_tiny(pipe, name, num_inference_steps=STEPS)
    assert handle.num_layers > 0 and not [r for r in caplog.records if r.name == "attnpack"]
    assert sparse.shape == stock.shape and torch.isfinite(sparse.float()).all()
    assert max_diff(sparse, stock) > 0  # the method changed the attention
