"""FreeLongAttention: SpectralBlend temporal attention for long videos (Lu et al., NeurIPS 2024).

Each temporal attention runs twice: globally (every frame sees every frame) and locally (every frame sees
the frames around it). The outputs are blended in frequency: the low frequencies of the global output and
the high frequencies of the local one, through a 3D FFT over (frames, height, width) and a Gaussian low-pass

    exp(-1/2 ((t / temporal_cutoff)^2 + (h / spatial_cutoff)^2 + (w / spatial_cutoff)^2))

on frequencies normalised to [-1, 1], computed in float32. Any frame count and resolution.

`variant="official"` (default) is the public code (aniki-ly/FreeLong, LaVie / VideoCrafter2 `combine()`):
the local mask of `get_adjusted_local_mask` (frames i - L/2 .. i + L/2, shifted to exactly L frames at the
ends: L + 1 frames in the middle for an even L), its low-pass on `arange(n) * 2 / n - 1` (off centre by 1/n
at odd sizes), both branches on the module's own frame positions (a masked call of the same attention), and
at the motion modules of the latent's resolution (`skip_highest_resolution`) the local output alone.
`variant="attnpack"`: exactly L frames per window, each with positions 0..L-1, a centred low-pass, and the
global output at the latent's resolution.

`band_windows` adds FreeLong++'s multi-band blend: wider local windows in between, each taking the band
of frequencies between its neighbours. On Wan the branches are video self-attention: global, and local
frames (official: the public mask; attnpack: |frame distance| <= window // 2) in the block-sparse kernel,
blended over the (F, H, W) token grid.

Frame positions (AnimateDiff): the global branch uses the module's own positions while the video fits its
table, and beyond that positions squeezed into the trained window (nearest), so that no frame sees a
position it was never trained on.

Memory: the blend runs with real FFTs over chunks of channels and writes into the global branch's buffer,
so a call holds its branches' outputs and a few chunks beyond q, k and v (no full-size complex spectra).
"""

from __future__ import annotations

import functools
import itertools
import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..families.base import AttnCall
from ..kernels import block_sparse_attention, dense_attention, global_local_attention
from ..layout import Role
from ..patterns.frame_band import frame_band, frame_window, frame_window_mask
from .base import AttentionMethod, check_choice, check_number, model_dense_attention
from .needs import Needs
from .temporal import defer_positions, position_offsets, table_length

logger = logging.getLogger("attnpack")
VARIANTS = ("official", "attnpack")


def gaussian_low_pass(
    shape: tuple[int, int, int], spatial_cutoff: float, temporal_cutoff: float, *, centred: bool = True
) -> torch.Tensor:
    """(T, H, W) float32 filter over fftshift-ed frequencies. `centred`: 1 at the zero frequency; else the
    public code's `arange(n) * 2 / n - 1`, the same at even sizes, 1/n below centre at odd ones (a size-1
    axis, which the public code never meets, stays at its zero frequency)."""

    def axis(n: int) -> torch.Tensor:
        if centred or n == 1:
            return (torch.arange(n) - n // 2) / max(n / 2, 1)
        return torch.arange(n).float() * 2 / n - 1

    t, h, w = (axis(n) for n in shape)
    exponent = (t[:, None, None] / temporal_cutoff) ** 2 + (h[None, :, None] / spatial_cutoff) ** 2
    exponent = exponent + (w[None, None, :] / spatial_cutoff) ** 2
    return torch.exp(-0.5 * exponent)


@functools.lru_cache(maxsize=32)
def _cached_low_pass(
    shape: tuple[int, int, int], spatial_cutoff: float, temporal_cutoff: float, centred: bool = True
) -> torch.Tensor:
    """gaussian_low_pass, computed once per (grid, cutoffs): the same filter serves every layer and step."""
    return gaussian_low_pass(shape, spatial_cutoff, temporal_cutoff, centred=centred)


CHUNK_SIZE = 1 << 22  # values per chunk of the blend (16 MiB in float32): wide enough for whole cache lines


def _half_spectrum(mask: torch.Tensor, dims: tuple[int, ...], ndim: int, device) -> torch.Tensor:
    """A (T, H, W) filter over shifted frequencies as a multiplier of rfftn(x, dim=sorted(dims)): in the
    tensor's axis order, unshifted, even (the real part of a blend of real tensors sees only the filter's
    even part, (G(f) + G(-f)) / 2; a Gaussian is even already), cut to the last axis' half spectrum."""
    order = sorted(range(len(dims)), key=lambda i: dims[i])  # the filter's axes in the tensor's order
    axes = tuple(range(len(dims)))
    mask = torch.fft.ifftshift(mask.to(device, torch.float32).permute(order), dim=axes)
    mask = (mask + torch.roll(torch.flip(mask, axes), (1,) * len(axes), axes)) / 2  # -f is (n - f) mod n
    mask = mask[..., : mask.shape[-1] // 2 + 1]
    shape = [1] * ndim
    for d, n in zip(sorted(dims), mask.shape, strict=True):
        shape[d] = n
    return mask.reshape(shape)


def _chunks(x: torch.Tensor, dims: tuple[int, ...], chunk_size: int):
    """Index tuples cutting `x` into chunks of about `chunk_size` values along its axes outside `dims`:
    the innermost of those axes (in memory) whole while they fit, then steps along the next, and one index
    at a time of the outer ones. A chunk always holds whole FFTs over `dims`."""
    free = sorted((d for d in range(x.ndim) if d not in dims), key=lambda d: (x.stride(d), d))
    values = 1
    for d in dims:
        values *= x.shape[d]
    split, step, outer = None, 1, []
    for i, d in enumerate(free):
        if values * x.shape[d] <= chunk_size:
            values *= x.shape[d]
            continue
        split, step, outer = d, max(1, chunk_size // values), free[i + 1 :]
        break
    whole = [slice(None)] * x.ndim
    for index in itertools.product(*(range(x.shape[d]) for d in outer)):
        for d, i in zip(outer, index, strict=True):
            whole[d] = slice(i, i + 1)
        if split is None:
            yield tuple(whole)
            continue
        for lo in range(0, x.shape[split], step):
            whole[split] = slice(lo, lo + step)
            yield tuple(whole)
        whole[split] = slice(None)


def spectral_blend(
    outputs: list[torch.Tensor],
    low_passes: list[torch.Tensor],
    dims: tuple[int, int, int],
    *,
    out: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Blend branches by frequency over the three `dims` (T, H, W order), in float32; returns the first
    branch's dtype. `outputs` run from the widest attention (global) to the narrowest, `low_passes` (one
    fewer, each wider than the last) split the spectrum between neighbours: branch 0 takes G_0, branch b
    takes G_b - G_(b-1), the last takes 1 - G_last. Two branches are FreeLong; more, FreeLong++'s bands.

    Computed as  x_last + sum_b ifft(G_b fft(x_b - x_(b+1)))  with real FFTs, over chunks of about
    `chunk_size` values (default CHUNK_SIZE) cut along the axes outside `dims`, so that the working memory
    is a few chunks, not full-size complex spectra. `out` (the outputs' shape) receives the result and may
    be one of `outputs`: each chunk is read whole before it is written."""
    if len(low_passes) != len(outputs) - 1:
        raise ValueError(f"spectral_blend: {len(outputs)} outputs need {len(outputs) - 1} low-pass filters")
    first = outputs[0]
    if any(x.shape != first.shape for x in outputs) or (out is not None and out.shape != first.shape):
        raise ValueError(
            f"spectral_blend: outputs and out must share one shape; got {[tuple(x.shape) for x in outputs]}"
            + ("" if out is None else f" and out {tuple(out.shape)}")
        )
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"spectral_blend: chunk_size={chunk_size!r} must be a positive integer")
    if out is None:
        out = torch.empty_like(first)
    if len(outputs) == 1:
        return out.copy_(first)
    fft_dims = sorted(dims)
    sizes = [first.shape[d] for d in fft_dims]
    masks = [_half_spectrum(mask, dims, first.ndim, first.device) for mask in low_passes]
    for index in _chunks(first, dims, chunk_size or CHUNK_SIZE):
        parts = [x[index].float() for x in outputs]
        spectrum = None
        for mask, wide, narrow in zip(masks, parts, parts[1:], strict=False):
            band = torch.fft.rfftn(wide - narrow, dim=fft_dims).mul_(mask)
            spectrum = band if spectrum is None else spectrum.add_(band)
        blended = torch.fft.irfftn(spectrum, s=sizes, dim=fft_dims).add_(parts[-1])
        out[index] = blended
    return out


@dataclass(eq=False, repr=False)
class FreeLongAttention(AttentionMethod):
    """SpectralBlend temporal attention: `local_window` frames per local window, `spatial_cutoff` /
    `temporal_cutoff` the Gaussian's width on normalised frequencies, `band_windows` wider local windows
    for FreeLong++'s multi-band blend (each band's temporal cutoff scaled by local_window / window),
    `skip_highest_resolution`: no blend at the latent's resolution (official: local output; attnpack:
    global), `variant`: "official" (the public code) or "attnpack" (see the module docstring)."""

    local_window: int = 16
    spatial_cutoff: float = 0.25
    temporal_cutoff: float = 0.25
    skip_highest_resolution: bool = True
    band_windows: tuple[int, ...] = ()
    variant: str = "official"

    name: ClassVar[str] = "freelong"
    needs: ClassVar[Needs] = Needs(runner="long_video", tab="Long video")
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
        check_choice(owner, "variant", self.variant, VARIANTS)
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

    @property
    def official(self) -> bool:
        return self.variant == "official"

    def low_passes(self, grid: tuple[int, int, int], windows: list[int]) -> list[torch.Tensor]:
        return [
            _cached_low_pass(
                tuple(grid),
                self.spatial_cutoff,
                self.temporal_cutoff * self.local_window / window,
                not self.official,
            )
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
        skip = self.skip_highest_resolution and highest
        if not windows or (skip and not self.official):
            query, key, value = call.query, call.key, call.value
            if global_offsets is not None:
                query, key, value = (
                    x + o.to(x.dtype) for x, o in zip((query, key, value), global_offsets, strict=True)
                )
            return model_dense_attention(call, query, key, value, scale=call.scale)
        if self.official:
            branches = self.masked_branches(call, windows, global_offsets, local_only=skip)
            if skip:
                return branches[-1]
        else:
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
        # (B*H*W, F, heads, D) -> (B, H, W, F, heads, D), a view: FFT over frames, height, width
        grid = lambda x: x.unflatten(0, (-1, height, width))  # noqa: E731
        low_passes = self.low_passes((frames, height, width), windows)
        # blended in place into the global branch, a buffer of this call's own
        spectral_blend([grid(b) for b in branches], low_passes, dims=(3, 1, 2), out=grid(branches[0]))
        return branches[0]

    def masked_branches(
        self, call: AttnCall, windows: list[int], global_offsets, *, local_only: bool = False
    ):
        """The public code's branches over frames: one attention on the module's own positions, unmasked
        (global) and under each window's `frame_window_mask` (local); `local_only`: the narrowest alone.
        Runs over chunks of about CHUNK_SIZE values of sequences, written into the branches' outputs."""
        query, key, value = call.query, call.key, call.value
        sequences, frames, heads, dim = query.shape
        masks = [frame_window_mask(frames, w, device=query.device) for w in windows]
        masks = masks[-1:] if local_only else [None, *masks]
        outputs = [torch.empty_like(query) for _ in masks]
        step = max(1, CHUNK_SIZE // (frames * heads * max(dim, frames)))
        for lo in range(0, sequences, step):
            rows = slice(lo, lo + step)
            q, k, v = query[rows], key[rows], value[rows]
            if global_offsets is not None:
                q, k, v = (x + o.to(x.dtype) for x, o in zip((q, k, v), global_offsets, strict=True))
            for out, mask in zip(outputs, masks, strict=True):
                out[rows] = dense_attention(q, k, v, attn_mask=mask, scale=call.scale)
        return outputs

    def attend_video_tokens(self, call: AttnCall) -> torch.Tensor:
        """A video DiT: global attention and each window's local frames (official: `frame_window`;
        attnpack: |frame distance| <= window // 2) in the block-sparse kernel, blended over the token grid."""
        grid = call.layout.grid
        if grid is None or len(grid) != 3:
            raise RuntimeError(f"FreeLongAttention: no video grid for {call.site.name}; attach the pipeline")
        global_out = model_dense_attention(call, call.query, call.key, call.value, scale=call.scale)
        windows = self.windows(grid[0])
        if not windows:
            return global_out
        branches = [global_out]
        for window in windows:
            if self.official:
                pattern = frame_window(grid, window, device=call.query.device)
            else:
                pattern = frame_band(grid, window // 2, device=call.query.device)
            branches.append(
                block_sparse_attention(call.query, call.key, call.value, pattern, scale=call.scale)
            )
        # (B, F*H*W, heads, D) -> (B, F, H, W, heads, D), a view whatever the kernels' output strides
        tokens = lambda x: x.unflatten(1, tuple(grid))  # noqa: E731
        spectral_blend(  # in place into the global branch, a buffer of this call's own
            [tokens(b) for b in branches],
            self.low_passes(grid, windows),
            dims=(1, 2, 3),
            out=tokens(global_out),
        )
        return global_out
