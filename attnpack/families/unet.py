"""Stable Diffusion UNets (SD 1.5, SD 2.x, SDXL) and AnimateDiff's UNetMotionModel.

Their attention modules are diffusers' generic `Attention` with `AttnProcessor2_0`: spatial
self-attention (attn1), cross-attention to the text (attn2), and in AnimateDiff the motion modules'
temporal self-attention, which folds the pixels into the batch and attends along frames.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

from ..layout import Role, TokenLayout, downsampled_grid
from .base import (
    POSITIONS_ATTR,
    Adapter,
    AttnCall,
    Family,
    TemporalBlocks,
    project_heads,
    record_inputs,
)


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


class DeferredPositions(torch.nn.Module):
    """Stands in for a motion block's SinusoidalPositionalEmbedding: adds nothing, keeps the table under the
    same state-dict key (`pe`)."""

    def __init__(self, pe: torch.Tensor):
        super().__init__()
        self.register_buffer("pe", pe)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class MotionBlocks(TemporalBlocks):
    """AnimateDiff's motion modules: diffusers' `BasicTransformerBlock`s over frames ((B*H*W, F, C)), whose
    SinusoidalPositionalEmbedding (`pos_embed`) adds frame positions to the normed states before each
    attention."""

    def _block(self, module: torch.nn.Module):
        """(block, attention module's name in it, site) of an attached attention module, or None."""
        from ..context import site_of

        site = site_of(module)
        if site is None or "." not in site.local_name:
            return None
        block_name, attention_name = site.local_name.rsplit(".", 1)
        return self.model.get_submodule(block_name), attention_name, site

    def defer_positions(self, modules):
        undo = []
        for module in modules:
            found = self._block(module)
            if found is None:
                continue
            block, attention_name, _ = found
            positions = getattr(block, "pos_embed", None)
            if positions is None or not hasattr(positions, "pe"):
                continue
            if attention_name == "attn2" and getattr(block, "norm_type", None) == "ada_norm_single":
                continue  # the block adds no positions before attn2 then
            if not isinstance(positions, DeferredPositions):
                block.pos_embed = DeferredPositions(positions.pe)
                undo.append(lambda block=block, original=positions: setattr(block, "pos_embed", original))
            setattr(module, POSITIONS_ATTR, block.pos_embed.pe)
            undo.append(lambda module=module: delattr(module, POSITIONS_ATTR))

        def restore():
            for step in reversed(undo):
                step()

        return restore

    def fuse_windows(self, modules, windows, weights):
        blocks = {}
        for module in modules:
            found = self._block(module)
            if found is None or found[2].role is not Role.TEMPORAL:
                continue
            block, _, site = found
            if getattr(block, "norm_type", None) != "layer_norm":
                raise ValueError(
                    f"running temporal blocks per window of frames needs layer-norm transformer blocks; {site.name} "
                    f"sits in a {type(block).__name__} with norm_type={getattr(block, 'norm_type', None)!r}"
                )
            blocks[id(block)] = block
        for block in blocks.values():
            block.forward = functools.partial(_window_fused_block, block, windows, weights, block.forward)

        def undo():
            for block in blocks.values():
                del block.forward

        return undo


def _window_fused_block(
    block,
    windows_of,
    weights_of,
    original,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    encoder_hidden_states: torch.Tensor | None = None,
    encoder_attention_mask: torch.Tensor | None = None,
    timestep=None,
    cross_attention_kwargs: dict[str, Any] | None = None,
    class_labels=None,
    added_cond_kwargs=None,
) -> torch.Tensor:
    """A layer-norm BasicTransformerBlock over frames (B*H*W, F, C) with its attentions run per window and
    the windows fused before the feed-forward (its forward, per window)."""
    frames = hidden_states.shape[1]
    trained = block.pos_embed.pe.shape[1] if getattr(block, "pos_embed", None) is not None else None
    windows = windows_of(frames, trained)
    if len(windows) == 1:
        return original(hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask, timestep,
                        cross_attention_kwargs, class_labels, added_cond_kwargs)  # fmt: skip
    extra = cross_attention_kwargs or {}
    weights = weights_of(windows[0][1] - windows[0][0]).to(hidden_states.device)
    fused = torch.zeros(hidden_states.shape, device=hidden_states.device, dtype=torch.float32)
    total = torch.zeros(frames, device=hidden_states.device)
    for start, end in windows:
        chunk = hidden_states[:, start:end]
        norm = block.norm1(chunk)
        if block.pos_embed is not None:
            norm = block.pos_embed(norm)
        context = encoder_hidden_states if block.only_cross_attention else None
        chunk = (
            block.attn1(norm, encoder_hidden_states=context, attention_mask=attention_mask, **extra) + chunk
        )
        if block.attn2 is not None:
            norm = block.norm2(chunk)
            if block.pos_embed is not None:
                norm = block.pos_embed(norm)
            chunk = block.attn2(
                norm, encoder_hidden_states=encoder_hidden_states, attention_mask=encoder_attention_mask, **extra
            ) + chunk  # fmt: skip
        fused[:, start:end] += chunk.float() * weights[None, :, None]
        total[start:end] += weights
    hidden_states = fused.div_(total[None, :, None]).to(hidden_states.dtype)  # in place: no second copy
    norm = block.norm3(hidden_states)
    if block._chunk_size is not None:
        from diffusers.models.attention import _chunked_feed_forward

        return _chunked_feed_forward(block.ff, norm, block._chunk_dim, block._chunk_size) + hidden_states
    return block.ff(norm) + hidden_states


class UNetFamily(Family):
    name = "unet"
    title = "Stable Diffusion UNets: SD 1.5, SD 2.x, SDXL, AnimateDiff (UNetMotionModel)"
    denoiser_classes = ("UNet2DConditionModel", "UNetMotionModel")
    deep_layers_start = 36  # SDXL: the third of up_blocks.0's 30 self-attention layers, of 70

    def temporal_blocks(self, model: torch.nn.Module) -> MotionBlocks:
        return MotionBlocks(self, model)

    def watch_block_inputs(self, model, modules, seen):
        """A forward pre-hook on each module's `BasicTransformerBlock` (its parent), whose first argument is
        the block input."""
        from ..context import site_of

        hooks = []
        for module in modules:
            site = site_of(module)
            block = (
                model.get_submodule(site.local_name.rsplit(".", 1)[0])
                if site and "." in site.local_name
                else None
            )
            if block is None or type(block).__name__ != "BasicTransformerBlock":
                raise ValueError(
                    f"{site.name if site else module}: not inside a BasicTransformerBlock, so its block input is unknown"
                )

            def hook(_block, args, kwargs, module=module):
                seen(module, args[0] if args else kwargs["hidden_states"])

            hooks.append(block.register_forward_pre_hook(hook, with_kwargs=True))

        def undo():
            for handle in hooks:
                handle.remove()

        return undo

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

    def downsample_factor(self, model: torch.nn.Module, name: str) -> int | None:
        """How many times smaller than the latent the module's feature map is, from where it sits: every
        down block's downsampler before it halves it, every up block's upsampler before it doubles it."""
        stage, _, rest = name.partition(".")
        halvings = lambda blocks: sum(getattr(b, "downsamplers", None) is not None for b in blocks)  # noqa: E731
        doublings = lambda blocks: sum(getattr(b, "upsamplers", None) is not None for b in blocks)  # noqa: E731
        index = int(rest.split(".", 1)[0]) if rest[:1].isdigit() else None
        if stage == "down_blocks" and index is not None:
            return 2 ** halvings(model.down_blocks[:index])
        deepest = halvings(model.down_blocks)
        if stage == "mid_block":
            return 2**deepest
        if stage == "up_blocks" and index is not None:
            return 2 ** max(deepest - doublings(model.up_blocks[:index]), 0)
        return None

    def read_inputs(self, model, inputs: dict[str, Any], ctx) -> None:
        sample = inputs.get("sample")  # (B, C, H, W), or (B, C, F, H, W) for UNetMotionModel
        if sample is None:
            return
        record_inputs(ctx, tuple(sample.shape[2:]), sample.shape[0], inputs.get("encoder_hidden_states"))


FAMILY = UNetFamily()
