"""FreeLongAttention: SpectralBlend temporal attention for long videos (Lu et al., NeurIPS 2024).

Each temporal attention runs twice: globally (every frame sees every frame) and locally (every frame sees
exactly `local_window` frames around it, the window shifted inside at the ends). The outputs are blended
in frequency: the low frequencies of the global output and the high frequencies of the local one, through
a 3D FFT over (frames, height, width) and a Gaussian low-pass

    exp(-1/2 ((t / temporal_cutoff)^2 + (h / spatial_cutoff)^2 + (w / spatial_cutoff)^2))

on centred frequencies normalised to [-1, 1], computed in float32. Any frame count and resolution.
`skip_highest_resolution` leaves the motion modules at the latent's resolution global, as the paper does.

`band_windows` adds FreeLong++'s multi-band blend: wider local windows in between, each taking the band
of frequencies between its neighbours. On Wan the branches are video self-attention: global, and frame
bands (|frame distance| <= window // 2) in the block-sparse kernel, blended over the (F, H, W) token grid.

Frame positions (AnimateDiff): the local branch gives each window positions 0..L-1; the global branch uses
the module's own positions while the video fits its table, and beyond that positions squeezed into the
trained window (nearest), so that no frame sees a position it was never trained on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..families.base import AttnCall
from ..kernels import block_sparse_attention, dense_attention, global_local_attention
from ..layout import Role
from ..patterns.frame_band import frame_band
from .base import AttentionMethod, check_choice, check_number
from .temporal import defer_positions, position_offsets, table_length

logger = logging.getLogger("attnpack")


def gaussian_low_pass(
    shape: tuple[int, int, int], spatial_cutoff: float, temporal_cutoff: float
) -> torch.Tensor:
    """(T, H, W) float32 filter over fftshift-ed frequencies, 1 at the zero frequency."""

    def axis(n: int) -> torch.Tensor:
        return (torch.arange(n) - n // 2) / max(n / 2, 1)

    t, h, w = (axis(n) for n in shape)
    exponent = (t[:, None, None] / temporal_cutoff) ** 2 + (h[None, :, None] / spatial_cutoff) ** 2
    exponent = exponent + (w[None, None, :] / spatial_cutoff) ** 2
    return torch.exp(-0.5 * exponent)


def spectral_blend(
    outputs: list[torch.Tensor], low_passes: list[torch.Tensor], dims: tuple[int, int, int]
) -> torch.Tensor:
    """Blend branches by frequency over the three `dims` (T, H, W order), in float32; returns the first
    branch's dtype. `outputs` run from the widest attention (global) to the narrowest, `low_passes` (one
    fewer, each wider than the last) split the spectrum between neighbours: branch 0 takes G_0, branch b
    takes G_b - G_(b-1), the last takes 1 - G_last. Two branches are FreeLong; more, FreeLong++'s bands."""
    if len(low_passes) != len(outputs) - 1:
        raise ValueError(f"spectral_blend: {len(outputs)} outputs need {len(outputs) - 1} low-pass filters")
    shape = [1] * outputs[0].ndim
    for d, n in zip(dims, low_passes[0].shape, strict=True):
        shape[d] = n
    order = sorted(range(len(dims)), key=lambda i: dims[i])  # the filters' axes in the tensor's order
    device = outputs[0].device
    masks = [mask.to(device).permute(order).reshape(shape) for mask in low_passes]
    up_to = [*masks, torch.ones((), device=device)]  # G_b: what branches 0..b take together
    below = [torch.zeros((), device=device), *masks]
    mixed = 0
    for out, total, taken in zip(outputs, up_to, below, strict=True):
        spectrum = torch.fft.fftshift(torch.fft.fftn(out.float(), dim=dims), dim=dims)
        mixed = mixed + spectrum * (total - taken)
    blended = torch.fft.ifftn(torch.fft.ifftshift(mixed, dim=dims), dim=dims).real
    return blended.to(outputs[0].dtype)


@dataclass(eq=False, repr=False)
class FreeLongAttention(AttentionMethod):
    """SpectralBlend temporal attention: `local_window` frames per local window, `spatial_cutoff` /
    `temporal_cutoff` the Gaussian's width on normalised frequencies, `band_windows` wider local windows
    for FreeLong++'s multi-band blend (each band's temporal cutoff scaled by local_window / window)."""

    local_window: int = 16
    spatial_cutoff: float = 0.25
    temporal_cutoff: float = 0.25
    skip_highest_resolution: bool = True
    band_windows: tuple[int, ...] = ()

    name: ClassVar[str] = "freelong"
    families: ClassVar[tuple[str, ...]] = ("unet", "wan")
    roles: ClassVar[frozenset[Role]] = frozenset({Role.TEMPORAL, Role.SELF})
    family_roles: ClassVar[dict[str, frozenset[Role]]] = {
        "unet": frozenset({Role.TEMPORAL}),
        "wan": frozenset({Role.SELF}),
    }
    needs_context: ClassVar[bool] = True

    context_parallel: ClassVar[frozenset[str]] = frozenset({"ulysses"})
    context_parallel_note: ClassVar[str] = (
        "Its output blends global and local attentions in frequency over the whole video,"
        " which ring attention cannot merge from key chunks: use ContextParallelConfig(ulysses_degree=...)"
    )

    def __post_init__(self):
        owner = "FreeLongAttention"
        check_number(owner, "local_window", self.local_window, low=1, integer=True)
        check_number(owner, "spatial_cutoff", self.spatial_cutoff, low=0, low_inclusive=False)
        check_number(owner, "temporal_cutoff", self.temporal_cutoff, low=0, low_inclusive=False)
        check_choice(owner, "skip_highest_resolution", self.skip_highest_resolution, (True, False))
        if isinstance(self.band_windows, int) or not all(
            isinstance(w, int) and not isinstance(w, bool) and w > self.local_window
            for w in self.band_windows
        ):
            raise ValueError(
                f"FreeLongAttention: band_windows={self.band_windows!r} must be frame counts larger than "
                f"local_window={self.local_window}"
            )
        self.band_windows = tuple(sorted(set(self.band_windows), reverse=True))

    def install(self, processors: dict[torch.nn.Module, Any], denoisers: dict[str, torch.nn.Module]):
        return defer_positions(processors, denoisers)

    def windows(self, frames: int) -> list[int]:
        """Local window sizes from the widest band to `local_window`, those shorter than the video."""
        return [w for w in (*self.band_windows, self.local_window) if w < frames]

    def low_passes(self, grid: tuple[int, int, int], windows: list[int]) -> list[torch.Tensor]:
        return [
            gaussian_low_pass(grid, self.spatial_cutoff, self.temporal_cutoff * self.local_window / window)
            for window in windows
        ]

    def global_positions(self, call: AttnCall, frames: int) -> torch.Tensor:
        trained = table_length(call.module)
        if trained is None or frames <= trained:
            return torch.arange(frames)
        squeezed = min(self.local_window, trained)
        return torch.round(torch.arange(frames) * (squeezed - 1) / max(frames - 1, 1)).long()

    def attend(self, call: AttnCall) -> torch.Tensor:
        if call.attn_mask is not None:
            raise RuntimeError(
                f"FreeLongAttention: {call.site.name} has an attention mask; it cannot honour it"
            )
        if call.layout.role is Role.SELF:
            return self.attend_video_tokens(call)
        frames = call.query.shape[1]
        global_offsets = position_offsets(call.module, self.global_positions(call, frames))
        spatial = call.layout.batch_grid
        ctx = call.context
        highest = spatial is not None and ctx.grid is not None and tuple(spatial) == tuple(ctx.grid[-2:])
        windows = self.windows(frames)
        if not windows or (self.skip_highest_resolution and highest):
            query, key, value = call.query, call.key, call.value
            if global_offsets is not None:
                query, key, value = (
                    x + o.to(x.dtype) for x, o in zip((query, key, value), global_offsets, strict=True)
                )
            return dense_attention(query, key, value, scale=call.scale)
        branches = []
        for window in windows:  # widest first; the kernel gives the global output with each local one
            local_offsets = (
                None if global_offsets is None else position_offsets(call.module, torch.arange(window))
            )
            global_out, local_out = global_local_attention(
                call.query, call.key, call.value, window,
                global_offsets=global_offsets, local_offsets=local_offsets, scale=call.scale,
            )  # fmt: skip
            branches = branches or [global_out]
            branches.append(local_out)
        if spatial is None:
            logger.info(
                "FreeLongAttention: no spatial grid for %s, blending over frames only", call.site.name
            )
            spatial = (1, 1)
        height, width = spatial
        # (B*H*W, F, heads, D) -> (B, H, W, F, heads*D): FFT over frames, height, width
        grid = lambda x: x.reshape(-1, height, width, frames, x.shape[2] * x.shape[3])  # noqa: E731
        low_passes = self.low_passes((frames, height, width), windows)
        blended = spectral_blend([grid(b) for b in branches], low_passes, dims=(3, 1, 2))
        return blended.reshape(call.query.shape)

    def attend_video_tokens(self, call: AttnCall) -> torch.Tensor:
        """A video DiT: global attention and frame bands of each window (|frame distance| <= window // 2)
        in the block-sparse kernel, blended over the token grid."""
        grid = call.layout.grid
        if grid is None or len(grid) != 3:
            raise RuntimeError(f"FreeLongAttention: no video grid for {call.site.name}; attach the pipeline")
        global_out = dense_attention(call.query, call.key, call.value, scale=call.scale)
        windows = self.windows(grid[0])
        if not windows:
            return global_out
        branches = [global_out]
        for window in windows:
            pattern = frame_band(grid, window // 2, device=call.query.device)
            branches.append(
                block_sparse_attention(call.query, call.key, call.value, pattern, scale=call.scale)
            )
        # (B, F*H*W, heads, D) -> (B, F, H, W, heads*D)
        tokens = lambda x: x.reshape(x.shape[0], *grid, -1)  # noqa: E731
        blended = spectral_blend(
            [tokens(b) for b in branches], self.low_passes(grid, windows), dims=(1, 2, 3)
        )
        return blended.reshape(call.query.shape)
