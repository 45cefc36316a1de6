"""Stable Diffusion UNets (SD 1.5, SD 2.x, SDXL) and AnimateDiff's UNetMotionModel.

Their attention modules are diffusers' generic `Attention` with `AttnProcessor2_0`: spatial
self-attention (attn1), cross-attention to the text (attn2), and in AnimateDiff the motion modules'
temporal self-attention, which folds the pixels into the batch and attends along frames.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

from ..layout import Role, TokenLayout, downsampled_grid
from .base import Adapter, AttnCall, Family, project_heads, record_inputs


class AttentionAdapter(Adapter):
    """diffusers' generic `Attention` module as `AttnProcessor2_0` runs it."""

    name = "attention"
    stock_processors = (AttnProcessor2_0, AttnProcessor)

    def project(self, attn, site, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, temb):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_shape = hidden_states.shape
        if hidden_states.ndim == 4:
            batch, channels, height, width = input_shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        query, key, value = project_heads(attn, hidden_states, encoder_hidden_states)

        # AttnProcessor2_0 leaves SDPA's default scale; the classic AttnProcessor uses attn.scale.
        stock = site.stock_processor if site is not None else None
        scale = attn.scale if isinstance(stock, AttnProcessor) else None
        return AttnCall(
            query,
            key,
            value,
            layout=self.layout(site, query.shape, key.shape[1]),
            module=attn,
            site=site,
            context=site.context if site is not None else None,
            attn_mask=attention_mask,
            scale=scale,
            state={"residual": residual, "input_shape": input_shape},
        )

    def layout(self, site, query_shape: torch.Size, key_len: int) -> TokenLayout:
        batch, query_len = query_shape[0], query_shape[1]
        role = site.role if site is not None else Role.SELF
        ctx = site.context if site is not None else None
        if role is Role.TEXT:
            return TokenLayout(role, query_len, key_len, text_len=query_len)
        grid = batch_grid = None
        if ctx is not None and ctx.grid is not None:
            frames = ctx.grid[:-2] if len(ctx.grid) == 3 else None
            spatial = ctx.grid[-2:]
            if role is Role.TEMPORAL:
                pixels = batch // ctx.batch_size if ctx.batch_size else 0
                batch_grid = downsampled_grid(spatial, pixels)
                grid = (query_len,) if batch_grid is not None else None
            else:
                grid = downsampled_grid(spatial, query_len)
                batch_grid = frames if grid is not None else None
        return TokenLayout(role, query_len, key_len, grid=grid, batch_grid=batch_grid)

    def finish(self, call: AttnCall, out: torch.Tensor, extra_out: list[torch.Tensor]) -> torch.Tensor:
        attn = call.module
        hidden_states = out.flatten(2, 3).to(call.query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        input_shape = call.state["input_shape"]
        if len(input_shape) == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(input_shape)
        if attn.residual_connection:
            hidden_states = hidden_states + call.state["residual"]
        return hidden_states / attn.rescale_output_factor


ATTENTION = AttentionAdapter()


class UNetFamily(Family):
    name = "unet"
    title = "Stable Diffusion UNets: SD 1.5, SD 2.x, SDXL, AnimateDiff (UNetMotionModel)"
    denoiser_classes = ("UNet2DConditionModel", "UNetMotionModel")

    def classify(self, name: str, module: torch.nn.Module, processor):
        if type(module) is not Attention or not ATTENTION.reproduces(processor):
            return None
        if "motion_modules" in name:
            return ATTENTION, Role.TEMPORAL
        return ATTENTION, Role.CROSS if module.is_cross_attention else Role.SELF

    def forward_order(self, name: str) -> tuple:
        # Registration order is down, up, mid; the forward pass runs down, mid, up.
        stage = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}.get(name.split(".", 1)[0], 3)
        return (stage,)

    def read_inputs(self, model, inputs: dict[str, Any], ctx) -> None:
        sample = inputs.get("sample")  # (B, C, H, W), or (B, C, F, H, W) for UNetMotionModel
        if sample is None:
            return
        record_inputs(ctx, tuple(sample.shape[2:]), sample.shape[0], inputs.get("encoder_hidden_states"))


FAMILY = UNetFamily()
