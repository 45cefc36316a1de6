"""FreeNoiseAttention: window-fused temporal attention for AnimateDiff (Qiu et al., ICLR 2024).

Each temporal attention of the motion modules runs on windows of `context_length` frames every
`context_stride` frames (one more window ending at the last frame where they stop short), each window
with the frame positions 0..L-1 the module was trained with, and every frame's output is the average of
its windows' outputs, weighted by its place in each window (`weighting`). The paper's noise rescheduling
is `reschedule_noise`; `attnpack.pipelines.long_video` puts both together, with prompts per frame.

`fusion="attention"` (default) fuses each temporal attention, as the authors' VideoCrafter code does
(AILab-CVC/FreeNoise, `lvdm/modules/attention_freenoise.py`: the windows are fused inside the attention's
forward); `fusion="block"` fuses once per motion-module transformer block, after both temporal attentions,
as the authors' AnimateDiff port and diffusers' `enable_free_noise` do (and then equals diffusers', tested,
where diffusers fuses every window fully). Wan has no temporal blocks: there the windows are always fused
per attention, and `fusion="block"` is refused when applied.

On Wan (video self-attention over frames x height x width tokens) the windows are `context_length` latent
frames (Wan 2.1 trained on 21: 81 frames), each a contiguous slice of the token sequence attended on its
own; RoPE is relative, so a window needs no positions of its own.

Memory: off CUDA the windows are attended one at a time and added in place into one float32 buffer (no
stacked copies of the windows), so a call holds that buffer and one window's q, k, v and output beyond its
inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..context import site_of
from ..families.base import AttnCall
from ..kernels import windowed_attention
from ..layout import Role
from .base import AttentionMethod, check_choice, check_number, dense
from .needs import Needs
from .temporal import defer_positions, frame_windows, position_offsets, table_length, temporal_modules

WEIGHTINGS = ("pyramid", "flat", "delayed_reverse_sawtooth")
NOISE = ("shuffle", "repeat", "random")
FUSIONS = ("attention", "block")


def window_weights(length: int, weighting: str = "pyramid") -> torch.Tensor:
    """Each frame's weight inside a window of `length` frames: pyramid [1, 2, 3, 2, 1], flat, or
    delayed_reverse_sawtooth [0.01, 0.01, 3, 2, 1] (diffusers' three schemes)."""
    check_choice("window_weights", "weighting", weighting, WEIGHTINGS)
    half = (length + 1) // 2
    if weighting == "flat":
        weights = [1.0] * length
    elif weighting == "pyramid":
        rising = list(range(1, half + 1))
        weights = rising + rising[::-1][length % 2 :]
    elif length % 2 == 0:
        weights = [0.01] * (half - 1) + [half] + list(range(half, 0, -1))
    else:
        weights = [0.01] * (half - 1) + list(range(half, 0, -1))
    return torch.tensor(weights, dtype=torch.float32)


def reschedule_noise(
    noise: torch.Tensor,
    context_length: int = 16,
    context_stride: int = 4,
    mode: str = "shuffle",
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> torch.Tensor:
    """FreeNoise's noise for a long video from (B, C, F, H, W) noise, in a new tensor.

    "shuffle": frames [i, i + stride) for i = L, L + stride, ... take a shuffled copy of frames
    [i - L, i - L + stride), so every window sees a local permutation of the first window's noise;
    "repeat": the first L frames repeated; "random": unchanged. A list of generators (one per video)
    shuffles each video with its own.
    """
    check_choice("reschedule_noise", "mode", mode, NOISE)
    check_number("reschedule_noise", "context_length", context_length, low=1, integer=True)
    check_number("reschedule_noise", "context_stride", context_stride, low=1, integer=True)
    if noise.ndim != 5:
        raise ValueError(f"reschedule_noise: noise must be (B, C, F, H, W); got shape {tuple(noise.shape)}")
    batch, frames = noise.shape[0], noise.shape[2]
    if isinstance(generator, list) and len(generator) != batch:
        raise ValueError(
            f"reschedule_noise: {len(generator)} generators for a batch of {batch}; give one per video"
        )
    noise = noise.clone()
    if mode == "repeat":
        repeats = -(-frames // context_length)
        return noise[:, :, :context_length].repeat(1, 1, repeats, 1, 1)[:, :, :frames].contiguous()
    if mode == "random":
        return noise
    generators = generator if isinstance(generator, list) else [generator] * batch
    shared = not isinstance(generator, list)
    for start in range(context_length, frames, context_stride):
        source = torch.arange(start - context_length, start - context_length + context_stride)
        count = min(context_stride, frames - start)
        if shared:
            order = source[_randperm(len(source), generator)][:count]
            noise[:, :, start : start + count] = noise[:, :, order]
        else:
            for b, g in enumerate(generators):
                order = source[_randperm(len(source), g)][:count]
                noise[b, :, start : start + count] = noise[b, :, order]
    return noise


def _randperm(n: int, generator: torch.Generator | None) -> torch.Tensor:
    device = generator.device if generator is not None else "cpu"
    return torch.randperm(n, generator=generator, device=device).cpu()


@dataclass(eq=False, repr=False)
class FreeNoiseAttention(AttentionMethod):
    """Window-fused temporal attention for AnimateDiff motion modules. `context_length`: the frames the
    motion module was trained on (16 for most adapters; None reads the adapter's `motion_max_seq_length`
    when applied); `context_stride`: frames between window starts; `weighting`: "pyramid", "flat" or
    "delayed_reverse_sawtooth"."""

    context_length: int | None = 16
    context_stride: int = 4
    weighting: str = "pyramid"
    fusion: str = "attention"

    name: ClassVar[str] = "freenoise"
    needs: ClassVar[Needs] = Needs(runner="long_video", tab="Long video")
    families: ClassVar[tuple[str, ...]] = ("unet", "wan")
    roles: ClassVar[frozenset[Role]] = frozenset({Role.TEMPORAL, Role.SELF})
    family_roles: ClassVar[dict[str, frozenset[Role]]] = {
        "unet": frozenset({Role.TEMPORAL}),
        "wan": frozenset({Role.SELF}),
    }

    context_parallel: ClassVar[frozenset[str]] = frozenset({"ulysses"})
    context_parallel_note: ClassVar[str] = (
        "Its output is a weighted blend of window attentions over whole frames,"
        " which ring attention cannot merge from key chunks: use ContextParallelConfig(ulysses_degree=...)"
    )

    def __post_init__(self):
        owner = "FreeNoiseAttention"
        if self.context_length is not None:
            check_number(owner, "context_length", self.context_length, low=1, integer=True)
        check_number(owner, "context_stride", self.context_stride, low=1, integer=True)
        check_choice(owner, "weighting", self.weighting, WEIGHTINGS)
        check_choice(owner, "fusion", self.fusion, FUSIONS)

    def install(self, processors: dict[torch.nn.Module, Any], denoisers: dict[str, torch.nn.Module]):
        if self.fusion == "block":
            return self.fuse_blocks(processors, denoisers)
        return defer_positions(processors, denoisers)

    def fuse_blocks(self, processors, denoisers):
        """fusion="block": each temporal transformer block runs its attentions per window and fuses the
        windows before its feed-forward (the family's `TemporalBlocks.fuse_windows`; undo puts it back)."""
        undo = []
        for family, model, modules in temporal_modules(processors, denoisers):
            if any(site_of(m).role is not Role.TEMPORAL for m in modules):  # a video DiT: no temporal blocks
                raise ValueError(
                    f"FreeNoiseAttention: fusion='block' is not accepted on {family.title}, whose windows are "
                    "frames of video self-attention with no temporal blocks to fuse; accepted there: "
                    "fusion='attention'"
                )
            blocks = family.temporal_blocks(model)
            if blocks is None:
                raise ValueError(
                    f"FreeNoiseAttention(fusion='block'): {family.title} has no temporal blocks to run per window; "
                    "use fusion='attention'"
                )
            try:
                undo.append(blocks.fuse_windows(modules, self.block_windows, self.weights))
            except ValueError as error:
                raise ValueError(f"FreeNoiseAttention(fusion='block'): {error}") from None

        def restore():
            for step in reversed(undo):
                step()

        return restore

    def block_windows(self, frames: int, trained_frames: int | None) -> list[tuple[int, int]]:
        """The windows of a temporal block over `frames` frames, trained on `trained_frames` (or None)."""
        return frame_windows(frames, self.window_length(None, trained_frames), self.context_stride)

    def weights(self, length: int) -> torch.Tensor:
        """Each frame's weight in a window of `length` frames."""
        return window_weights(length, self.weighting)

    def window_length(self, call: AttnCall | None, trained_frames: int | None = None) -> int:
        """The window in frames: `context_length`, else the frames the motion module was trained on
        (`trained_frames`, or the length of the call's deferred position table)."""
        if self.context_length is not None:
            return self.context_length
        trained = trained_frames
        if trained is None:
            trained = table_length(call.module) if call is not None else None
        if trained is None:
            raise RuntimeError(
                "FreeNoiseAttention(context_length=None) reads an AnimateDiff motion module's trained length from "
                "its positions (apply it with attnpack.apply(pipe, ...)); for a video DiT pass context_length in "
                "latent frames (Wan 2.1: 21)"
            )
        return trained

    def attend(self, call: AttnCall) -> torch.Tensor:
        video_tokens = call.layout.role is Role.SELF  # a video DiT: frames of height x width tokens
        if not video_tokens and self.fusion == "block":  # the block runs this attention per window already
            return dense(call)
        if call.attn_mask is not None:
            raise RuntimeError(
                f"FreeNoiseAttention: {call.site.name} has an attention mask; windows cannot honour it"
            )
        if video_tokens:
            grid = call.layout.grid
            if grid is None or len(grid) != 3:
                raise RuntimeError(
                    f"FreeNoiseAttention: no video grid for {call.site.name}; attach the pipeline"
                )
            frames, tokens = grid[0], grid[1] * grid[2]
        else:
            frames, tokens = call.query.shape[1], 1
        windows = frame_windows(frames, self.window_length(call), self.context_stride)
        length = windows[0][1] - windows[0][0]
        offsets = position_offsets(call.module, torch.arange(length)) if tokens == 1 else None
        return windowed_attention(
            call.query,
            call.key,
            call.value,
            windows,
            window_weights(length, self.weighting),
            offsets=offsets,
            scale=call.scale,
            tokens_per_frame=tokens,
        )
