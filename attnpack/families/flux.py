"""FLUX.1 (FluxTransformer2DModel): double-stream and single-stream blocks of `FluxAttention`.

Both attend over one joint sequence [text, image]. Double-stream blocks project the text with their own
`add_*_proj` layers and return the two streams separately; single-stream blocks get the concatenated
sequence and return it whole, so their text length comes from the context.
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttention, FluxAttnProcessor

from ..layout import Role, TokenLayout
from .base import (
    Adapter,
    AttnCall,
    Family,
    ParallelLayout,
    RotaryTheta,
    context_grid,
    record_inputs,
    sdpa_mask,
)


class FluxAdapter(Adapter):
    name = "flux"
    stock_processors = (FluxAttnProcessor,)

    def project(self, attn, site, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, temb):
        if attn.fused_projections:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query, key, value = (x.unflatten(-1, (-1, attn.head_dim)) for x in (query, key, value))
        query, key = attn.norm_q(query), attn.norm_k(key)

        text_len = None
        if attn.added_kv_proj_dim is not None:
            if attn.fused_projections:
                text_q, text_k, text_v = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
            else:
                text_q = attn.add_q_proj(encoder_hidden_states)
                text_k = attn.add_k_proj(encoder_hidden_states)
                text_v = attn.add_v_proj(encoder_hidden_states)
            text_q, text_k, text_v = (x.unflatten(-1, (-1, attn.head_dim)) for x in (text_q, text_k, text_v))
            text_q, text_k = attn.norm_added_q(text_q), attn.norm_added_k(text_k)
            query = torch.cat([text_q, query], dim=1)
            key = torch.cat([text_k, key], dim=1)
            value = torch.cat([text_v, value], dim=1)
            text_len = encoder_hidden_states.shape[1]

        if rotary_emb is not None:
            query = apply_rotary_emb(query, rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, rotary_emb, sequence_dim=1)

        ctx = site.context if site is not None else None
        if text_len is None and ctx is not None:
            text_len = ctx.text_len
        return AttnCall(
            query,
            key,
            value,
            layout=self.layout(ctx, query.shape[1], text_len),
            module=attn,
            site=site,
            context=ctx,
            attn_mask=sdpa_mask(attention_mask, query, key),
            state={"encoder_hidden_states": encoder_hidden_states},
        )

    def leading_text_len(self, site, encoder_hidden_states) -> int:
        # Single-stream blocks get [text, image] as one sequence; double-stream blocks the text apart.
        if encoder_hidden_states is not None or site is None or site.context is None:
            return 0
        return site.context.text_len or 0

    @staticmethod
    def layout(ctx, seq_len: int, text_len: int | None) -> TokenLayout:
        grid = context_grid(ctx, seq_len - text_len) if text_len is not None else None
        return TokenLayout(Role.JOINT, seq_len, seq_len, grid=grid, text_len=text_len or 0, text_first=True)

    def finish(self, call: AttnCall, out: torch.Tensor, extra_out: list[torch.Tensor]) -> Any:
        attn = call.module
        hidden_states = out.flatten(2, 3).to(call.query.dtype)
        encoder_hidden_states = call.state["encoder_hidden_states"]
        if encoder_hidden_states is None:
            return hidden_states
        text_len = encoder_hidden_states.shape[1]
        encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
            [text_len, hidden_states.shape[1] - text_len], dim=1
        )
        hidden_states = attn.to_out[0](hidden_states.contiguous())
        hidden_states = attn.to_out[1](hidden_states)
        encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
        return hidden_states, encoder_hidden_states


ADAPTER = FluxAdapter()


class FluxFamily(Family):
    name = "flux"
    title = "FLUX.1 (FluxTransformer2DModel)"
    denoiser_classes = ("FluxTransformer2DModel",)
    context_parallel = True  # diffusers' plan splits the text and the image: a rank holds [text_r, image_r]
    deep_layers_start = 19  # the single-stream blocks, after FLUX.1's 19 double-stream blocks

    def rotary(self, model: torch.nn.Module) -> RotaryTheta | None:
        embed = getattr(model, "pos_embed", None)
        return RotaryTheta(self, model, embed) if embed is not None and hasattr(embed, "theta") else None

    def classify(self, name: str, module: torch.nn.Module, processor):
        if type(module) is FluxAttention and ADAPTER.reproduces(processor):
            return ADAPTER, Role.JOINT
        return None

    def parallel_layout(self, call: AttnCall) -> ParallelLayout:
        if call.attn_mask is not None:
            raise ValueError(
                f"{call.site.name}: an attention mask on FLUX under context parallelism is not supported by "
                "attnpack (diffusers splits the tokens, not the mask); run without one"
            )
        ctx = call.context
        text, image = ctx.text_len, math.prod(ctx.grid)
        layout = TokenLayout(
            Role.JOINT, text + image, text + image, grid=ctx.grid, text_len=text, text_first=True
        )
        return ParallelLayout(layout, (text, image), (text, image))

    def read_inputs(self, model, inputs: dict[str, Any], ctx) -> None:
        hidden_states = inputs.get("hidden_states")  # packed: (B, S, C)
        img_ids = inputs.get("img_ids")
        if hidden_states is None:
            return
        grid = None if img_ids is None else self._grid_from_ids(ctx, img_ids)
        record_inputs(ctx, grid, hidden_states.shape[0], inputs.get("encoder_hidden_states"))

    @staticmethod
    def _grid_from_ids(ctx, img_ids: torch.Tensor) -> tuple[int, int]:
        # Packed latents carry no shape; their position ids do (column 1: row, column 2: column).
        # Reading them syncs the device, so do it once per ids tensor: pipelines pass the same one every step.
        cached = ctx.memo.get("flux_ids")
        if cached is not None and cached[0]() is img_ids:
            return cached[1]
        ids = img_ids[0] if img_ids.ndim == 3 else img_ids
        rows, cols = (int(v) + 1 for v in ids[:, 1:3].amax(dim=0).tolist())
        ctx.memo["flux_ids"] = (weakref.ref(img_ids), (rows, cols))
        return rows, cols


FAMILY = FluxFamily()
