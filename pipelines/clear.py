"""CLEAR's high-resolution recipe for FLUX: SDEdit-style upscaling with local attention.

Generate at the model's resolution, resize the image to the target size, noise it to `strength` and
denoise at the target resolution with ClearAttention, proportional attention and NTK-scaled RoPE, with
static (not resolution-dependent) timestep shifting, as the public code's high-resolution notebook does.
"""

from __future__ import annotations

import contextlib
from typing import Any

from ..api import apply
from ..methods.clear import ClearAttention


def clear_upscale(
    pipe,
    image,
    prompt: str | list[str],
    *,
    height: int,
    width: int,
    strength: float = 0.7,
    num_inference_steps: int = 20,
    guidance_scale: float = 7.5,
    radius: float = 16,
    down_factor: int | None = None,
    weights: str | dict | None = None,
    ntk_factor: float = 10.0,
    proportional_attention: bool = True,
    **kwargs: Any,
):
    """Upscale `image` (a PIL image) to `width` x `height` with the FLUX pipeline `pipe`'s components.

    The components are shared, not copied; `pipe` itself is left as it was. Returns the pipeline output.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxImg2ImgPipeline

    if not 0 < strength <= 1:
        raise ValueError(f"clear_upscale: strength={strength!r} must be in (0, 1]")
    components = {
        name: getattr(pipe, name)
        for name in ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "transformer")
    }
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, use_dynamic_shifting=False)
    upscaler = FluxImg2ImgPipeline(scheduler=scheduler, **components)
    upscaler.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
    method = ClearAttention(
        radius=radius,
        down_factor=down_factor,
        weights=weights,
        proportional_attention=proportional_attention,
        ntk_factor=ntk_factor,
    )
    vae = components["vae"]
    tiling = getattr(vae, "use_tiling", True)
    with contextlib.ExitStack() as stack:
        if not tiling:  # large images decode tile by tile; the caller's VAE is put back as it was
            vae.enable_tiling()
            stack.callback(vae.disable_tiling)
        stack.enter_context(apply(upscaler, method))
        return upscaler(
            prompt=prompt,
            image=image.resize((width, height)),
            strength=strength,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
            **kwargs,
        )
