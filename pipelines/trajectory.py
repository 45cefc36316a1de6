"""Trajectory-controlled video (DiTraj): a prompt, or foreground / background prompts, and a trajectory
(keyframe boxes or a point track) -> a video whose object follows the path, and a picture of the plan.

Works on Wan 2.1 / 2.2 text-to-video (foreground / background text separation included), CogVideoX and
HunyuanVideo (STD-RoPE and the R-token mask). `split_prompt` asks a local instruction model, through
transformers, to split one prompt into the two.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..api import STATE_ATTR, apply, attach, remove
from ..families import family_of
from ..methods.trajectory import DEFAULT_VARIANT, TrajectoryRoPE, trajectory_picture

SPLIT_MODEL = "Qwen/Qwen2.5-1.5B-Instruct"
SPLIT_INSTRUCTION = (
    "Split the video description into the object that moves (foreground) and the scene around it "
    '(background). Answer with JSON only: {"foreground": "...", "background": "..."}.'
)


@dataclass
class TrajectoryOutput:
    frames: Any  # the pipeline's frames
    plan: Any  # PIL: the planned boxes over sampled frames
    method: TrajectoryRoPE


def split_prompt(prompt: str, model: str = SPLIT_MODEL, *, max_new_tokens: int = 96) -> tuple[str, str]:
    """(foreground, background) from one prompt, by a local instruction model (a Hub id or folder)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model)
        llm = AutoModelForCausalLM.from_pretrained(model)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"split_prompt: the instruction model {model!r} cannot be loaded ({str(error).splitlines()[0]}); "
            f"download it first (huggingface-cli download {model}) or pass fg_prompt and bg_prompt"
        ) from error
    messages = [{"role": "system", "content": SPLIT_INSTRUCTION}, {"role": "user", "content": prompt}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        output = llm.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return parse_split(answer, model)


def parse_split(answer: str, model: str = "the model") -> tuple[str, str]:
    found = re.search(r"\{.*\}", answer, flags=re.S)
    try:
        parsed = json.loads(found.group(0)) if found else None
        foreground, background = parsed["foreground"], parsed["background"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ValueError(
            f"split_prompt: {model} did not answer with {{'foreground', 'background'}} JSON: {answer[:200]!r}; "
            "pass fg_prompt and bg_prompt yourself"
        ) from None
    if not (isinstance(foreground, str) and isinstance(background, str) and foreground and background):
        raise ValueError(f"split_prompt: {model} gave an empty or non-text part: {parsed!r}")
    return foreground, background


def trajectory_video(
    pipe,
    *,
    trajectory: list | None = None,
    points: list | None = None,
    box_size: tuple[float, float] = (0.2, 0.2),
    prompt: str | None = None,
    fg_prompt: str | None = None,
    bg_prompt: str | None = None,
    splitter: str | Callable[[str], tuple[str, str]] | None = None,
    rope_steps: int = 5,
    mask_steps: int = 30,
    frames_per_latent: int | None = None,
    variant: str = DEFAULT_VARIANT,
    **kwargs: Any,
) -> TrajectoryOutput:
    """A video whose foreground follows `trajectory` (keyframes [[frame, y1, y2, x1, x2], ...]) or `points`
    (one point track). Text: `prompt`, and for Wan optionally `fg_prompt` + `bg_prompt` (or `splitter`: a
    model id for `split_prompt`, or a callable prompt -> (fg, bg)). Other keyword arguments go to the
    pipeline (num_frames, height, width, num_inference_steps, guidance_scale, generator, ...).
    `frames_per_latent`: video frames per latent frame, None or what the pipeline's VAE and temporal patch
    imply (anything else is refused); `variant`: TrajectoryRoPE's, "official" or "attnpack"."""
    transformer = getattr(pipe, "transformer", None)
    family = family_of(transformer) if isinstance(transformer, torch.nn.Module) else None
    if family is None or family.name not in TrajectoryRoPE.families:
        raise ValueError(
            f"trajectory_video runs Wan, CogVideoX and HunyuanVideo pipelines; got {type(pipe).__name__}"
        )
    if (fg_prompt is None) != (bg_prompt is None):
        raise ValueError("give both fg_prompt and bg_prompt, or neither")
    if splitter is not None and fg_prompt is None:
        if prompt is None:
            raise ValueError("splitter needs prompt, the description to split")
        fg_prompt, bg_prompt = (
            split_prompt(prompt, splitter) if isinstance(splitter, str) else splitter(prompt)
        )
    if prompt is None:
        if fg_prompt is None:
            raise ValueError("give prompt, or fg_prompt and bg_prompt")
        prompt = f"{fg_prompt}, {bg_prompt}"
    is_wan = family.name == "wan"
    if fg_prompt is not None and not is_wan:
        raise ValueError(
            "foreground / background prompts run on Wan; CogVideoX and HunyuanVideo take one prompt"
        )
    vae_temporal = getattr(pipe, "vae_scale_factor_temporal", 4)
    patch_t = getattr(pipe.transformer.config, "patch_size_t", None) or 1
    per_latent = vae_temporal * patch_t
    if frames_per_latent is not None and frames_per_latent != per_latent:
        raise ValueError(
            f"trajectory_video: frames_per_latent={frames_per_latent!r} does not match this pipeline, whose "
            f"latent frames hold {per_latent} video frames (VAE temporal scale {vae_temporal} x temporal patch "
            f"{patch_t}); accepted: None or {per_latent}"
        )
    method = TrajectoryRoPE(
        trajectory=trajectory or [], points=points, box_size=box_size, rope_steps=rope_steps,
        mask_steps=mask_steps, frames_per_latent=per_latent, fg_prompt=fg_prompt, bg_prompt=bg_prompt,
        variant=variant,
    )  # fmt: skip
    num_frames = kwargs.get("num_frames", 81 if is_wan else 49)
    was_attached = getattr(pipe, STATE_ATTR, None) is not None
    hooks = []
    call = dict(kwargs)
    if fg_prompt is not None:
        hooks, call = _separated_text(pipe, method, prompt, fg_prompt, bg_prompt, call)
    else:
        call["prompt"] = prompt
    try:
        with apply(pipe, method):
            frames = pipe(**call).frames
    finally:
        for hook in hooks:
            hook.remove()
        if not was_attached:
            remove(pipe)
    return TrajectoryOutput(frames, trajectory_picture(method.keyframes, num_frames), method)


def _separated_text(pipe, method: TrajectoryRoPE, prompt: str, fg: str, bg: str, call: dict):
    """Wan: the conditional pass reads [background; foreground] text for the first `mask_steps`."""
    device = pipe._execution_device
    length = call.get("max_sequence_length", 512)
    encode = lambda text: pipe.encode_prompt(  # noqa: E731
        text, do_classifier_free_guidance=False, max_sequence_length=length, device=device
    )[0]
    base, background, foreground = encode(prompt), encode(bg), encode(fg)
    separated = torch.cat([background, foreground], dim=1)
    parts = (background.shape[1], foreground.shape[1])
    ctx = attach(pipe)  # its denoiser hooks run before `swap` and reset ctx.text_parts at every call

    def swap(module, args, inputs):
        text = inputs.get("encoder_hidden_states")
        if (
            text is None
            or (ctx.step_index or 0) >= method.mask_steps
            or not torch.equal(text, base.to(text.dtype))
        ):
            return None
        ctx.text_parts = parts
        return args, inputs | {"encoder_hidden_states": separated.to(text.dtype)}

    hooks = [
        getattr(pipe, name).register_forward_pre_hook(swap, with_kwargs=True)
        for name in ("transformer", "transformer_2")
        if getattr(pipe, name, None) is not None
    ]
    return hooks, call | {"prompt_embeds": base}
