"""HunyuanVideo (HunyuanVideoTransformer3DModel): one joint sequence [video, text] per block through
diffusers' `Attention` with `HunyuanVideoAttnProcessor2_0`, text last and padded text keys masked out.
The text token refiner in front of the blocks is plain `Attention` over text tokens only.

Context parallelism: diffusers gives HunyuanVideo no `cp_plan`; `CP_PLAN` here splits the patch-embedded
video, the refined text and the rotary tables, and gathers after `proj_out`. Under it a rank holds
[video_r, text_r]. The model builds its text mask from the *total* count of real text tokens and the
rank's own positions, which is right on rank 0 only, so diffusers' stock processor cannot run any plan that
splits the text (and one that does not split it would count the text once per rank): attnpack's adapter
reads the real text tokens from the context instead, and `check_parallel` refuses stock processors there.
"""

from __future__ import annotations

import math
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
    ParallelLayout,
    RotaryModule,
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


def _cp_plan() -> dict:
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

    tokens = ContextParallelInput(split_dim=1, expected_dims=3, split_output=True)  # (B, S, C) outputs
    table = ContextParallelInput(split_dim=0, expected_dims=2, split_output=True)  # (S, D) rotary tables
    return {
        "x_embedder": {0: tokens},
        "context_embedder": {0: tokens},  # after the refiner, which attends over the whole text
        "rope": {0: table, 1: table},
        "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
    }


class HunyuanVideoFamily(Family):
    name = "hunyuan_video"
    title = "HunyuanVideo (HunyuanVideoTransformer3DModel)"
    denoiser_classes = ("HunyuanVideoTransformer3DModel",)
    context_parallel = True  # with attnpack's plan (context_parallel_plan) and attnpack's processors

    def rotary(self, model: torch.nn.Module) -> RotaryModule:
        return RotaryModule(self, model, model.rope)  # (cos, sin), one row per video token

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
        mask = inputs.get("encoder_attention_mask")
        ctx.text_mask = None if mask is None else mask.bool()

    def context_parallel_plan(self, model) -> dict:
        return getattr(model, "_cp_plan", None) or _cp_plan()

    def parallel_layout(self, call: AttnCall) -> ParallelLayout | None:
        if call.layout.role is Role.TEXT:
            return None  # the token refiner runs before the plan splits anything
        ctx = call.context
        video, text = math.prod(ctx.grid), ctx.text_len
        layout = TokenLayout(
            Role.JOINT, video + text, video + text, grid=ctx.grid, text_len=text, text_first=False
        )
        # The stock processor always passes a key mask; so does this, over the whole sequence.
        batch = call.query.shape[0]
        text_mask = ctx.text_mask
        if text_mask is None:
            text_mask = torch.ones(batch, text, dtype=torch.bool, device=call.query.device)
        video_mask = torch.ones(batch, video, dtype=torch.bool, device=call.query.device)
        key_padding = torch.cat([video_mask, text_mask.to(call.query.device)], dim=1)
        return ParallelLayout(layout, (video, text), (video, text), key_padding=key_padding)

    def check_parallel(self, model, ctx) -> None:
        config = getattr(model, "_parallel_config", None)
        if getattr(config, "context_parallel_config", None) is None:
            return
        stock = [
            name
            for name, module in model.named_modules()
            if not name.startswith("context_embedder.")
            and type(getattr(module, "processor", None)) in ADAPTER.stock_processors
        ]
        if stock:
            raise RuntimeError(
                f"HunyuanVideo under context parallelism: {len(stock)} joint attention layers ({stock[0]}, ...) "
                "run diffusers' HunyuanVideoAttnProcessor2_0, whose text mask is wrong on every rank but the "
                "first once the text is split; put attnpack's processors on them, e.g. "
                "attnpack.apply(pipe, 'dense'), which reproduces the stock processor exactly"
            )


FAMILY = HunyuanVideoFamily()
