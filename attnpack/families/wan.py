"""Wan 2.1 / 2.2 (WanTransformer3DModel): `WanAttention` self-attention over the video tokens (attn1) and
cross-attention to the text (attn2). In I2V models attn2 also attends to the CLIP image context through
its own `add_k_proj` / `add_v_proj`; the two outputs are added.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from diffusers.models.transformers.transformer_wan import WanAttention, WanAttnProcessor

from ..layout import Role, TokenLayout
from .base import (
    Adapter,
    AttnCall,
    Family,
    ParallelLayout,
    RotaryModule,
    context_grid,
    record_inputs,
    sdpa_mask,
    unflatten_heads,
)

# WanAttnProcessor's rule: the text context is the last 512 tokens, the image context what comes before.
TEXT_CONTEXT_LEN = 512


def apply_wan_rotary(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's RoPE on interleaved pairs, as WanAttnProcessor applies it. x: (B, S, H, D)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class WanAdapter(Adapter):
    name = "wan"
    stock_processors = (WanAttnProcessor,)

    def project(self, attn, site, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, temb):
        image_context = None
        if attn.add_k_proj is not None:
            image_len = encoder_hidden_states.shape[1] - TEXT_CONTEXT_LEN
            image_context = encoder_hidden_states[:, :image_len]
            encoder_hidden_states = encoder_hidden_states[:, image_len:]

        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if attn.fused_projections and not attn.is_cross_attention:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        elif attn.fused_projections:
            query = attn.to_q(hidden_states)
            key, value = attn.to_kv(context).chunk(2, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (unflatten_heads(x, attn.heads) for x in (query, key, value))

        if rotary_emb is not None:
            query = apply_wan_rotary(query, *rotary_emb)
            key = apply_wan_rotary(key, *rotary_emb)

        extra_context = []
        if image_context is not None:
            if attn.fused_projections:
                image_key, image_value = attn.to_added_kv(image_context).chunk(2, dim=-1)
            else:
                image_key, image_value = attn.add_k_proj(image_context), attn.add_v_proj(image_context)
            image_key = attn.norm_added_k(image_key)
            extra_context.append(
                (unflatten_heads(image_key, attn.heads), unflatten_heads(image_value, attn.heads))
            )

        ctx = site.context if site is not None else None
        role = Role.CROSS if encoder_hidden_states is not None else Role.SELF
        grid = context_grid(ctx, query.shape[1])
        return AttnCall(
            query,
            key,
            value,
            layout=TokenLayout(role, query.shape[1], key.shape[1], grid=grid),
            module=attn,
            site=site,
            context=ctx,
            attn_mask=sdpa_mask(attention_mask, query, key),
            extra_context=extra_context,
        )

    def finish(self, call: AttnCall, out: torch.Tensor, extra_out: list[torch.Tensor]) -> torch.Tensor:
        attn = call.module
        hidden_states = out.flatten(2, 3).type_as(call.query)
        for image_out in extra_out:
            hidden_states = hidden_states + image_out.flatten(2, 3).type_as(call.query)
        hidden_states = attn.to_out[0](hidden_states)
        return attn.to_out[1](hidden_states)


ADAPTER = WanAdapter()


class WanFamily(Family):
    name = "wan"
    title = "Wan 2.1 / 2.2 (WanTransformer3DModel; T2V and I2V)"
    denoiser_classes = ("WanTransformer3DModel",)
    context_parallel = True  # diffusers' plan splits the video tokens; cross-attention keeps the whole text

    def rotary(self, model: torch.nn.Module) -> RotaryModule:
        return RotaryModule(self, model, model.rope)  # (cos, sin), one row per video token

    def classify(self, name: str, module: torch.nn.Module, processor):
        if type(module) is WanAttention and ADAPTER.reproduces(processor):
            return ADAPTER, Role.CROSS if module.is_cross_attention else Role.SELF
        return None

    def parallel_layout(self, call: AttnCall) -> ParallelLayout:
        grid = call.context.grid
        video = math.prod(grid)
        if call.layout.role is Role.CROSS:  # diffusers runs it per rank: the rank's video rows, all the text
            return ParallelLayout(
                TokenLayout(Role.CROSS, video, call.key.shape[1], grid=grid), (video,), None
            )
        return ParallelLayout(TokenLayout(Role.SELF, video, video, grid=grid), (video,), (video,))

    def read_inputs(self, model, inputs: dict[str, Any], ctx) -> None:
        hidden_states = inputs.get("hidden_states")  # (B, C, F, H, W)
        if hidden_states is None:
            return
        p_t, p_h, p_w = model.config.patch_size
        batch, _, frames, height, width = hidden_states.shape
        grid = (frames // p_t, height // p_h, width // p_w)
        record_inputs(ctx, grid, batch, inputs.get("encoder_hidden_states"))


FAMILY = WanFamily()
