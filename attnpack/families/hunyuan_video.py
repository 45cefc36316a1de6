"""HunyuanVideo (HunyuanVideoTransformer3DModel): one joint sequence [video, text] per block through
diffusers' `Attention` with `HunyuanVideoAttnProcessor2_0`, text last and padded text keys masked out.
The text token refiner in front of the blocks is plain `Attention` over text tokens only.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0

from ..layout import Role, TokenLayout
from .base import (
    Adapter,
    AttnCall,
    Family,
    context_grid,
    project_context_heads,
    project_heads,
    record_inputs,
    sdpa_mask,
)
from .unet import ATTENTION


class HunyuanVideoAdapter(Adapter):
    name = "hunyuan_video"
    stock_processors = (HunyuanVideoAttnProcessor2_0,)

    def project(self, attn, site, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, temb):
        # Single-stream blocks project [video, text] with one set of weights, double-stream blocks the
        # text with add_*_proj.
        single_stream = attn.add_q_proj is None and encoder_hidden_states is not None
        if single_stream:
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)

        query, key, value = project_heads(attn, hidden_states, hidden_states)

        text_len = 0 if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        if rotary_emb is not None:
            video_len = query.shape[1] - (text_len if single_stream else 0)
            query = _rotate_video(query, video_len, rotary_emb)
            key = _rotate_video(key, video_len, rotary_emb)

        if attn.add_q_proj is not None and encoder_hidden_states is not None:
            text_q, text_k, text_v = project_context_heads(attn, encoder_hidden_states)
            query = torch.cat([query, text_q], dim=1)
            key = torch.cat([key, text_k], dim=1)
            value = torch.cat([value, text_v], dim=1)

        ctx = site.context if site is not None else None
        seq_len = query.shape[1]
        grid = context_grid(ctx, seq_len - text_len)
        layout = TokenLayout(Role.JOINT, seq_len, seq_len, grid=grid, text_len=text_len, text_first=False)
        return AttnCall(
            query,
            key,
            value,
            layout=layout,
            module=attn,
            site=site,
            context=ctx,
            attn_mask=sdpa_mask(attention_mask, query, key),
            state={"text_len": text_len if encoder_hidden_states is not None else None},
        )

    def finish(self, call: AttnCall, out: torch.Tensor, extra_out: list[torch.Tensor]):
        attn = call.module
        hidden_states = out.flatten(2, 3).to(call.query.dtype)
        text_len = call.state["text_len"]
        if text_len is None:
            return hidden_states, None
        hidden_states, encoder_hidden_states = hidden_states[:, :-text_len], hidden_states[:, -text_len:]
        if getattr(attn, "to_out", None) is not None:
            hidden_states = attn.to_out[0](hidden_states)
            hidden_states = attn.to_out[1](hidden_states)
        if getattr(attn, "to_add_out", None) is not None:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states


def _rotate_video(x: torch.Tensor, video_len: int, rotary_emb) -> torch.Tensor:
    """RoPE on the first `video_len` tokens; the text after them stays as it is."""
    if video_len == x.shape[1]:
        return apply_rotary_emb(x, rotary_emb, sequence_dim=1)
    return torch.cat(
        [apply_rotary_emb(x[:, :video_len], rotary_emb, sequence_dim=1), x[:, video_len:]], dim=1
    )


ADAPTER = HunyuanVideoAdapter()


class HunyuanVideoFamily(Family):
    name = "hunyuan_video"
    title = "HunyuanVideo (HunyuanVideoTransformer3DModel)"
    denoiser_classes = ("HunyuanVideoTransformer3DModel",)

    def classify(self, name: str, module: torch.nn.Module, processor):
        if type(module) is not Attention:
            return None
        if name.startswith("context_embedder."):
            return (ATTENTION, Role.TEXT) if ATTENTION.reproduces(processor) else None
        return (ADAPTER, Role.JOINT) if ADAPTER.reproduces(processor) else None

    def read_inputs(self, model, inputs: dict[str, Any], ctx) -> None:
        hidden_states = inputs.get("hidden_states")  # (B, C, F, H, W)
        if hidden_states is None:
            return
        p, p_t = model.config.patch_size, model.config.patch_size_t
        batch, _, frames, height, width = hidden_states.shape
        record_inputs(
            ctx, (frames // p_t, height // p, width // p), batch, inputs.get("encoder_hidden_states")
        )


FAMILY = HunyuanVideoFamily()
