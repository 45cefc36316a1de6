"""FreeLongAttention: SpectralBlend temporal attention for long videos (Lu et al., NeurIPS 2024).

Each temporal attention runs twice: globally (every frame sees every frame) and locally (every frame sees
exactly `local_window` frames around it, the window shifted inside at the ends). The outputs are blended
in frequency: the low frequencies of the global output and the high frequencies of the local one, through
a 3D FFT over (frames, height, width) and a Gaussian low-pass

    exp(-1/2 ((t / temporal_cutoff)^2 + (h / spatial_cutoff)^2 + (w / spatial_cutoff)^2))

on centred frequencies normalised to [-1, 1], computed in float32. Any frame count and resolution.
`skip_highest_resolution` leaves the motion modules at the latent's resolution global, as the paper does.

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
from ..kernels import dense_attention
from ..layout import Role
from .base import AttentionMethod, check_choice, check_number
from .temporal import centered_windows, defer_positions, position_offsets, table_length

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
    global_out: torch.Tensor, local_out: torch.Tensor, low_pass: torch.Tensor, dims: tuple[int, int, int]
) -> torch.Tensor:
    """Low frequencies of `global_out`, high ones of `local_out`, over the three `dims` (T, H, W order),
    in float32; returns the input dtype."""
    g, l = global_out.float(), local_out.float()  # noqa: E741
    shape = [1] * g.ndim
    for d, n in zip(dims, low_pass.shape, strict=True):
        shape[d] = n
    order = sorted(range(len(dims)), key=lambda i: dims[i])  # the filter's axes in the tensor's order
    mask = low_pass.to(g.device).permute(order).reshape(shape)
    spectrum = lambda x: torch.fft.fftshift(torch.fft.fftn(x, dim=dims), dim=dims)  # noqa: E731
    mixed = spectrum(g) * mask + spectrum(l) * (1 - mask)
    out = torch.fft.ifftn(torch.fft.ifftshift(mixed, dim=dims), dim=dims).real
    return out.to(global_out.dtype)


def local_window_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    window: int,
    *,
    offsets: tuple[torch.Tensor, ...] | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Every frame of (B, F, H, D) attends exactly the `window` frames of the window around it (shifted
    inside at the ends); `offsets` (window, H, D) are the positions 0..window-1 inside each window."""
    batch, frames, heads, dim = query.shape
    window = min(window, frames)
    scale = dim**-0.5 if scale is None else scale
    starts = centered_windows(frames, window).to(query.device)  # (F,)
    band = starts[:, None] + torch.arange(window, device=query.device)  # (F, window)
    q, k, v = query.float(), key.float(), value.float()
    if offsets is not None:
        q_offset, k_offset, v_offset = (o.float() for o in offsets)
        q = q + q_offset[torch.arange(frames, device=q.device) - starts]
    scores = torch.einsum("bihd,bjhd->bhij", q, k)  # every pair, then the band picked out
    scores = scores.gather(-1, band.expand(batch, heads, frames, window))
    if offsets is not None:
        scores = scores + torch.einsum("bihd,jhd->bhij", q, k_offset[:window])
    probs = (scores * scale).softmax(dim=-1)
    full = torch.zeros(batch, heads, frames, frames, device=q.device).scatter(
        -1, band.expand(batch, heads, frames, window), probs
    )
    out = torch.einsum("bhij,bjhd->bihd", full, v)
    if offsets is not None:
        out = out + torch.einsum("bhij,jhd->bihd", probs, v_offset[:window])
    return out.to(query.dtype)


@dataclass(eq=False, repr=False)
class FreeLongAttention(AttentionMethod):
    """SpectralBlend temporal attention for AnimateDiff motion modules: `local_window` frames per local
    window, `spatial_cutoff` / `temporal_cutoff` the Gaussian's width on normalised frequencies."""

    local_window: int = 16
    spatial_cutoff: float = 0.25
    temporal_cutoff: float = 0.25
    skip_highest_resolution: bool = True

    name: ClassVar[str] = "freelong"
    families: ClassVar[tuple[str, ...]] = ("unet",)
    roles: ClassVar[frozenset[Role]] = frozenset({Role.TEMPORAL})
    needs_context: ClassVar[bool] = True

    def __post_init__(self):
        owner = "FreeLongAttention"
        check_number(owner, "local_window", self.local_window, low=1, integer=True)
        check_number(owner, "spatial_cutoff", self.spatial_cutoff, low=0, low_inclusive=False)
        check_number(owner, "temporal_cutoff", self.temporal_cutoff, low=0, low_inclusive=False)
        check_choice(owner, "skip_highest_resolution", self.skip_highest_resolution, (True, False))

    def install(self, processors: dict[torch.nn.Module, Any], denoisers: dict[str, torch.nn.Module]):
        return defer_positions(processors, denoisers)

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
        query, key, value = call.query, call.key, call.value
        frames = query.shape[1]
        offsets = position_offsets(call.module, self.global_positions(call, frames))
        if offsets is not None:
            query, key, value = (x + o.to(x.dtype) for x, o in zip((query, key, value), offsets, strict=True))
        global_out = dense_attention(query, key, value, scale=call.scale)
        spatial = call.layout.batch_grid
        ctx = call.context
        highest = spatial is not None and ctx.grid is not None and tuple(spatial) == tuple(ctx.grid[-2:])
        if frames <= self.local_window or (self.skip_highest_resolution and highest):
            return global_out
        local_offsets = position_offsets(call.module, torch.arange(self.local_window))
        local_out = local_window_attention(
            call.query, call.key, call.value, self.local_window, offsets=local_offsets, scale=call.scale
        )
        if spatial is None:
            logger.info(
                "FreeLongAttention: no spatial grid for %s, blending over frames only", call.site.name
            )
            spatial = (1, 1)
        height, width = spatial
        # (B*H*W, F, heads, D) -> (B, H, W, F, heads*D): FFT over frames, height, width
        grid = lambda x: x.reshape(-1, height, width, frames, x.shape[2] * x.shape[3])  # noqa: E731
        low_pass = gaussian_low_pass((frames, height, width), self.spatial_cutoff, self.temporal_cutoff)
        blended = spectral_blend(grid(global_out), grid(local_out), low_pass, dims=(3, 1, 2))
        return blended.reshape(query.shape)
