"""Distil CLEAR attention into a FLUX transformer, the paper's recipe.

The student is a copy of the transformer running ClearAttention; only its attention projections
(to_q, to_k, to_v, to_out) and, with pooled tokens, the spatial weights train. The dense transformer is the
teacher. Per step, on a noised latent of a teacher image:

    loss = flow matching (student against noise - image)
         + 0.5 x distillation (student against the teacher's prediction)
         + 0.5 x attention (student against teacher attention outputs, every 4th single-stream block)

The result is saved in the released weights' key format, so `ClearAttention(weights=path)` loads it.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..api import apply
from ..methods.clear import ClearAttention, expected_weights

logger = logging.getLogger("attnpack")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass
class DistillResult:
    path: Path
    losses: list[float]


def teacher_images(folder: str | os.PathLike) -> list[tuple[Path, str]]:
    """The images of a folder with their prompts: `name.txt` beside `name.png`, else an empty prompt."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"distill clear: images={str(folder)!r} is not a folder")
    found = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not found:
        raise ValueError(f"distill clear: {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return [
        (p, p.with_suffix(".txt").read_text().strip() if p.with_suffix(".txt").exists() else "")
        for p in found
    ]


def _attention_outputs(transformer, every: int = 4) -> tuple[list[torch.Tensor], list]:
    """Record the outputs of every `every`-th single-stream attention layer (the paper's choice)."""
    outputs, hooks = [], []
    for index, block in enumerate(getattr(transformer, "single_transformer_blocks", [])):
        if index % every == 0:
            hooks.append(block.attn.register_forward_hook(lambda module, args, out: outputs.append(out)))
    return outputs, hooks


def distill_clear(
    pipe,
    images: str | os.PathLike,
    out: str | os.PathLike,
    *,
    radius: float = 16,
    down_factor: int | None = None,
    steps: int = 1000,
    learning_rate: float = 1e-4,
    resolution: int = 1024,
    batch_size: int = 1,
    guidance_scale: float = 3.5,
    max_sequence_length: int = 512,
    mixed_precision: str = "no",
    seed: int = 0,
    overwrite: bool = False,
) -> DistillResult:
    """Train CLEAR attention for `pipe` (a FluxPipeline) on the teacher images in `images`; save to `out`."""
    from accelerate import Accelerator
    from PIL import Image
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from ..bench.report import write_atomically

    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(
            f"distill clear: {out} exists; pass --overwrite to replace it, or choose another --out"
        )
    if steps < 1 or batch_size < 1:
        raise ValueError(f"distill clear: steps={steps} and batch_size={batch_size} must be >= 1")
    samples = teacher_images(images)
    from ..methods.base import AttentionMethod

    if any(isinstance(p, AttentionMethod) for p in pipe.transformer.attn_processors.values()):
        raise ValueError("distill clear: the teacher must be dense; call attnpack.remove(pipe) first")
    accelerator = Accelerator(mixed_precision=mixed_precision)
    device = accelerator.device
    torch.manual_seed(seed)

    # The data, encoded once: latents of the teacher images and the embeddings of their prompts.
    factor = pipe.vae_scale_factor * 2
    size = max(factor, resolution // factor * factor)
    with torch.no_grad():
        arrays = [
            np.asarray(Image.open(p).convert("RGB").resize((size, size)), dtype=np.float32)
            for p, _ in samples
        ]
        pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).div(127.5).sub(1.0)
        pixels = pixels.to(device, pipe.vae.dtype)
        latents = pipe.vae.encode(pixels).latent_dist.sample()
        latents = (latents - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
        prompt_embeds, pooled, text_ids = pipe.encode_prompt(
            [prompt for _, prompt in samples], None, device=device, max_sequence_length=max_sequence_length
        )
    _, channels, height, width = latents.shape
    image_ids = pipe._prepare_latent_image_ids(1, height // 2, width // 2, device, latents.dtype)

    teacher = pipe.transformer.to(device).eval().requires_grad_(False)
    student = copy.deepcopy(teacher)
    apply(student, ClearAttention(radius=radius, down_factor=down_factor))
    processors = {
        m: m.processor for m in student.modules() if isinstance(getattr(m, "processor", None), ClearAttention)
    }
    trainable = expected_weights(ClearAttention(radius=radius, down_factor=down_factor), processors)
    for parameter in trainable.values():
        if mixed_precision == "fp16":  # fp16 training keeps its trainable parameters in float32
            parameter.data = parameter.data.float()
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(trainable.values(), lr=learning_rate)
    student, optimizer = accelerator.prepare(student, optimizer)
    student.train()

    teacher_outputs, teacher_hooks = _attention_outputs(teacher)
    student_outputs, student_hooks = _attention_outputs(accelerator.unwrap_model(student))
    guidance = (
        torch.full((batch_size,), guidance_scale, device=device) if teacher.config.guidance_embeds else None
    )
    losses = []
    try:
        for _ in tqdm(range(steps), desc="distill clear", unit="step"):
            pick = torch.randint(len(samples), (batch_size,))
            x0 = latents[pick]
            noise = torch.randn_like(x0)
            sigma = torch.rand(batch_size, device=device)
            noisy = (1 - sigma[:, None, None, None]) * x0 + sigma[:, None, None, None] * noise
            packed = pipe._pack_latents(noisy, batch_size, channels, height, width)
            inputs = dict(
                hidden_states=packed,
                timestep=sigma,
                guidance=guidance,
                pooled_projections=pooled[pick],
                encoder_hidden_states=prompt_embeds[pick],
                txt_ids=text_ids,
                img_ids=image_ids,
                return_dict=False,
            )
            teacher_outputs.clear()
            student_outputs.clear()
            with torch.no_grad():
                teacher_pred = teacher(**inputs)[0]
            with accelerator.autocast():
                student_pred = student(**inputs)[0]
            target = pipe._pack_latents(noise - x0, batch_size, channels, height, width)
            loss_fm = (student_pred.float() - target.float()).square().mean()
            loss_distill = (student_pred.float() - teacher_pred.float()).square().mean()
            pairs = list(zip(student_outputs, teacher_outputs, strict=True))
            loss_attention = sum((s.float() - t.float()).square().mean() for s, t in pairs) / max(
                1, len(pairs)
            )
            loss = loss_fm + 0.5 * loss_distill + 0.5 * loss_attention
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
    finally:
        for hook in teacher_hooks + student_hooks:
            hook.remove()

    state = {
        key: parameter.detach().to("cpu", torch.float32).contiguous() for key, parameter in trainable.items()
    }
    write_atomically(out, lambda path: save_file(state, str(path)), overwrite)
    logger.info("distill clear: saved %d tensors to %s", len(state), out)
    return DistillResult(out, losses)
