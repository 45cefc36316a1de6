"""Long videos from short-video models: FreeNoise / FreeLong attention, rescheduled noise and prompts that
change along the video (`{frame: prompt}`, interpolated between the keyframes), on AnimateDiff and on
Wan 2.1 / 2.2 text-to-video (windows and prompts in latent frames)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..api import STATE_ATTR, apply, attach, remove
from ..families import family_of
from ..methods.base import AttentionMethod
from ..methods.freenoise import NOISE, FreeNoiseAttention, reschedule_noise


def lerp_prompts(start: int, end: int, first: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """Embeddings for frames start..end (inclusive), linear from `first` to `last` ((1, S, C) each)."""
    alpha = torch.linspace(0, 1, end - start + 1, device=first.device, dtype=torch.float32)
    alpha = alpha.reshape(-1, *([1] * (first.ndim - 1)))
    return ((1 - alpha) * first.float() + alpha * last.float()).to(first.dtype)


def keyframe_prompts(prompt: str | dict[int, str], num_frames: int, name: str = "prompt") -> dict[int, str]:
    """`prompt` as {frame: text}, checked: integer frames in [0, num_frames), frame 0 present, text values."""
    if isinstance(prompt, str):
        return {0: prompt}
    if not isinstance(prompt, dict) or not prompt:
        raise ValueError(f"{name}={prompt!r} must be a string or a non-empty {{frame: prompt}} dict")
    for frame, text in prompt.items():
        if isinstance(frame, bool) or not isinstance(frame, int) or not 0 <= frame < num_frames:
            raise ValueError(
                f"{name}: frame {frame!r} must be an integer in [0, {num_frames}) for num_frames={num_frames}"
            )
        if not isinstance(text, str):
            raise ValueError(
                f"{name}: the prompt for frame {frame} must be a string, got {type(text).__name__}"
            )
    if 0 not in prompt:
        raise ValueError(
            f"{name}: frame 0 needs a prompt (got frames {sorted(prompt)}); the video starts from it"
        )
    return dict(sorted(prompt.items()))


def frame_embeddings(
    embeddings: torch.Tensor,
    frames: list[int],
    num_frames: int,
    interpolate: Callable[[int, int, torch.Tensor, torch.Tensor], torch.Tensor] = lerp_prompts,
) -> torch.Tensor:
    """(num_frames, S, C) from one embedding per keyframe ((K, S, C), frames ascending from 0): interpolated
    between keyframes, the last one held to the end."""
    out = embeddings.new_empty(num_frames, *embeddings.shape[1:])
    keys = [*frames, num_frames - 1] if frames[-1] != num_frames - 1 else frames
    values = list(embeddings) + ([embeddings[-1]] if len(keys) > len(frames) else [])
    if len(keys) == 1:
        return embeddings[:1].expand(num_frames, *embeddings.shape[1:]).clone()
    for i in range(len(keys) - 1):
        out[keys[i] : keys[i + 1] + 1] = interpolate(
            keys[i], keys[i + 1], values[i][None], values[i + 1][None]
        )
    return out


def long_video(
    pipe,
    prompt: str | dict[int, str],
    *,
    num_frames: int,
    method: AttentionMethod | None = None,
    negative_prompt: str | dict[int, str] | None = None,
    noise: str = "shuffle",
    generator: torch.Generator | list[torch.Generator] | None = None,
    interpolate: Callable[[int, int, torch.Tensor, torch.Tensor], torch.Tensor] = lerp_prompts,
    height: int | None = None,
    width: int | None = None,
    motion_injection: bool = False,
    injection_steps: tuple[float, float] = (0.1, 0.3),
    **kwargs: Any,
):
    """A long video from an AnimateDiff or a Wan pipeline: `method` applied for the call (default
    `FreeNoiseAttention()` on AnimateDiff, `FreeNoiseAttention(context_length=21, context_stride=5)` on Wan,
    whose windows count latent frames; also `FreeLongAttention(...)`), noise rescheduled (`noise`:
    "shuffle", "repeat", "random") with the method's window (the defaults' for methods without one), prompts
    per frame (on Wan rounded to latent frames). Other keyword arguments go to the pipeline (num_inference_steps,
    guidance_scale, output_type, ...). Returns its output; `pipe` is left as it was.

    `motion_injection` is FreeNoise's multi-prompt recipe: outside the middle of the run (steps before the
    fraction `injection_steps[0]` and after `injection_steps[1]` of the steps: 5 and 15 of 50) the
    cross-attention of the encoder and the mid-block reads the last keyframe's prompt on every frame,
    while the decoder keeps the per-frame prompts; the unconditional pass is left alone. The paper's
    two-prompt layout for F frames is {0: first, 3F/8: first, 5F/8 - 1: second}."""
    transformer = getattr(pipe, "transformer", None)
    is_wan = (
        isinstance(transformer, torch.nn.Module) and getattr(family_of(transformer), "name", None) == "wan"
    )
    if not is_wan and getattr(pipe, "motion_adapter", None) is None:
        raise ValueError(f"long_video runs AnimateDiff and Wan pipelines; got {type(pipe).__name__}")
    if method is None:
        method = FreeNoiseAttention(context_length=21, context_stride=5) if is_wan else FreeNoiseAttention()
    if noise not in NOISE:
        raise ValueError(f"noise={noise!r} is not accepted; choose one of {', '.join(map(repr, NOISE))}")
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames={num_frames!r} must be a positive integer")
    for taken in ("prompt_embeds", "negative_prompt_embeds", "latents", "num_videos_per_prompt"):
        if taken in kwargs:
            raise ValueError(f"long_video makes {taken} itself; pass prompts, noise and generator instead")
    early, late = injection_steps
    if not 0 <= early <= late <= 1:
        raise ValueError(f"injection_steps={injection_steps!r} must be two fractions 0 <= a <= b <= 1")
    if is_wan:
        if not isinstance(negative_prompt, str | None) or motion_injection:
            raise ValueError(
                "long_video on Wan takes one negative prompt (a string) and no motion_injection (an AnimateDiff "
                "recipe: its encoder / decoder split has no Wan counterpart)"
            )
        prompts = keyframe_prompts(prompt, num_frames)
        return _wan(
            pipe, prompts, negative_prompt, num_frames, method, noise, generator, height, width, kwargs
        )
    prompts = keyframe_prompts(prompt, num_frames)
    negatives = keyframe_prompts(negative_prompt or "", num_frames, "negative_prompt")
    batch = len(generator) if isinstance(generator, list) else 1

    device = pipe._execution_device
    height = height or pipe.unet.config.sample_size * pipe.vae_scale_factor
    width = width or pipe.unet.config.sample_size * pipe.vae_scale_factor
    latents = rescheduled_noise(
        (batch, pipe.unet.config.in_channels, num_frames, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor),
        method, noise, generator, device, pipe.unet.dtype, default_window=(16, 4),
    )  # fmt: skip

    positive, _ = pipe.encode_prompt(list(prompts.values()), device, 1, False)
    negative, _ = pipe.encode_prompt(list(negatives.values()), device, 1, False)
    per_frame = {
        "positive": frame_embeddings(positive, list(prompts), num_frames, interpolate),
        "negative": frame_embeddings(negative, list(negatives), num_frames, interpolate),
    }

    def per_frame_text(module, args, inputs):
        text = inputs.get("encoder_hidden_states")
        rows = [per_frame["positive"]] * batch
        if text is not None and text.shape[0] == 2 * batch * num_frames:  # [negative; positive], frames inner
            rows = [per_frame["negative"]] * batch + rows
        replacement = torch.cat(rows).to(text.dtype)
        if replacement.shape != text.shape:
            raise RuntimeError(
                f"long_video: the UNet got text of shape {tuple(text.shape)}, expected {tuple(replacement.shape)}"
            )
        return args, inputs | {"encoder_hidden_states": replacement}

    was_attached = getattr(pipe, STATE_ATTR, None) is not None
    hooks = [pipe.unet.register_forward_pre_hook(per_frame_text, with_kwargs=True)]
    if motion_injection:
        ctx = attach(pipe)
        target = per_frame["positive"][-1:].expand(num_frames, -1, -1)

        def inject(module, args, inputs):
            text = inputs.get("encoder_hidden_states")
            step, steps = ctx.step_index, ctx.num_steps
            if text is None or step is None or early * steps <= step <= late * steps:
                return None
            conditional = text.shape[0] - batch * num_frames  # [negative; positive] with guidance
            replaced = text.clone()
            replaced[conditional:] = target.to(text.dtype).repeat(batch, 1, 1)
            return args, inputs | {"encoder_hidden_states": replaced}

        for name, module in pipe.unet.named_modules():
            if (
                name.startswith(("down_blocks", "mid_block"))
                and "motion_modules" not in name
                and name.endswith("attn2")
            ):
                hooks.append(module.register_forward_pre_hook(inject, with_kwargs=True))
    return _call(
        pipe,
        method,
        hooks,
        was_attached,
        prompt_embeds=positive[:1].expand(batch, -1, -1),
        negative_prompt_embeds=negative[:1].expand(batch, -1, -1),
        latents=latents,
        generator=generator,
        num_frames=num_frames,
        height=height,
        width=width,
        **kwargs,
    )


def _call(pipe, method, hooks, was_attached: bool, **call):
    """The pipeline call with the method applied; afterwards the hooks go, and attnpack too unless the
    pipeline had it before."""
    try:
        with apply(pipe, method):
            return pipe(**call)
    finally:
        for hook in hooks:
            hook.remove()
        if not was_attached:
            remove(pipe)


def rescheduled_noise(shape, method, noise, generator, device, dtype, default_window: tuple[int, int]):
    """Start noise of `shape` (B, C, F, H, W), rescheduled with the method's window (or `default_window`)."""
    from diffusers.utils.torch_utils import randn_tensor

    latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
    length = getattr(method, "context_length", None) or default_window[0]
    stride = getattr(method, "context_stride", default_window[1])
    return reschedule_noise(latents, length, stride, noise, generator)  # the pipeline scales it


def _wan(pipe, prompts, negative_prompt, num_frames, method, noise, generator, height, width, kwargs):
    height, width = height or 480, width or 832
    batch = len(generator) if isinstance(generator, list) else 1
    latent_frames = (num_frames - 1) // pipe.vae_scale_factor_temporal + 1
    spatial = pipe.vae_scale_factor_spatial
    shape = (batch, pipe.transformer.config.in_channels, latent_frames, height // spatial, width // spatial)
    latents = rescheduled_noise(
        shape, method, noise, generator, pipe._execution_device, torch.float32, (21, 5)
    )
    was_attached = getattr(pipe, STATE_ATTR, None) is not None
    hooks = []
    if len(prompts) > 1 and pipe.transformer.config.image_dim is not None:
        raise ValueError(
            "long_video: frame-keyed prompts run on Wan text-to-video; image-to-video takes one prompt"
        )
    if len(prompts) > 1:
        prompt_embeds, hooks = _wan_frame_prompts(pipe, prompts, latent_frames, batch, kwargs)
        text = {"prompt_embeds": prompt_embeds}
    else:
        text = {"prompt": [prompts[0]] * batch}
    return _call(
        pipe,
        method,
        hooks,
        was_attached,
        **text,
        negative_prompt=None if negative_prompt is None else [negative_prompt] * batch,
        latents=latents,
        num_frames=num_frames,
        height=height,
        width=width,
        generator=generator,
        **kwargs,
    )


def _wan_frame_prompts(pipe, prompts: dict[int, str], latent_frames: int, batch: int, kwargs: dict):
    """Prompts per latent frame on Wan: keyframes rounded to latent frames (4 video frames each) and
    interpolated between; the conditional pass's cross-attention then runs per frame (each frame's tokens
    as their own batch row, with their frame's text). Returns the first keyframe's embeddings for the
    pipeline and the hooks to remove."""
    device = pipe._execution_device
    length = kwargs.get("max_sequence_length", 512)
    keyframes, _ = pipe.encode_prompt(
        list(prompts.values()), do_classifier_free_guidance=False, max_sequence_length=length, device=device
    )
    latent_keys = {round(frame / pipe.vae_scale_factor_temporal): i for i, frame in enumerate(prompts)}
    per_frame = frame_embeddings(keyframes[list(latent_keys.values())], list(latent_keys), latent_frames)
    first = keyframes[:1].expand(batch, -1, -1)
    state: dict[str, Any] = {"text": None, "projected": {}}

    def pick_pass(module, args, inputs):
        text = inputs.get("encoder_hidden_states")
        conditional = text is not None and torch.equal(text, first.to(text.dtype))
        if conditional and module not in state["projected"]:
            embedder = module.condition_embedder.text_embedder
            state["projected"][module] = embedder(per_frame.to(text.device, text.dtype))
        state["text"] = state["projected"][module] if conditional else None

    def per_frame_in(module, args):
        if state["text"] is None:
            return None
        hidden = args[0]
        rows = hidden.shape[0] * latent_frames
        state["shape"] = hidden.shape
        text = state["text"].repeat(hidden.shape[0], 1, 1)
        return (hidden.reshape(rows, -1, hidden.shape[-1]), text, *args[2:])

    def per_frame_out(module, args, output):
        if state["text"] is None:
            return None
        return output.reshape(state["shape"])

    hooks = []
    for name in ("transformer", "transformer_2"):
        model = getattr(pipe, name, None)
        if model is None:
            continue
        hooks.append(model.register_forward_pre_hook(pick_pass, with_kwargs=True))
        for block in model.blocks:
            hooks.append(block.attn2.register_forward_pre_hook(per_frame_in))
            hooks.append(block.attn2.register_forward_hook(per_frame_out))
    return first, hooks
