"""The toy models: a FLUX-family image model and a Wan-family video model, sized for the procedural world
(`attnpack.training.world`), built from configs here, trained by `attnpack.training.toy`, shipped in
`assets/toy-image` and `assets/toy-video` and loaded through the normal `from_pretrained` path.

Both read captions through a word-level tokenizer over the world's vocabulary (lower-cased, punctuation
dropped, unknown words as `<unk>`). They are trained at one geometry and one text length: 64 x 64 pixels
(8 x 8 image tokens), 17 frames for video (5 latent frames), 32 text tokens; `TOY_CALLS` holds the call
that matches, and the presets use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .world import VOCABULARY

SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>", "<s>")  # ids 0-3: T5's pad / eos first, as T5 configs expect
TEXT_LENGTH = 32
KINDS = ("image", "video")


@dataclass(frozen=True)
class ToyGeometry:
    """What a toy model was trained on and what its pipeline call must match."""

    size: int  # pixels, square
    frames: int  # 1 for images
    text_length: int = TEXT_LENGTH
    call: dict[str, Any] = field(default_factory=dict)  # the pipeline call: steps, guidance, sizes


TOY_GEOMETRY = {
    "image": ToyGeometry(64, 1, call={"height": 64, "width": 64, "num_inference_steps": 20,
                                      "max_sequence_length": TEXT_LENGTH, "negative_prompt": "",
                                      "true_cfg_scale": 4.0}),
    "video": ToyGeometry(64, 17, call={"height": 64, "width": 64, "num_frames": 17, "num_inference_steps": 20,
                                       "max_sequence_length": TEXT_LENGTH, "guidance_scale": 4.0}),
}  # fmt: skip


# Each method's settings at the toy geometry (8 x 8 tokens a frame, 5 latent frames), for the presets and
# the quality suite.
TOY_METHODS = {
    "image": {
        "dense": {},
        "clear": {"radius": 3},
        "pooled_agent": {"agent_grid": 2},
        "isolation": {"start_layer": 2},
    },
    "video": {
        "dense": {},
        "radial": {"block_size": 16},
        "pooled_agent": {"agent_grid": 2},
        "freenoise": {"context_length": 5, "context_stride": 2},
        "freelong": {"local_window": 5},
        "trajectory": {"rope_steps": 5, "mask_steps": 12},
    },
}


def word_tokenizer(template: str):
    """A word-level tokenizer over the world's vocabulary; `template` places the special tokens
    ("<s> $A </s>" for the CLIP side, "$A </s>" for T5)."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate((*SPECIAL_TOKENS, *VOCABULARY))}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    # Prompts typed by people: "A red circle, over..." reads as the caption "a red circle over ...".
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Lowercase(), normalizers.Replace(Regex("[^a-z ]"), " ")]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(t, vocab[t]) for t in SPECIAL_TOKENS if t in template.split()]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=TEXT_LENGTH,
    )


def vocabulary_size() -> int:
    return len(SPECIAL_TOKENS) + len(VOCABULARY)


def _t5_config(cls, width: int):
    return cls(
        vocab_size=vocabulary_size(),
        d_model=width,
        d_kv=width // 4,
        d_ff=2 * width,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=TEXT_LENGTH,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )


def build_toy_image(seed: int = 0):
    """The untrained image model: FluxPipeline with 8 x 8 image tokens at 64 x 64 pixels."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    width = 64
    clip = CLIPTextConfig(
        vocab_size=vocabulary_size(),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=TEXT_LENGTH,
        projection_dim=width,
        pad_token_id=0,
        eos_token_id=1,  # not 2: CLIP would pool at the highest id instead of the end token
        bos_token_id=3,
    )
    vae = AutoencoderKL(  # three levels: 4x down, 8 latent channels (32 per packed token)
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=8,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        norm_num_groups=8,
        sample_size=64,
        shift_factor=0.0,  # measured on the data after the VAE is trained
        scaling_factor=1.0,
    )
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=32,
        num_layers=2,
        num_single_layers=4,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=width,
        pooled_projection_dim=width,
        guidance_embeds=False,  # real classifier-free guidance: true_cfg_scale with an empty negative prompt
        axes_dims_rope=(8, 12, 12),
    )
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=CLIPTextModel(clip),
        tokenizer=word_tokenizer("<s> $A </s>"),
        text_encoder_2=T5EncoderModel(_t5_config(T5Config, width)),
        tokenizer_2=word_tokenizer("$A </s>"),
        transformer=transformer,
    )
    return fit_defaults(pipe)


def build_toy_video(seed: int = 0):
    """The untrained video model: WanPipeline with 5 latent frames of 8 x 8 tokens at 17 x 64 x 64."""
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    latent_channels = 8
    vae = AutoencoderKLWan(  # two levels, both also in time: 4x down in space and time
        base_dim=16,
        z_dim=latent_channels,
        dim_mult=[1, 2, 4],
        num_res_blocks=1,
        temperal_downsample=[True, True],
        latents_mean=[0.0] * latent_channels,  # measured on the data after the VAE is trained
        latents_std=[1.0] * latent_channels,
        scale_factor_spatial=4,
        scale_factor_temporal=4,
    )
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=4,
        attention_head_dim=32,
        in_channels=latent_channels,
        out_channels=latent_channels,
        text_dim=64,
        freq_dim=256,
        ffn_dim=512,
        num_layers=4,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=1024,
    )
    pipe = WanPipeline(
        tokenizer=word_tokenizer("$A </s>"),
        text_encoder=UMT5EncoderModel(_t5_config(UMT5Config, 64)),
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
    )
    return fit_defaults(pipe)


BUILDERS = {"image": build_toy_image, "video": build_toy_video}


def fit_defaults(pipe):
    """A call without a size makes the trained one (FluxPipeline's default would be 512 x 512)."""
    if hasattr(pipe, "default_sample_size") and type(pipe).__name__ == "FluxPipeline":
        pipe.default_sample_size = TOY_GEOMETRY["image"].size // pipe.vae_scale_factor
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe


def shipped_path(kind: str) -> Path:
    """Where the shipped weights of `kind` lie: assets/toy-<kind> of a checkout (or an editable install),
    else the copy a wheel carries inside the package."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not a toy model; accepted: {', '.join(KINDS)}")
    name = f"toy-{kind}"
    candidates = [Path(__file__).resolve().parents[2] / "assets" / name, Path(__file__).resolve().parents[1] / "assets" / name]  # fmt: skip
    for candidate in candidates:
        if (candidate / "model_index.json").is_file():
            return candidate
    raise FileNotFoundError(
        f"the toy {kind} model is not in {candidates[0]}: train it with `attnpack train toy-{kind} "
        f"--out {candidates[0]}`, or use a checkout of attnpack that carries assets/{name}"
    )


def toy_shipped(kind: str) -> bool:
    """Whether the trained toy model of `kind` is in this checkout (or wheel)."""
    try:
        shipped_path(kind)
    except FileNotFoundError:
        return False
    return True


def load_toy(kind: str, path: str | Path | None = None, *, device: str | torch.device | None = None):
    """The trained toy model as a diffusers pipeline, through `from_pretrained` (offline: the files are local)."""
    from diffusers import DiffusionPipeline

    folder = Path(path) if path is not None else shipped_path(kind)
    pipe = DiffusionPipeline.from_pretrained(str(folder))  # float32, as saved
    pipe = fit_defaults(pipe)
    return pipe.to(device) if device is not None else pipe
