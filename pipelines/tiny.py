"""Tiny random-weight pipelines, one per supported family, built from configs: no download, seconds on a CPU.

They are smoke models. Their weights are random, so what they generate is noise; they exist to run the
whole diffusers call path (tokenizers, text encoders, scheduler loop, denoiser, VAE) offline, which is
what the tests, the CLI's `tiny` presets and the app's demo mode need. Their tokenizers are built in
memory as well (one token per character), because a real tokenizer's vocabulary is a download.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

RANDOM_WEIGHTS_NOTE = "random-weight smoke model: it runs the full pipeline, and what it makes is noise"


@dataclass(frozen=True)
class TinyPipeline:
    name: str
    family: str
    description: str
    build: Callable[[int], Any] = field(repr=False)
    call_kwargs: dict[str, Any] = field(default_factory=dict)  # a small, fast call: sizes, frames, steps


def _tokenizer(
    specials: list[str], template: str, *, max_length: int, bos=None, eos=None, pad=None, unk=None
):
    """A character-level tokenizer: every printable ASCII character is a token."""
    from tokenizers import Regex, Tokenizer, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(specials)}
    for char in string.printable[:95]:
        vocab.setdefault(char, len(vocab))
    tokenizer = Tokenizer(WordLevel(vocab, unk_token=unk))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    used = [token for token in specials if token in template.split()]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(token, vocab[token]) for token in used]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        unk_token=unk,
        model_max_length=max_length,
    )


def clip_tokenizer():
    specials = ["<|startoftext|>", "<|endoftext|>", "<|pad|>"]
    return _tokenizer(
        specials,
        "<|startoftext|> $A <|endoftext|>",
        max_length=77,
        bos="<|startoftext|>",
        eos="<|endoftext|>",
        pad="<|pad|>",
        unk="<|endoftext|>",
    )


def t5_tokenizer():
    return _tokenizer(
        ["<pad>", "</s>", "<unk>"], "$A </s>", max_length=512, eos="</s>", pad="<pad>", unk="<unk>"
    )


def llama_tokenizer():
    return _tokenizer(
        ["<unk>", "<s>", "</s>", "<pad>"],
        "<s> $A",
        max_length=256,
        bos="<s>",
        eos="</s>",
        pad="<pad>",
        unk="<unk>",
    )


def clip_text_encoder(hidden_size: int, *, projection: bool = False, projection_dim: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        hidden_size=hidden_size,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=1000,
        hidden_act="gelu",
        projection_dim=projection_dim,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def t5_text_encoder(d_model: int = 32, *, umt5: bool = False):
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    config_cls, model_cls = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    config = config_cls(
        vocab_size=1000,
        d_model=d_model,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return model_cls(config)


def _seeded(seed: int, make: Callable[[], Any]) -> Any:
    torch.manual_seed(seed)
    return make()


def _finish(pipe):
    # Built from configs, models start in training mode: dropout would make two runs differ.
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe


def _sd_unet(down_block_types: tuple[str, ...], up_block_types: tuple[str, ...], **overrides):
    """A two-level SD UNet; which levels have attention is the caller's choice."""
    from diffusers import UNet2DConditionModel

    config = dict(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=down_block_types,
        up_block_types=up_block_types,
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=2,
    )
    return UNet2DConditionModel(**{**config, **overrides})


def build_sd15(seed: int = 0):
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    unet = _seeded(seed, lambda: _sd_unet(("CrossAttnDownBlock2D",) * 2, ("CrossAttnUpBlock2D",) * 2))
    vae = _seeded(seed, _image_vae)
    return _finish(
        StableDiffusionPipeline(
            vae=vae,
            text_encoder=_seeded(seed, lambda: clip_text_encoder(16)),
            tokenizer=clip_tokenizer(),
            unet=unet,
            scheduler=PNDMScheduler(skip_prk_steps=True, steps_offset=1),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    )


def _image_vae(latent_channels: int = 4):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8, 8),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=latent_channels,
        norm_num_groups=2,
    )


def build_sdxl(seed: int = 0):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    # SDXL: no attention at the first level, two transformer layers at the second, size and time conditioning
    unet = _seeded(
        seed,
        lambda: _sd_unet(
            ("DownBlock2D", "CrossAttnDownBlock2D"),
            ("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=80,  # 6 * addition_time_embed_dim + text_encoder_2 projection
            cross_attention_dim=64,
        ),
    )
    return _finish(
        StableDiffusionXLPipeline(
            vae=_seeded(seed, _image_vae),
            text_encoder=_seeded(seed, lambda: clip_text_encoder(32)),
            text_encoder_2=_seeded(seed, lambda: clip_text_encoder(32, projection=True, projection_dim=32)),
            tokenizer=clip_tokenizer(),
            tokenizer_2=clip_tokenizer(),
            unet=unet,
            scheduler=EulerDiscreteScheduler(
                beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading"
            ),
            force_zeros_for_empty_prompt=True,
        )
    )


def build_animatediff(seed: int = 0):
    from diffusers import AnimateDiffPipeline, DDIMScheduler, MotionAdapter

    unet = _seeded(
        seed, lambda: _sd_unet(("CrossAttnDownBlock2D", "DownBlock2D"), ("UpBlock2D", "CrossAttnUpBlock2D"))
    )
    motion_adapter = _seeded(
        seed,
        lambda: MotionAdapter(
            block_out_channels=(8, 16),
            motion_layers_per_block=1,
            motion_norm_num_groups=2,
            motion_num_attention_heads=2,
            motion_max_seq_length=32,
        ),
    )
    return _finish(
        AnimateDiffPipeline(
            vae=_seeded(seed, _image_vae),
            text_encoder=_seeded(seed, lambda: clip_text_encoder(16)),
            tokenizer=clip_tokenizer(),
            unet=unet,
            motion_adapter=motion_adapter,
            scheduler=DDIMScheduler(beta_schedule="linear", clip_sample=False, steps_offset=1),
            feature_extractor=None,
            image_encoder=None,
        )
    )


def _single_level_vae(latent_channels: int):
    """FLUX's / SD 3's VAE layout with one level: no downsampling, so tiny latents stay image-sized."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )


def flux_transformer():
    """The tiny FLUX denoiser: one double-stream and two single-stream blocks, 2 heads of 16."""
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
    )


def build_flux(seed: int = 0):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    transformer = _seeded(seed, flux_transformer)
    vae = _seeded(seed, lambda: _single_level_vae(latent_channels=1))
    return _finish(
        FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(),
            vae=vae,
            text_encoder=_seeded(seed, lambda: clip_text_encoder(32, projection_dim=32)),
            tokenizer=clip_tokenizer(),
            text_encoder_2=_seeded(seed, lambda: t5_text_encoder(32)),
            tokenizer_2=t5_tokenizer(),
            transformer=transformer,
        )
    )


def build_sd3(seed: int = 0):
    """SD 3.5's layout: QK norms, and a dual-attention first block (a second, image-only self-attention)."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    transformer = _seeded(
        seed,
        lambda: SD3Transformer2DModel(
            sample_size=32,
            patch_size=2,
            in_channels=4,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            caption_projection_dim=32,
            joint_attention_dim=32,
            pooled_projection_dim=64,
            out_channels=4,
            qk_norm="rms_norm",
            dual_attention_layers=(0,),
        ),
    )
    vae = _seeded(seed, lambda: _single_level_vae(latent_channels=4))
    return _finish(
        StableDiffusion3Pipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(),
            vae=vae,
            text_encoder=_seeded(seed, lambda: clip_text_encoder(32, projection=True, projection_dim=32)),
            tokenizer=clip_tokenizer(),
            text_encoder_2=_seeded(
                seed + 1, lambda: clip_text_encoder(32, projection=True, projection_dim=32)
            ),
            tokenizer_2=clip_tokenizer(),
            text_encoder_3=_seeded(seed, lambda: t5_text_encoder(32)),
            tokenizer_3=t5_tokenizer(),
            transformer=transformer,
        )
    )


def _wan_vae():
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )


def wan_transformer(**overrides):
    from diffusers import WanTransformer3DModel

    config = dict(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    return WanTransformer3DModel(**{**config, **overrides})


def build_wan_t2v(seed: int = 0, two_experts: bool = False):
    """Wan 2.1 text-to-video; with `two_experts`, Wan 2.2's layout: `transformer` for the high-noise
    steps, `transformer_2` for the rest."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    return _finish(
        WanPipeline(
            tokenizer=t5_tokenizer(),
            text_encoder=_seeded(seed, lambda: t5_text_encoder(32, umt5=True)),
            transformer=_seeded(seed, wan_transformer),
            transformer_2=_seeded(seed + 1, wan_transformer) if two_experts else None,
            vae=_seeded(seed, _wan_vae),
            scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
            boundary_ratio=0.9 if two_experts else None,
        )
    )


def build_wan_i2v(seed: int = 0):
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    try:  # transformers >= 5 without torchvision: the PIL backend, which CLIPImageProcessor falls back to
        from transformers import CLIPImageProcessorPil as ImageProcessor
    except ImportError:
        from transformers import CLIPImageProcessor as ImageProcessor

    image_encoder = _seeded(
        seed,
        lambda: CLIPVisionModelWithProjection(
            CLIPVisionConfig(
                hidden_size=4,
                projection_dim=4,
                num_hidden_layers=2,
                num_attention_heads=2,
                image_size=32,
                intermediate_size=16,
                patch_size=4,
            )
        ),
    )
    return _finish(
        WanImageToVideoPipeline(
            tokenizer=t5_tokenizer(),
            text_encoder=_seeded(seed, lambda: t5_text_encoder(32, umt5=True)),
            vae=_seeded(seed, _wan_vae),
            scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
            image_processor=ImageProcessor(crop_size=32, size=32),
            image_encoder=image_encoder,
            # added_kv_proj_dim gives attn2 the image-context projections, as in the real I2V models
            transformer=_seeded(
                seed, lambda: wan_transformer(in_channels=36, image_dim=4, added_kv_proj_dim=24)
            ),
        )
    )


def build_cogvideox(seed: int = 0):
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
        DDIMScheduler,
    )

    transformer = _seeded(
        seed,
        lambda: CogVideoXTransformer3DModel(
            num_attention_heads=2,
            attention_head_dim=16,
            in_channels=4,
            out_channels=4,
            time_embed_dim=2,
            text_embed_dim=32,
            num_layers=2,
            sample_width=4,
            sample_height=4,
            sample_frames=9,
            patch_size=2,
            temporal_compression_ratio=4,
            max_text_seq_length=16,
            use_rotary_positional_embeddings=True,
            use_learned_positional_embeddings=False,
        ),
    )
    vae = _seeded(
        seed,
        lambda: AutoencoderKLCogVideoX(
            in_channels=3,
            out_channels=3,
            down_block_types=("CogVideoXDownBlock3D",) * 4,
            up_block_types=("CogVideoXUpBlock3D",) * 4,
            block_out_channels=(8, 8, 8, 8),
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=2,
            temporal_compression_ratio=4,
        ),
    )
    return _finish(
        CogVideoXPipeline(
            tokenizer=t5_tokenizer(),
            text_encoder=_seeded(seed, lambda: t5_text_encoder(32)),
            vae=vae,
            transformer=transformer,
            scheduler=DDIMScheduler(timestep_spacing="trailing"),
        )
    )


def hunyuanvideo_transformer():
    """The tiny HunyuanVideo denoiser: one double- and one single-stream block, 2 heads of 10."""
    from diffusers import HunyuanVideoTransformer3DModel

    return HunyuanVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=10,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        patch_size=1,
        patch_size_t=1,
        guidance_embeds=True,
        text_embed_dim=16,
        pooled_projection_dim=8,
        rope_axes_dim=(2, 4, 4),
    )


def build_hunyuanvideo(seed: int = 0):
    from diffusers import AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline
    from transformers import LlamaConfig, LlamaModel

    transformer = _seeded(seed, hunyuanvideo_transformer)
    vae = _seeded(
        seed,
        lambda: AutoencoderKLHunyuanVideo(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            down_block_types=("HunyuanVideoDownBlock3D",) * 4,
            up_block_types=("HunyuanVideoUpBlock3D",) * 4,
            block_out_channels=(8, 8, 8, 8),
            layers_per_block=1,
            act_fn="silu",
            norm_num_groups=4,
            scaling_factor=0.476986,
            spatial_compression_ratio=8,
            temporal_compression_ratio=4,
            mid_block_add_attention=True,
        ),
    )
    llama = LlamaConfig(
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        hidden_size=16,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=1000,
        hidden_act="gelu",
    )
    return _finish(
        HunyuanVideoPipeline(
            text_encoder=_seeded(seed, lambda: LlamaModel(llama)),
            tokenizer=llama_tokenizer(),
            transformer=transformer,
            vae=vae,
            scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
            text_encoder_2=_seeded(seed, lambda: clip_text_encoder(8)),
            tokenizer_2=clip_tokenizer(),
        )
    )


def _i2v_image():
    from PIL import Image

    return Image.new("RGB", (48, 32), (120, 90, 200))


TINY_PIPELINES: dict[str, TinyPipeline] = {
    p.name: p
    for p in (
        TinyPipeline(
            "tiny-sd1.5",
            "unet",
            "Stable Diffusion 1.5 layout, two attention resolutions",
            build_sd15,
            dict(height=32, width=48, num_inference_steps=2, guidance_scale=6.0),
        ),
        TinyPipeline(
            "tiny-sdxl",
            "unet",
            "SDXL layout: two text encoders, no attention at full resolution",
            build_sdxl,
            dict(height=32, width=48, num_inference_steps=2, guidance_scale=5.0),
        ),
        TinyPipeline(
            "tiny-animatediff",
            "unet",
            "AnimateDiff: SD 1.5 layout with motion modules",
            build_animatediff,
            dict(height=32, width=48, num_frames=4, num_inference_steps=2, guidance_scale=7.5),
        ),
        TinyPipeline(
            "tiny-flux",
            "flux",
            "FLUX.1 layout: double- and single-stream blocks",
            build_flux,
            dict(height=16, width=24, num_inference_steps=2, guidance_scale=3.5, max_sequence_length=16),
        ),
        TinyPipeline(
            "tiny-sd3",
            "sd3",
            "Stable Diffusion 3.5 layout: joint attention, QK norms, a dual-attention block",
            build_sd3,
            dict(height=32, width=48, num_inference_steps=2, guidance_scale=5.0, max_sequence_length=16),
        ),
        TinyPipeline(
            "tiny-wan-t2v",
            "wan",
            "Wan 2.1 text-to-video layout",
            build_wan_t2v,
            dict(
                height=32,
                width=48,
                num_frames=9,
                num_inference_steps=2,
                guidance_scale=5.0,
                max_sequence_length=16,
            ),
        ),
        TinyPipeline(
            "tiny-wan2.2",
            "wan",
            "Wan 2.2 text-to-video layout: a high-noise and a low-noise expert",
            partial(build_wan_t2v, two_experts=True),
            dict(
                height=32,
                width=48,
                num_frames=9,
                num_inference_steps=3,
                guidance_scale=5.0,
                max_sequence_length=16,
            ),
        ),
        TinyPipeline(
            "tiny-wan-i2v",
            "wan",
            "Wan 2.1 image-to-video layout, with CLIP image context",
            build_wan_i2v,
            dict(
                height=32,
                width=48,
                num_frames=9,
                num_inference_steps=2,
                guidance_scale=5.0,
                max_sequence_length=512,  # WanAttention reads the last 512 context tokens as text
                image=_i2v_image,
            ),
        ),
        TinyPipeline(
            "tiny-cogvideox",
            "cogvideox",
            "CogVideoX 5B layout, with 3D RoPE",
            build_cogvideox,
            dict(
                height=32,
                width=48,
                num_frames=9,
                num_inference_steps=2,
                guidance_scale=6.0,
                max_sequence_length=16,
            ),
        ),
        TinyPipeline(
            "tiny-hunyuanvideo",
            "hunyuan_video",
            "HunyuanVideo layout: double- and single-stream blocks, token refiner",
            build_hunyuanvideo,
            dict(
                height=16,
                width=32,
                num_frames=9,
                num_inference_steps=2,
                guidance_scale=4.5,
                max_sequence_length=16,
                prompt_template={"template": "{}", "crop_start": 0},
            ),
        ),
    )
}


def build_tiny_pipeline(name: str, seed: int = 0):
    """A tiny random-weight pipeline by name (see `TINY_PIPELINES`)."""
    if name not in TINY_PIPELINES:
        raise ValueError(f"name={name!r} is not a tiny pipeline; accepted: {', '.join(TINY_PIPELINES)}")
    return TINY_PIPELINES[name].build(seed)


def tiny_call_kwargs(name: str, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments for a small, fast call of the tiny pipeline `name`."""
    if name not in TINY_PIPELINES:
        raise ValueError(f"name={name!r} is not a tiny pipeline; accepted: {', '.join(TINY_PIPELINES)}")
    kwargs = {
        key: value() if callable(value) else value for key, value in TINY_PIPELINES[name].call_kwargs.items()
    }
    return {**kwargs, **overrides}
