"""Several consistent subjects in one image (IR-Diffusion): subjects (name, prompt, box or reference image)
plus a scene prompt -> the scene and a reference sheet, on SDXL-family pipelines and FLUX.

The batch is [reference 1 .. reference n, target]: references are generated from their prompts with one
shared start noise (or are given images, encoded and noised to each step's timestep), the target from
the scene prompt with its own noise, and `IsolationAttention` ties them together. Subject masks come from
the subjects' boxes, from an external `segmenter`, or from attention maps.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..api import STATE_ATTR, apply, attach, remove
from ..families import family_of
from ..methods.isolation import IsolationAttention, IsolationRun, Subject


@dataclass
class MultiSubjectOutput:
    image: Any  # the scene (PIL)
    references: list  # one PIL image per subject
    sheet: Any  # references and scene side by side, boxes drawn (PIL)
    method: IsolationAttention  # with the subjects it used
    masks: dict = field(default_factory=dict)  # masks found from attention maps: "target i" / "reference i"


def load_subjects(path: str | Path) -> list[Subject]:
    """Subjects from a JSON file: a list of {"name", "prompt", "box": [x0, y0, x1, y1]} (box optional)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"subjects file {str(path)!r} cannot be read as JSON: {error}") from error
    if not isinstance(data, list):
        raise ValueError(f"subjects file {str(path)!r} must hold a list of subjects")
    return [Subject.of(entry) for entry in data]


def token_indices(tokenizer, prompt: str, word: str, *, offset: int) -> tuple[int, ...]:
    """Positions of `word`'s tokens in `prompt` as the text encoder sees it (`offset`: tokens the tokenizer
    puts first, 1 for CLIP's start token, 0 for T5)."""
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    target = tokenizer(word, add_special_tokens=False).input_ids
    for start in range(len(ids) - len(target) + 1):
        if ids[start : start + len(target)] == target:
            return tuple(range(offset + start, offset + start + len(target)))
    return ()


def multi_subject(
    pipe,
    subjects: list[Subject | dict],
    prompt: str,
    *,
    references: list | None = None,
    segmenter: Callable[[Any, str], Any] | None = None,
    generator: torch.Generator | None = None,
    height: int | None = None,
    width: int | None = None,
    negative_prompt: str | None = None,
    method: dict[str, Any] | None = None,
    **kwargs: Any,
) -> MultiSubjectOutput:
    """The scene `prompt` with `subjects` kept consistent with their references.

    `references`: per subject a PIL image or None (generated from its prompt). `segmenter(image, name)`
    returns a mask (H, W) of `name` in `image`: with it, a first plain pass generates the references and
    the scene, and the masks come from segmenting them (boxes given by the user win). `method`: settings
    for `IsolationAttention` (start_layer, dropout, cross_attention_blend, ...). Other keyword arguments go
    to the pipeline (UNets: guidance_scale 7.0 unless given). `pipe` is left as it was.
    """
    subjects = [Subject.of(s) for s in subjects]
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"prompt={prompt!r} must be the scene's prompt, a non-empty string")
    references = list(references) if references is not None else [None] * len(subjects)
    if len(references) != len(subjects):
        raise ValueError(
            f"references: {len(references)} given for {len(subjects)} subjects; give one per subject (None: generate)"
        )
    for taken in ("latents", "prompt_embeds", "num_images_per_prompt", "output_type"):
        if taken in kwargs:
            raise ValueError(f"multi_subject makes {taken} itself")
    denoiser = getattr(pipe, "transformer", None)
    denoiser = getattr(pipe, "unet", None) if denoiser is None else denoiser
    family = family_of(denoiser) if isinstance(denoiser, torch.nn.Module) else None
    if family is None or family.name not in IsolationAttention.families:
        raise ValueError(f"multi_subject runs SDXL-family and FLUX pipelines; got {type(pipe).__name__}")
    is_flux = family.name == "flux"
    if not is_flux:
        kwargs.setdefault("guidance_scale", 7.0)  # the public code's setting on Playground v2.5 / SDXL
    height = height or pipe.default_sample_size * pipe.vae_scale_factor
    width = width or pipe.default_sample_size * pipe.vae_scale_factor

    tokenizer, offset = (pipe.tokenizer_2, 0) if is_flux else (pipe.tokenizer, 1)
    for s in subjects:
        s.token_indices = s.token_indices or token_indices(tokenizer, prompt, s.name, offset=offset)
        s.reference_token_indices = s.reference_token_indices or token_indices(
            tokenizer, s.prompt, s.name, offset=offset
        )

    noise = _start_noise(pipe, is_flux, len(subjects), height, width, generator)
    given = {
        i: _encode(pipe, image, is_flux, height, width)
        for i, image in enumerate(references)
        if image is not None
    }
    call = dict(
        prompt=[s.prompt for s in subjects] + [prompt],
        height=height,
        width=width,
        generator=generator,
        **({} if negative_prompt is None else {"negative_prompt": [negative_prompt] * (len(subjects) + 1)}),
        **kwargs,
    )
    if segmenter is not None:
        rehearsal, _ = _run(pipe, None, noise, given, call)
        for i, s in enumerate(subjects):
            if s.reference_mask is None and s.reference_box is None:
                s.reference_mask = _as_mask(segmenter(references[i] or rehearsal[i], s.name), s.name)
            if s.mask is None and s.box is None:
                s.mask = _as_mask(segmenter(rehearsal[-1], s.name), s.name)
    isolation = IsolationAttention(subjects=subjects, **(method or {}))
    images, masks = _run(pipe, isolation, noise, given, call)
    refs = [references[i] or images[i] for i in range(len(subjects))]
    sheet = reference_sheet(refs, images[-1], subjects)
    return MultiSubjectOutput(images[-1], refs, sheet, isolation, masks)


def _run(pipe, method, noise, given, call) -> tuple[list, dict]:
    """The images of one call, and the masks the method found from attention maps."""
    was_attached = getattr(pipe, STATE_ATTR, None) is not None
    latents = noise.clone()
    callback = _noised_references(pipe, given, noise) if given else None
    if given:
        latents = _references_at_start(pipe, latents, given, noise, call)
    extra = (
        {"callback_on_step_end": callback, "callback_on_step_end_tensor_inputs": ["latents"]}
        if callback
        else {}
    )
    try:
        if method is None:
            return list(pipe(latents=latents, output_type="pil", **call, **extra).images), {}
        with apply(pipe, method):
            images = list(pipe(latents=latents, output_type="pil", **call, **extra).images)
        return images, dict(attach(pipe).state_for(method, IsolationRun).found)
    finally:
        if not was_attached:
            remove(pipe)


def _start_noise(pipe, is_flux: bool, n: int, height: int, width: int, generator) -> torch.Tensor:
    """Rows [reference 1 .. n, target]: the references share one noise, the target has its own."""
    from diffusers.utils.torch_utils import randn_tensor

    device, dtype = pipe._execution_device, (pipe.transformer.dtype if is_flux else pipe.unet.dtype)
    if is_flux:
        channels = pipe.transformer.config.in_channels // 4
        draw = lambda: pipe.prepare_latents(1, channels, height, width, dtype, device, generator)[0]  # noqa: E731
    else:
        shape = (
            1,
            pipe.unet.config.in_channels,
            height // pipe.vae_scale_factor,
            width // pipe.vae_scale_factor,
        )
        draw = lambda: randn_tensor(shape, generator=generator, device=device, dtype=dtype)  # noqa: E731
    shared, target = draw(), draw()
    return torch.cat([shared.expand(n, *shared.shape[1:]), target])


def _encode(pipe, image, is_flux: bool, height: int, width: int) -> torch.Tensor:
    """A reference image as clean latents in the denoiser's layout (packed for FLUX)."""
    pixels = pipe.image_processor.preprocess(image, height=height, width=width).to(
        pipe._execution_device, pipe.vae.dtype
    )
    with torch.no_grad():
        latents = pipe.vae.encode(pixels).latent_dist.mode()
    shift = getattr(pipe.vae.config, "shift_factor", None) or 0.0
    latents = (latents - shift) * pipe.vae.config.scaling_factor
    if is_flux:
        _, channels, h, w = latents.shape
        latents = pipe._pack_latents(latents, 1, channels, h, w)
    return latents


def _noise_to(pipe, clean: torch.Tensor, noise: torch.Tensor, index: int) -> torch.Tensor:
    """`clean` noised to the scheduler's step `index` (flow matching: (1 - σ) x0 + σ ε)."""
    scheduler = pipe.scheduler
    if "FlowMatch" in type(scheduler).__name__:
        sigma = scheduler.sigmas[index].to(clean.device, clean.dtype)
        return (1 - sigma) * clean + sigma * noise
    t = scheduler.timesteps[index : index + 1]
    return scheduler.add_noise(clean, noise, t)


def _references_at_start(pipe, latents, given, noise, call) -> torch.Tensor:
    """Given references noised to the first step: a copy of the scheduler says where it starts."""
    import copy

    scheduler = pipe.scheduler
    if "FlowMatch" in type(scheduler).__name__:
        return latents  # flow matching starts at sigma = 1: pure noise, whatever the image
    probe = copy.deepcopy(scheduler)
    probe.set_timesteps(call.get("num_inference_steps", 50), device=latents.device)
    for i, clean in given.items():
        noised = probe.add_noise(clean, noise[i : i + 1], probe.timesteps[:1])
        latents[i : i + 1] = noised / probe.init_noise_sigma  # the pipeline scales by init_noise_sigma
    return latents


def _noised_references(pipe, given, noise):
    def callback(pipeline, step, timestep, tensors):
        latents = tensors["latents"]
        if step + 1 < len(pipeline.scheduler.timesteps):
            for i, clean in given.items():
                latents[i : i + 1] = _noise_to(pipeline, clean, noise[i : i + 1], step + 1)
        return {"latents": latents}

    return callback


def _as_mask(mask, name: str) -> torch.Tensor:
    import numpy as np

    tensor = torch.as_tensor(np.asarray(mask.convert("L")) if hasattr(mask, "convert") else mask)
    if tensor.ndim != 2 or not bool((tensor > 0).any()):
        raise ValueError(f"segmenter found no {name!r}: it must return a non-empty (H, W) mask")
    return tensor.float() / max(float(tensor.max()), 1.0)


def reference_sheet(references: list, scene, subjects: list[Subject]):
    """References and the scene in one row, each subject's box drawn on the scene, names under each."""
    from PIL import Image, ImageDraw

    images = [*references, scene]
    height = max(image.height for image in images)
    sheet = Image.new("RGB", (sum(image.width for image in images), height + 16), "white")
    draw = ImageDraw.Draw(sheet)
    x = 0
    for image, label in zip(images, [s.name for s in subjects] + ["scene"], strict=True):
        sheet.paste(image.convert("RGB"), (x, 0))
        draw.text((x + 2, height + 2), label, fill="black")
        x += image.width
    left = x - scene.width
    for s in subjects:
        if s.box is not None:
            x0, y0, x1, y1 = s.box
            draw.rectangle(
                [
                    left + x0 * scene.width,
                    y0 * scene.height,
                    left + x1 * scene.width - 1,
                    y1 * scene.height - 1,
                ],
                outline="red",
            )
    return sheet
