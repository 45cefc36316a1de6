"""Stable Diffusion 3 / 3.5 (SD3Transformer2DModel): joint [image, text] attention through diffusers'
`Attention` with `JointAttnProcessor2_0`, image first. SD 3.5's dual-attention blocks add a second
self-attention over the image alone (attn2), which the same processor runs without a context.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.attention_processor import Attention, JointAttnProcessor2_0

from ..layout import Role, TokenLayout
from .base import (
    Adapter,
    AttnCall,
    Family,
    context_grid,
    project_context_heads,
    project_heads,
    record_inputs,
)


class SD3Adapter(Adapter):
    name = "sd3"
    stock_processors = (JointAttnProcessor2_0,)

    def project(self, attn, site, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, temb):
        image_len = hidden_states.shape[1]
        query, key, value = project_heads(attn, hidden_states, hidden_states)
        text_len = 0
        if encoder_hidden_states is not None:
            text_q, text_k, text_v = project_context_heads(attn, encoder_hidden_states)
            query = torch.cat([query, text_q], dim=1)
            key = torch.cat([key, text_k], dim=1)
            value = torch.cat([value, text_v], dim=1)
            text_len = encoder_hidden_states.shape[1]

        ctx = site.context if site is not None else None
        seq_len = query.shape[1]
        role = Role.JOINT if text_len else Role.SELF
        grid = context_grid(ctx, image_len)
        layout = TokenLayout(role, seq_len, seq_len, grid=grid, text_len=text_len, text_first=not text_len)
        return AttnCall(
            query,
            key,
            value,
            layout=layout,
            module=attn,
            site=site,
            context=ctx,
            attn_mask=attention_mask,
            state={"image_len": image_len, "has_context": encoder_hidden_states is not None},
        )

    def finish(self, call: AttnCall, out: torch.Tensor, extra_out: list[torch.Tensor]):
        attn = call.module
        hidden_states = out.flatten(2, 3).to(call.query.dtype)
        encoder_hidden_states = None
        if call.state["has_context"]:
            image_len = call.state["image_len"]
            hidden_states, encoder_hidden_states = hidden_states[:, :image_len], hidden_states[:, image_len:]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return (hidden_states, encoder_hidden_states) if call.state["has_context"] else hidden_states


ADAPTER = SD3Adapter()


class SD3Family(Family):
    name = "sd3"
    title = "Stable Diffusion 3 / 3.5 (SD3Transformer2DModel)"
    denoiser_classes = ("SD3Transformer2DModel",)

    def classify(self, name: str, module: torch.nn.Module, processor):
        if type(module) is not Attention or not ADAPTER.reproduces(processor):
            return None
        return ADAPTER, Role.JOINT if module.add_q_proj is not None else Role.SELF

    def read_inputs(self, model, inputs: dict[str, Any], ctx) -> None:
        hidden_states = inputs.get("hidden_states")  # (B, C, H, W)
        if hidden_states is None:
            return
        patch = model.config.patch_size
        batch, _, height, width = hidden_states.shape
        record_inputs(ctx, (height // patch, width // patch), batch, inputs.get("encoder_hidden_states"))


FAMILY = SD3Family()
