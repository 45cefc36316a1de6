"""What the temporal-window methods (FreeNoise, FreeLong) share: frame windows and the motion modules' positions.

AnimateDiff's motion modules add sinusoidal frame positions (at most `motion_max_seq_length`, usually 32)
to the normed hidden states before each temporal attention. A window must see positions 0..L-1 whatever
frames it covers, and a video longer than the table must not index past it, so while a temporal method is
applied the block's position module adds nothing and the processor adds the positions itself: projections
are linear, so `to_q(x + p) = to_q(x) + W_q p`, and the position offsets are computed once per call. How a
family's blocks hand their positions over is the family's (`Family.temporal_blocks(model)`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..context import site_of
from ..families.base import POSITIONS_ATTR
from ..families.unet import DeferredPositions  # noqa: F401  (imported from here by users and tests)


def temporal_modules(processors: dict[torch.nn.Module, Any], denoisers: dict[str, torch.nn.Module]):
    """The attached attention modules of `processors` by denoiser: [(family, model, modules), ...]."""
    found: dict[str, tuple] = {}
    for module in processors:
        site = site_of(module)
        if site is not None:
            found.setdefault(site.denoiser, (site.family, denoisers[site.denoiser], []))[2].append(module)
    return list(found.values())


def defer_positions(processors: dict[torch.nn.Module, Any], denoisers: dict[str, torch.nn.Module]):
    """For every temporal attention module in `processors`, move its block's frame positions into the
    processor's hands (families without temporal blocks have none to move). Returns the undo."""
    undo = []
    for family, model, modules in temporal_modules(processors, denoisers):
        blocks = family.temporal_blocks(model)
        if blocks is not None:
            undo.append(blocks.defer_positions(modules))

    def restore():
        for step in reversed(undo):
            step()

    return restore


def position_offsets(attn: torch.nn.Module, rows: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
    """(W_q p, W_k p, W_v p) as (len(rows), H, D) for the module's position table at `rows`, or None when
    the module has no deferred positions."""
    table = getattr(attn, POSITIONS_ATTR, None)
    if table is None:
        return None
    if attn.norm_q is not None or attn.norm_k is not None:
        raise RuntimeError("temporal windows need linear q/k projections; this module normalises q or k")
    positions = table[0, rows.to(table.device)].to(attn.to_q.weight.dtype)
    return tuple(
        F.linear(positions, projection.weight).unflatten(-1, (attn.heads, -1))
        for projection in (attn.to_q, attn.to_k, attn.to_v)
    )


def table_length(attn: torch.nn.Module) -> int | None:
    table = getattr(attn, POSITIONS_ATTR, None)
    return None if table is None else table.shape[1]


def frame_windows(num_frames: int, length: int, stride: int) -> list[tuple[int, int]]:
    """Windows of `length` frames every `stride` frames; where they stop short of the end, one more window
    ends at the last frame. A video no longer than a window is one window."""
    if num_frames <= length:
        return [(0, num_frames)]
    windows = [(start, start + length) for start in range(0, num_frames - length + 1, stride)]
    if windows[-1][1] < num_frames:
        windows.append((num_frames - length, num_frames))
    return windows
