"""CogVideoX 1.0 / 1.5 (CogVideoXTransformer3DModel): one joint sequence [text, video] per block, through
diffusers' generic `Attention` with `CogVideoXAttnProcessor2_0`. RoPE (5B models) touches video tokens only.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.attention_processor import Attention, CogVideoXAttnProcessor2_0
from diffusers.models.embeddings import apply_rotary_emb

from ..layout import Role, TokenLayout
from .base import (
    Adapter,
    AttnCall,
    Family,
    RotaryArgument,
    context_grid,
    project_heads,
    record_inputs,
)


class CogVideoXAdapter(Adapter):
    name = "cogvideox"
    stock_processors = (CogVideoXAttnProcessor2_0,)

    def project(self, attn, site, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, temb):
        text_len = encoder_hidden_states.shape[1]
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch_size, sequence_length, _ = hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        query, key, value = project_heads(attn, hidden_states, hidden_states)

        if rotary_emb is not None:
            video = slice(text_len, None)
            query = torch.cat(
                [query[:, :text_len], apply_rotary_emb(query[:, video], rotary_emb, sequence_dim=1)], 1
            )
            if not attn.is_cross_attention:
                key = torch.cat(
                    [key[:, :text_len], apply_rotary_emb(key[:, video], rotary_emb, sequence_dim=1)], 1
                )

        ctx = site.context if site is not None else None
        grid = context_grid(ctx, sequence_length - text_len)
        return AttnCall(
            query,
            key,
            value,
            layout=TokenLayout(Role.JOINT, sequence_length, sequence_length, grid=grid, text_len=text_len),
            module=attn,
            site=site,
            context=ctx,
            attn_mask=attention_mask,
            state={"text_len": text_len},
        )

    def finish(self, call: AttnCall, out: torch.Tensor, extra_out: list[torch.Tensor]):
        attn = call.module
        hidden_states = out.flatten(2, 3)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        text_len = call.state["text_len"]
        encoder_hidden_states, hidden_states = hidden_states.split(
            [text_len, hidden_states.shape[1] - text_len], dim=1
        )
        return hidden_states, encoder_hidden_states


ADAPTER = CogVideoXAdapter()


class CogVideoXFamily(Family):
    name = "cogvideox"
    title = "CogVideoX 1.0 / 1.5 (CogVideoXTransformer3DModel)"
    denoiser_classes = ("CogVideoXTransformer3DModel",)

    def rotary(self, model: torch.nn.Module) -> RotaryArgument:
        # The pipeline computes the tables (5B models; None for 2B) and passes them to the forward.
        return RotaryArgument(self, model, "image_rotary_emb")

    def classify(self, name: str, module: torch.nn.Module, processor):
        if type(module) is Attention and ADAPTER.reproduces(processor):
            return ADAPTER, Role.JOINT
        return None

    def read_inputs(self, model, inputs: dict[str, Any], ctx) -> None:
        hidden_states = inputs.get("hidden_states")  # (B, F, C, H, W)
        if hidden_states is None:
            return
        p, p_t = model.config.patch_size, model.config.patch_size_t
        batch, frames, _, height, width = hidden_states.shape
        frames = frames if p_t is None else -(-frames // p_t)
        record_inputs(ctx, (frames, height // p, width // p), batch, inputs.get("encoder_hidden_states"))


FAMILY = CogVideoXFamily()
