"""Agent attention (Han et al., ECCV 2024): softmax attention through a small set of agent tokens.

`AgentAttention` is AgentSD, training-free, for the self-attention of Stable Diffusion UNets (SD 1.5,
SD 2.x, SDXL). On the layers at most `max_downsample` below the latent's resolution, the hidden states the
layer receives (the block's normed states) are ToMe-merged by bipartite soft matching: one destination
token per sy x sx cell, the `ratio` most similar other tokens averaged into their best destination. The
same matching with `agent_ratio` gives the agent tokens, projected with the layer's `to_q`. Then

    agent_v = softmax(A K^T s) V,    out = softmax(Q A^T s^k_scale2) agent_v + k_shortcut V,    s = d^-1/2

on the merged tokens, and the output is unmerged (each merged token takes its destination's output).
Agents are used only where they save work (2 x agents < merged tokens), otherwise the layer runs plain
ToMe. The two-stage schedule of the AgentSD README (stage 1 for steps < 20 of 50, stage 2 after) is kept
as a fraction of the step count, `late_start`, so it means the same with any scheduler.

One difference from the public code, which patches the transformer block: it matches tokens on the block's
input and merges its normed states; a diffusers processor sees only the normed states, so both the matching
and the merging use them.

`PooledAgentAttention` is the paper's general form for DiT self-attention (FLUX, Wan), training-free:
agents are the queries average-pooled on the token grid (per frame for video); text queries stay dense.
It approximates dense attention; no quality figure is claimed for it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..context import site_of
from ..fallback import fall_back
from ..families.base import AttnCall, unflatten_heads
from ..kernels import best_match, dense_attention
from ..kernels.dispatch import log_once
from ..layout import Role, downsampled_grid
from .base import AttentionMethod, check_choice, check_number, dense, model_dense_attention

logger = logging.getLogger("attnpack")
MATCH_ON = ("block_input", "normed")

# The AgentSD README's settings per model: SDXL has no attention at the latent's resolution, SD 2.x needs
# the Q/A/K products in float32.
PRESETS = {
    "sd1.5": dict(max_downsample=1),
    "sd2": dict(max_downsample=1, fp32=True),
    "sdxl": dict(max_downsample=2),
}


def agent_attention(
    query: torch.Tensor,
    agents: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scale: float | None = None,
    k_scale2: float = 0.3,
    k_shortcut: float = 0.075,
    fp32: bool = False,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(Q A^T s^k_scale2) softmax(A K^T s) V + k_shortcut V, all (B, S, H, D).

    `value` must hold one row per query (self-attention). `attn_mask` masks keys in the first stage and
    must broadcast to (B, H, 1, Sk). Both stages go through the dense attention kernel.
    """
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    dtype = query.dtype
    if fp32:
        query, agents, key, value = (x.float() for x in (query, agents, key, value))
    agent_value = dense_attention(agents, key, value, attn_mask=attn_mask, scale=scale)
    out = dense_attention(query, agents, agent_value, scale=scale**k_scale2)
    return (out + k_shortcut * value).to(dtype)


@dataclass(eq=False)
class TokenMerge:
    """One bipartite soft matching of N tokens on a grid.

    Destination tokens sit at `dst_positions` (one per cell), source tokens at `src_positions`. `order`
    ranks each batch element's sources by their best similarity (most similar first) and `target` is each
    source's best destination. Merging r tokens averages the first r sources of `order` into their targets.
    """

    num_tokens: int
    src_positions: torch.Tensor  # (Ns,)
    dst_positions: torch.Tensor  # (Nd,)
    order: torch.Tensor  # (B, Ns)
    target: torch.Tensor  # (B, Ns)
    merged: int  # sources merged for the attention tokens
    agent_merged: int | None  # sources merged for the agents, None when agents would not save work

    def merge(self, x: torch.Tensor, merged: int) -> torch.Tensor:
        """(B, N, C) -> (B, N - merged, C): unmerged sources, then destinations (mean of what joined them)."""
        channels = x.shape[-1]
        src, dst = x[:, self.src_positions], x[:, self.dst_positions]
        kept, moving = self.order[:, merged:], self.order[:, :merged]
        unmerged = src.gather(1, kept[..., None].expand(-1, -1, channels))
        joining = src.gather(1, moving[..., None].expand(-1, -1, channels))
        into = self.target.gather(1, moving)[..., None].expand(-1, -1, channels)
        dst = dst.scatter_reduce(1, into, joining, reduce="mean", include_self=True)
        return torch.cat([unmerged, dst], dim=1)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        return self.merge(x, self.merged)

    def agents(self, x: torch.Tensor) -> torch.Tensor | None:
        return None if self.agent_merged is None else self.merge(x, self.agent_merged)

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        """(B, N - merged, C) -> (B, N, C): every merged source takes its destination's row."""
        batch, _, channels = y.shape
        kept_len = self.src_positions.numel() - self.merged
        kept, dst = y[:, :kept_len], y[:, kept_len:]
        out = y.new_empty(batch, self.num_tokens, channels)
        out[:, self.dst_positions] = dst
        positions = self.src_positions[self.order]  # (B, Ns) token positions, ranked
        moving = self.order[:, : self.merged]
        expand = (-1, -1, channels)
        out.scatter_(1, positions[:, self.merged :, None].expand(*expand), kept)
        out.scatter_(
            1,
            positions[:, : self.merged, None].expand(*expand),
            dst.gather(1, self.target.gather(1, moving)[..., None].expand(*expand)),
        )
        return out


def plan_merge(
    metric: torch.Tensor,
    grid: tuple[int, int],
    *,
    sx: int,
    sy: int,
    ratio: float,
    agent_ratio: float,
    generator: torch.Generator | None = None,
) -> TokenMerge | None:
    """Bipartite soft matching of `metric` (B, N, C) on an (H, W) grid, or None when nothing merges.

    One destination per sy x sx cell of the grid's top-left part that the cells tile: a random one per cell
    from `generator` (shared by the batch), the top-left one without. Similarity is cosine.
    """
    num_tokens = metric.shape[1]
    height, width = grid
    merged = int(num_tokens * ratio)
    cells_y, cells_x = height // sy, width // sx
    if merged <= 0 or cells_y == 0 or cells_x == 0:
        return None
    device = metric.device
    if generator is None:
        choice = torch.zeros(cells_y, cells_x, dtype=torch.long)
    else:
        choice = torch.randint(sy * sx, (cells_y, cells_x), generator=generator, device=generator.device)
    rows = torch.arange(cells_y)[:, None] * sy + choice.cpu() // sx
    cols = torch.arange(cells_x)[None, :] * sx + choice.cpu() % sx
    is_dst = torch.zeros(height, width, dtype=torch.bool)
    is_dst[rows, cols] = True
    dst_positions = is_dst.flatten().nonzero().squeeze(1).to(device)
    src_positions = (~is_dst).flatten().nonzero().squeeze(1).to(device)

    with torch.no_grad():
        unit = metric / metric.norm(dim=-1, keepdim=True)
        best, target = best_match(unit[:, src_positions], unit[:, dst_positions])
        order = best.argsort(dim=-1, descending=True, stable=True)
    num_src = src_positions.numel()
    merged = min(merged, num_src)
    agent_merged = min(int(num_tokens * agent_ratio), num_src)
    if (num_tokens - agent_merged) * 2 >= num_tokens - merged:
        agent_merged = None
    return TokenMerge(num_tokens, src_positions, dst_positions, order, target, merged, agent_merged)


@dataclass(eq=False)
class MergedTokens:
    """What `AgentAttention.before_projection` made of one call: the merge plan, to unmerge the output, and
    the agent tokens (merged hidden states, before `to_q`), or None where agents would not save work."""

    plan: TokenMerge
    agents: torch.Tensor | None


@dataclass(eq=False, repr=False)
class AgentAttention(AttentionMethod):
    """AgentSD for UNet self-attention. Stage 1 (`ratio`, `agent_ratio`, `sx`, `sy`) runs until the
    fraction `late_start` of the steps, stage 2 (`late_*`) after; `late_start=1` keeps stage 1 throughout.
    `max_downsample`: 1 for SD 1.5 / 2.x, 2 for SDXL. `fp32` runs the agent products in float32 (SD 2.x).
    `use_rand` picks each cell's destination at random, seeded by `seed`, the step and the layer.
    `match_on`: what the token matching compares: "block_input", the transformer block's input before its
    norm, as AgentSD's patch (after ToMeSD) does, or "normed", the normed states the attention reads; both
    merge the normed states."""

    ratio: float = 0.4
    agent_ratio: float = 0.95
    sx: int = 4
    sy: int = 4
    late_start: float = 0.4
    late_ratio: float = 0.4
    late_agent_ratio: float = 0.5
    late_sx: int = 2
    late_sy: int = 2
    k_scale2: float = 0.3
    k_shortcut: float = 0.075
    max_downsample: int = 1
    fp32: bool = False
    use_rand: bool = True
    seed: int = 0
    match_on: str = "block_input"

    name: ClassVar[str] = "agent"
    families: ClassVar[tuple[str, ...]] = ("unet",)
    roles: ClassVar[frozenset[Role]] = frozenset({Role.SELF})
    needs_context: ClassVar[bool] = True

    context_parallel_note: ClassVar[str] = (
        "AgentSD runs on UNets, whose diffusers processors do not support context parallelism"
    )

    def __post_init__(self):
        owner = "AgentAttention"
        for name in ("ratio", "late_ratio", "agent_ratio", "late_agent_ratio"):
            check_number(owner, name, getattr(self, name), low=0, high=1, high_inclusive=False)
        for name in ("sx", "sy", "late_sx", "late_sy", "max_downsample"):
            check_number(owner, name, getattr(self, name), low=1, integer=True)
        check_number(owner, "late_start", self.late_start, low=0, high=1)
        check_number(owner, "k_scale2", self.k_scale2)
        check_number(owner, "k_shortcut", self.k_shortcut)
        check_number(owner, "seed", self.seed, low=0, integer=True)
        check_choice(owner, "fp32", self.fp32, (True, False))
        check_choice(owner, "use_rand", self.use_rand, (True, False))
        check_choice(owner, "match_on", self.match_on, MATCH_ON)

    @classmethod
    def preset(cls, model: str, **overrides) -> AgentAttention:
        """AgentSD's settings for "sd1.5", "sd2" or "sdxl", with any of them overridden."""
        check_choice("AgentAttention.preset", "model", model, tuple(PRESETS))
        return cls(**{**PRESETS[model], **overrides})

    def stage(self, ctx) -> tuple[float, float, int, int]:
        """(ratio, agent_ratio, sx, sy) at the context's step."""
        early = (self.ratio, self.agent_ratio, self.sx, self.sy)
        if self.late_start >= 1:
            return early
        if ctx.step_index is None or ctx.num_steps is None:
            raise RuntimeError(
                f"AgentAttention(late_start={self.late_start}) needs the denoising step: run the attached "
                "pipeline, call ctx.set_step(i, num_steps) in a loop of your own, or pass late_start=1"
            )
        late_step = math.ceil(self.late_start * ctx.num_steps - 1e-9)
        if ctx.step_index < late_step:
            return early
        return (self.late_ratio, self.late_agent_ratio, self.late_sx, self.late_sy)

    def install(self, processors, denoisers):
        """With match_on="block_input": watch the block inputs of the layers it acts on (their family's hook)."""
        if self.match_on != "block_input":
            return None
        by_denoiser: dict[str, list] = {}
        for module in processors:
            site = site_of(module)
            if site is not None and self.acts_on(site.family.name, site.role):
                by_denoiser.setdefault(site.denoiser, []).append(module)
        undo = []
        for name, modules in by_denoiser.items():
            site = site_of(modules[0])
            state = site.context.state_for(self, dict)

            def seen(module, hidden_states, state=state):
                state[module] = hidden_states

            undo.append(site.family.watch_block_inputs(denoisers[name], modules, seen))
        return lambda: [step() for step in reversed(undo)]

    def _metric(self, attn, site, hidden_states):
        """What the matching compares, per `match_on`."""
        if self.match_on == "normed":
            return hidden_states
        block_input = site.context.state_for(self, dict).pop(attn, None)
        if block_input is not None and block_input.shape == hidden_states.shape:
            return block_input
        log_once(
            f"AgentAttention(match_on='block_input'): the block input of {site.name} was not seen (installed "
            "with set_attn_processor rather than attnpack.apply?); matching on the normed states there"
        )
        return hidden_states

    def idle_reason(self, site) -> str | None:
        factor = site.family.downsample_factor(site.denoiser_model, site.local_name)
        if factor is not None and factor > self.max_downsample:
            return f"it works at 1/{factor} of the latent's resolution, beyond max_downsample={self.max_downsample}"
        return None

    def before_projection(self, attn, site, hidden_states, encoder_hidden_states, attention_mask):
        metric = self._metric(attn, site, hidden_states) if site is not None else hidden_states
        plain_self_attention = (
            encoder_hidden_states is None
            and attention_mask is None
            and hidden_states.ndim == 3
            and attn.spatial_norm is None
            and attn.group_norm is None
            and not attn.residual_connection
        )
        ctx = site.context
        if not plain_self_attention or ctx.grid is None:
            return hidden_states, encoder_hidden_states, None
        full = ctx.grid[-2:]
        level = downsampled_grid(full, hidden_states.shape[1])
        if level is None or math.ceil(full[0] / level[0]) > self.max_downsample:
            return hidden_states, encoder_hidden_states, None
        ratio, agent_ratio, sx, sy = self.stage(ctx)
        generator = None
        if self.use_rand and hidden_states.shape[0] % 2 == 0:
            # An odd batch cannot hold matching conditional / unconditional halves: AgentSD then
            # uses fixed destinations, as we do.
            step = ctx.step_index or 0
            generator = torch.Generator().manual_seed(
                (self.seed * 1_000_003 + step * 1_009 + site.index) % 2**63
            )
        plan = plan_merge(
            metric, level, sx=sx, sy=sy, ratio=ratio, agent_ratio=agent_ratio, generator=generator
        )
        if plan is None:
            return hidden_states, encoder_hidden_states, None
        merged = MergedTokens(plan, plan.agents(hidden_states))
        return plan.tokens(hidden_states), encoder_hidden_states, merged

    def after_output(self, prepared: MergedTokens, output):
        return prepared.plan.unmerge(output)

    def attend(self, call: AttnCall) -> torch.Tensor:
        merged: MergedTokens | None = call.prepared
        if merged is None or merged.agents is None:
            return dense(call)
        attn = call.module
        agents = unflatten_heads(attn.to_q(merged.agents), attn.heads)
        if attn.norm_q is not None:
            agents = attn.norm_q(agents)
        return agent_attention(
            call.query,
            agents,
            call.key,
            call.value,
            scale=call.scale,
            k_scale2=self.k_scale2,
            k_shortcut=self.k_shortcut,
            fp32=self.fp32,
        )


@dataclass(eq=False, repr=False)
class PooledAgentAttention(AttentionMethod):
    """Training-free agent attention for DiT self-attention: `agent_grid` x `agent_grid` agents per frame,
    pooled from the queries (fewer where the grid is smaller). The first `dense_layers` layers and the first
    `dense_fraction` of the steps stay dense. An approximation of dense attention."""

    agent_grid: int = 16
    k_scale2: float = 0.3
    k_shortcut: float = 0.075
    dense_layers: int = 0
    dense_fraction: float = 0.0
    fp32: bool = False

    name: ClassVar[str] = "pooled_agent"
    families: ClassVar[tuple[str, ...]] = ("flux", "wan")
    roles: ClassVar[frozenset[Role]] = frozenset({Role.SELF, Role.JOINT})
    needs_context: ClassVar[bool] = True

    context_parallel: ClassVar[frozenset[str]] = frozenset({"ulysses"})
    context_parallel_note: ClassVar[str] = (
        "Agent attention is two softmaxes (agents over keys, queries over agents), which ring attention cannot merge from key chunks: use ContextParallelConfig(ulysses_degree=...)"
    )

    def __post_init__(self):
        owner = "PooledAgentAttention"
        check_number(owner, "agent_grid", self.agent_grid, low=1, integer=True)
        check_number(owner, "k_scale2", self.k_scale2)
        check_number(owner, "k_shortcut", self.k_shortcut)
        check_number(owner, "dense_layers", self.dense_layers, low=0, integer=True)
        check_number(owner, "dense_fraction", self.dense_fraction, low=0, high=1)
        check_choice(owner, "fp32", self.fp32, (True, False))

    def dense_now(self, call: AttnCall) -> bool:
        if call.site.role_index < self.dense_layers:
            return True
        if not self.dense_fraction:
            return False
        fraction = call.context.step_fraction
        if fraction is None:
            raise RuntimeError(
                f"PooledAgentAttention(dense_fraction={self.dense_fraction}) needs the denoising step: run the "
                "attached pipeline, or call ctx.set_step(i, num_steps) for a loop of your own"
            )
        return fraction < self.dense_fraction

    def attend(self, call: AttnCall) -> torch.Tensor:
        layout, mask = call.layout, call.attn_mask
        if self.dense_now(call):
            return dense(call)
        if layout.grid is None or len(layout.grid) not in (2, 3):
            fall_back(self, call, "no image or video grid")
            return dense(call)
        if mask is not None and (mask.ndim != 4 or mask.shape[-2] != 1):
            fall_back(self, call, "a per-query attention mask")
            return dense(call)
        frames, height, width = (1, *layout.grid) if len(layout.grid) == 2 else layout.grid
        visual = layout.visual_slice
        query = call.query[:, visual]
        batch, _, heads, head_dim = query.shape
        rows, cols = min(self.agent_grid, height), min(self.agent_grid, width)
        if 2 * frames * rows * cols >= call.key.shape[1]:
            return dense(call)
        planes = query.reshape(batch * frames, height, width, heads * head_dim).permute(0, 3, 1, 2)
        pooled = F.adaptive_avg_pool2d(planes.float(), (rows, cols)).to(query.dtype)
        agents = pooled.reshape(batch, frames, heads, head_dim, rows * cols).permute(0, 1, 4, 2, 3)
        agents = agents.reshape(batch, frames * rows * cols, heads, head_dim)
        visual_out = agent_attention(
            query,
            agents,
            call.key,
            call.value[:, visual],
            scale=call.scale,
            k_scale2=self.k_scale2,
            k_shortcut=self.k_shortcut,
            fp32=self.fp32,
            attn_mask=mask,
        )
        if layout.role is not Role.JOINT or not layout.text_len:
            return visual_out
        text = layout.text_slice
        text_out = model_dense_attention(
            call, call.query[:, text], call.key, call.value, attn_mask=mask, scale=call.scale
        )
        parts = (text_out, visual_out) if layout.text_first else (visual_out, text_out)
        return torch.cat(parts, dim=1)
