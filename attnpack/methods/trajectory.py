"""TrajectoryRoPE: DiTraj's trajectory control for video DiTs (Wan 2.1 / 2.2, CogVideoX, HunyuanVideo).

An object follows a user's path of boxes, training-free:

- STD-RoPE: during the first `rope_steps`, every foreground token at (f, h, w) takes the rotary position
  of (f, h_ref, w_ref) from the smallest box of the path (a larger box samples the reference patch
  nearest-neighbour), so the frames' foreground attends to itself as one object. The family's rotary
  service (`Family.rotary(model).reindex`) re-indexes the tables through a hook: nothing in diffusers is
  patched or copied;
- R-token mask (same steps): background tokens that sit where a frame's foreground takes its positions
  and the foreground tokens do not attend each other;
- foreground / background text (Wan, steps < `mask_steps`, conditional pass): the text context is
  [background prompt; foreground prompt], foreground video tokens attend only the foreground text and
  background tokens only the background text. `attnpack.pipelines.trajectory_video` feeds the texts and
  says so in the context (`AttnContext.text_parts`).

`variant="official"` (default) is the public code (HaofeiDing/DiTraj `run.py`, `transformer_wan.py`, `pipe.py`):
boxes interpolated as `plan_path` does and ended at `int(y2 * H)`, the box minus its last row and column
re-indexed (the corners `find_corners` finds, used as slice ends), the reference the first box smallest by
that measure, nearest rows `linspace(0, h - 1, n).round()` inside the reference box. `variant="attnpack"`:
boxes ended at `ceil(y2 * H)` (a box covers every token it touches, at least one), the whole box re-indexed
from the smallest whole box, nearest rows rounded in grid coordinates. Both mask the whole box.

Masks run in the block-sparse kernel as token segments. Trajectories are keyframe boxes
`[[frame, y1, y2, x1, x2], ...]` in normalised units (DiTraj / FreeTraj format), linearly interpolated, or
point tracks `[[{"x": .., "y": ..}, ...]]` (ComfyUI / ATI) turned into boxes of a given size.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..context import site_of
from ..families.base import AttnCall, reindex_tables
from ..layout import Role
from ..patterns.block_sparse import ElementRule
from ..patterns.subjects import segment_pattern
from .base import AttentionMethod, SparseAttention, check_number, dense_attention_of, run_sparse
from .needs import Input, Needs

logger = logging.getLogger("attnpack")
BACKGROUND, FOREGROUND, R_TOKEN, TEXT, FOREGROUND_TEXT = 0, 1, 2, 3, 4
VARIANTS = ("official", "attnpack")
DEFAULT_VARIANT = "official"


def _check_variant(owner: str, variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"{owner}: variant={variant!r} is not accepted; accepted: {', '.join(VARIANTS)}")


def parse_trajectory(trajectory: Any) -> list[tuple[int, float, float, float, float]]:
    """Keyframes [frame, y1, y2, x1, x2], checked: at least two, frames increasing integers >= 0, boxes
    inside [0, 1] and non-empty. Errors name the keyframe. An empty list is no foreground."""
    if trajectory is None or (isinstance(trajectory, list | tuple) and len(trajectory) == 0):
        return []
    if not isinstance(trajectory, list | tuple) or len(trajectory) < 2:
        raise ValueError(f"trajectory={trajectory!r} needs at least two keyframes [frame, y1, y2, x1, x2]")
    keyframes = []
    for k, key in enumerate(trajectory):
        if not isinstance(key, list | tuple) or len(key) != 5:
            raise ValueError(f"trajectory keyframe {k}: {key!r} must be [frame, y1, y2, x1, x2]")
        frame, *box = key
        if isinstance(frame, bool) or not isinstance(frame, int) or frame < 0:
            raise ValueError(f"trajectory keyframe {k}: frame {frame!r} must be an integer >= 0")
        if keyframes and frame <= keyframes[-1][0]:
            raise ValueError(
                f"trajectory keyframe {k}: frame {frame} must come after frame {keyframes[-1][0]}"
            )
        if not all(isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v <= 1 for v in box):
            raise ValueError(f"trajectory keyframe {k}: box {box!r} must lie inside [0, 1]")
        y1, y2, x1, x2 = (float(v) for v in box)
        if not (y1 < y2 and x1 < x2):
            raise ValueError(f"trajectory keyframe {k}: box {box!r} is empty (needs y1 < y2 and x1 < x2)")
        keyframes.append((frame, y1, y2, x1, x2))
    return keyframes


def points_to_trajectory(
    tracks: Any,
    box_size: tuple[float, float] = (0.2, 0.2),
    *,
    width: int | None = None,
    height: int | None = None,
) -> list[tuple[int, float, float, float, float]]:
    """A point track `[[{"x": .., "y": ..}, ...]]` (one point per video frame; normalised, or pixels with
    `width` / `height`) as keyframe boxes of `box_size` (height, width) centred on the points. The first
    track is the object; more tracks are refused."""
    if not isinstance(tracks, list | tuple) or len(tracks) != 1 or not isinstance(tracks[0], list | tuple):
        raise ValueError("points: give one track, [[{'x': .., 'y': ..}, ...]] with one point per frame")
    half_h, half_w = box_size[0] / 2, box_size[1] / 2
    keyframes = []
    for frame, point in enumerate(tracks[0]):
        if not isinstance(point, dict) or "x" not in point or "y" not in point:
            raise ValueError(f"points: point {frame} {point!r} must be {{'x': .., 'y': ..}}")
        x, y = float(point["x"]), float(point["y"])
        if width is not None and height is not None:
            x, y = x / width, y / height
        x, y = min(max(x, half_w), 1 - half_w), min(max(y, half_h), 1 - half_h)  # the box stays inside
        keyframes.append([frame, y - half_h, y + half_h, x - half_w, x + half_w])
    return parse_trajectory(keyframes)


def box_at(keyframes, frame: float, *, variant: str = "attnpack") -> tuple[float, float, float, float]:
    """The (y1, y2, x1, x2) box at a (fractional) video frame: linear between keyframes, held outside.
    variant="official" computes it as the public `plan_path` does, `(frame - f0) * ((b - a) / (f1 - f0)) + a`
    (the same up to rounding, which `int()` of the box ends can see)."""
    _check_variant("box_at", variant)
    if frame <= keyframes[0][0]:
        return keyframes[0][1:]
    for (f0, *b0), (f1, *b1) in itertools.pairwise(keyframes):
        if frame <= f1:
            if variant == "official":
                return tuple((frame - f0) * ((b - a) / (f1 - f0)) + a for a, b in zip(b0, b1, strict=True))
            t = (frame - f0) / (f1 - f0)
            return tuple(a + t * (b - a) for a, b in zip(b0, b1, strict=True))
    return keyframes[-1][1:]


def token_boxes(
    keyframes, grid: tuple[int, int, int], frames_per_latent: int, *, variant: str = DEFAULT_VARIANT
) -> list[tuple[int, int, int, int]]:
    """Per latent frame the box in tokens (h1, h2, w1, w2), ends exclusive. official: `int()` of every
    edge, as the public `run.py` (a box may cover no token: no foreground there); attnpack: ends rounded
    up, at least one token."""
    _check_variant("token_boxes", variant)
    frames, height, width = grid
    boxes = []
    for f in range(frames):
        y1, y2, x1, x2 = box_at(keyframes, f * frames_per_latent, variant=variant)
        if variant == "official":
            boxes.append((int(y1 * height), int(y2 * height), int(x1 * width), int(x2 * width)))
            continue
        h1, w1 = min(int(y1 * height), height - 1), min(int(x1 * width), width - 1)
        h2, w2 = max(math.ceil(y2 * height), h1 + 1), max(math.ceil(x2 * width), w1 + 1)
        boxes.append((h1, min(h2, height), w1, min(w2, width)))
    return boxes


def remap_index(
    grid: tuple[int, int, int], boxes, *, variant: str = DEFAULT_VARIANT
) -> tuple[torch.Tensor, torch.Tensor]:
    """STD-RoPE as a gather: (source token per token (S,), foreground mask (S,)). A foreground token at
    (f, h, w) takes (f, h_ref, w_ref) from the smallest box, sampled nearest-neighbour in larger boxes.
    official: the box minus its last row and column is re-indexed, from the first box smallest by that
    measure (boxes under two tokens high or wide, where the public code fails, keep their positions and are
    no reference); attnpack: the whole box, from the smallest whole box. The foreground is the whole box."""
    _check_variant("remap_index", variant)
    frames, height, width = grid
    index = torch.arange(frames * height * width).reshape(frames, height, width)
    source = index.clone()
    foreground = torch.zeros(frames, height, width, dtype=torch.bool)
    for f, (h1, h2, w1, w2) in enumerate(boxes):
        foreground[f, h1:h2, w1:w2] = True
    if variant == "official":
        moved = [(h1, h2 - 1, w1, w2 - 1) for h1, h2, w1, w2 in boxes]  # corners as slice ends
        area = lambda b: max(b[1] - b[0], 0) * max(b[3] - b[2], 0)  # noqa: E731
        usable = [f for f in range(len(moved)) if area(moved[f]) > 0]
        if len(usable) < len(moved) and usable:
            logger.info(
                "TrajectoryRoPE(variant='official'): at a %d x %d token grid some boxes are under two tokens "
                "high or wide, where the public code fails; the smallest box of two or more tokens each way "
                "is the reference and the thinner boxes keep their own positions",
                height,
                width,
            )
        if not usable:
            return source.flatten(), foreground.flatten()
        r = moved[min(usable, key=lambda f: (area(moved[f]), f))]
        for f, (h1, h2, w1, w2) in enumerate(moved):
            if area((h1, h2, w1, w2)) == 0:
                continue
            if (h2 - h1, w2 - w1) == (r[1] - r[0], r[3] - r[2]):
                rows, cols = torch.arange(r[0], r[1]), torch.arange(r[2], r[3])
            else:
                rows = r[0] + torch.linspace(0, r[1] - r[0] - 1, h2 - h1).round().long()
                cols = r[2] + torch.linspace(0, r[3] - r[2] - 1, w2 - w1).round().long()
            source[f, h1:h2, w1:w2] = index[f][rows[:, None], cols[None, :]]
        return source.flatten(), foreground.flatten()
    r = min(boxes, key=lambda b: (b[1] - b[0]) * (b[3] - b[2]))
    for f, (h1, h2, w1, w2) in enumerate(boxes):
        rows = torch.linspace(r[0], r[1] - 1, h2 - h1).round().long()
        cols = torch.linspace(r[2], r[3] - 1, w2 - w1).round().long()
        source[f, h1:h2, w1:w2] = index[f][rows[:, None], cols[None, :]]
    return source.flatten(), foreground.flatten()


def r_tokens(source: torch.Tensor, foreground: torch.Tensor) -> torch.Tensor:
    """Background tokens whose own position is one a foreground token takes (S,) bool."""
    taken = torch.zeros_like(foreground)
    taken[source[foreground]] = True
    return taken & ~foreground


@dataclass(eq=False, repr=False)
class TrajectoryRoPE(AttentionMethod):
    """Trajectory control. `trajectory`: keyframe boxes (or `points`: a point track with `box_size`);
    `rope_steps`: steps with STD-RoPE and the R-token mask; `mask_steps`: steps with separated foreground /
    background text (Wan, with `fg_prompt` / `bg_prompt`); `frames_per_latent`: video frames per latent frame
    (4 for Wan, HunyuanVideo, CogVideoX 1.0; 8 for CogVideoX 1.5); `variant`: "official" (the public code's
    boxes and re-index) or "attnpack" (see the module docstring)."""

    trajectory: list = field(default_factory=list)
    fg_prompt: str | None = None
    bg_prompt: str | None = None
    rope_steps: int = 5
    mask_steps: int = 30
    points: list | None = None
    box_size: tuple[float, float] = (0.2, 0.2)
    frames_per_latent: int = 4
    variant: str = DEFAULT_VARIANT

    name: ClassVar[str] = "trajectory"
    needs: ClassVar[Needs] = Needs(
        runner="trajectory", tab="Trajectory",
        inputs=(
            Input("trajectory", "keyframes", "Keyframe boxes", required=True, alternatives=("points",)),
            Input("fg_prompt", "text", "Foreground prompt (Wan, optional)"),
            Input("bg_prompt", "text", "Background prompt (Wan, optional)"),
        ),
    )  # fmt: skip
    families: ClassVar[tuple[str, ...]] = ("wan", "cogvideox", "hunyuan_video")
    roles: ClassVar[frozenset[Role]] = frozenset({Role.SELF, Role.CROSS, Role.JOINT})
    family_roles: ClassVar[dict[str, frozenset[Role]]] = {
        "wan": frozenset({Role.SELF, Role.CROSS}),
        "cogvideox": frozenset({Role.JOINT}),
        "hunyuan_video": frozenset({Role.JOINT}),
    }
    needs_context: ClassVar[bool] = True
    context_parallel: ClassVar[frozenset[str]] = frozenset({"ulysses", "ring"})

    def __post_init__(self):
        owner = "TrajectoryRoPE"
        if self.points is not None:
            if self.trajectory:
                raise ValueError(f"{owner}: give trajectory or points, not both")
            self.trajectory = points_to_trajectory(self.points, tuple(self.box_size))
        self.keyframes = parse_trajectory(self.trajectory)
        check_number(owner, "rope_steps", self.rope_steps, low=0, integer=True)
        check_number(owner, "mask_steps", self.mask_steps, low=0, integer=True)
        check_number(owner, "frames_per_latent", self.frames_per_latent, low=1, integer=True)
        _check_variant(owner, self.variant)
        if (self.fg_prompt is None) != (self.bg_prompt is None):
            raise ValueError(f"{owner}: give both fg_prompt and bg_prompt, or neither")
        self._background_text_len: int | None = None  # only through the deprecated background_text_len

    @property
    def background_text_len(self) -> int | None:
        warnings.warn(
            "TrajectoryRoPE.background_text_len is deprecated: a pipeline that feeds [background; foreground] "
            "text sets AttnContext.text_parts = (background, foreground) for the denoiser call",
            DeprecationWarning,
            stacklevel=2,
        )
        return self._background_text_len

    @background_text_len.setter
    def background_text_len(self, length: int | None) -> None:
        warnings.warn(
            "TrajectoryRoPE.background_text_len is deprecated: a pipeline that feeds [background; foreground] "
            "text sets AttnContext.text_parts = (background, foreground) for the denoiser call",
            DeprecationWarning,
            stacklevel=2,
        )
        self._background_text_len = length

    def layout(self, grid: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(source token per token, foreground mask) of STD-RoPE at a token grid (see `remap_index`)."""
        return _remap_layout(tuple(self.keyframes), tuple(grid), self.frames_per_latent, self.variant)

    def rope_now(self, ctx) -> bool:
        return bool(self.keyframes) and ctx.grid is not None and (ctx.step_index or 0) < self.rope_steps

    # ---- the rotary hook

    def install(self, processors: dict[torch.nn.Module, Any], denoisers: dict[str, torch.nn.Module]):
        if not self.keyframes:
            return None
        undo = []
        for name, model in denoisers.items():
            site = next((site_of(m) for m in processors if site_of(m).denoiser == name), None)
            if site is None:
                continue
            rotary = site.family.rotary(model)
            if rotary is None:
                raise ValueError(
                    f"TrajectoryRoPE: {site.family.title} has no rotary embedding for STD-RoPE to re-index; "
                    f"it runs on the families {list(self.families)}"
                )
            ctx = site.context
            undo.append(
                rotary.reindex(lambda ctx=ctx: self.layout(ctx.grid)[0] if self.rope_now(ctx) else None)
            )
        return lambda: [step() for step in undo]

    def remap(self, rotary, grid, config=None) -> Any:
        """(cos, sin) tables with one row per video token, rows re-indexed by STD-RoPE; under context
        parallelism (`config`) this rank's rows of the re-indexed tables."""
        return reindex_tables(rotary, self.layout(grid)[0], config)

    def text_parts(self, ctx) -> tuple[int, ...] | None:
        """The (background, foreground) text lengths of the current denoiser call, or None."""
        if ctx.text_parts is not None:
            return ctx.text_parts
        length = self._background_text_len
        return None if length is None else (length, length)

    # ---- masks

    def attend(self, call: AttnCall) -> torch.Tensor:
        return run_sparse(call, self.sparse_attention(call))

    def sparse_attention(self, call: AttnCall) -> SparseAttention:
        ctx, layout = call.context, call.layout
        if not self.keyframes or ctx.grid is None or call.attn_mask is not None:
            return dense_attention_of(call)
        step = ctx.step_index or 0
        grid, device = tuple(ctx.grid), str(call.query.device)
        if layout.role is Role.CROSS:
            parts = self.text_parts(ctx)
            if parts is None or len(parts) != 2 or step >= self.mask_steps or call.key.shape[1] != sum(parts):
                return dense_attention_of(call)  # plain text (the unconditional pass, or later steps)
            pattern = _text_pattern(
                tuple(self.keyframes), self.frames_per_latent, self.variant, grid, tuple(parts), device
            )
            return SparseAttention(pattern, call.scale)
        if step >= self.rope_steps:
            return dense_attention_of(call)
        text_len = layout.text_len if layout.role is Role.JOINT else 0
        pattern = _r_token_pattern(
            tuple(self.keyframes),
            self.frames_per_latent,
            self.variant,
            grid,
            text_len,
            layout.text_first,
            device,
        )
        return SparseAttention(pattern, call.scale)


# Layouts and patterns are pure functions of the trajectory settings and the token layout: cached here, the
# same for every layer, step, pipeline and method object.


@functools.lru_cache(maxsize=64)
def _remap_layout(keyframes: tuple, grid: tuple[int, int, int], frames_per_latent: int, variant: str):
    boxes = token_boxes(keyframes, grid, frames_per_latent, variant=variant)
    return remap_index(grid, boxes, variant=variant)


def _segmented(q_segments: torch.Tensor, k_segments: torch.Tensor, allow: torch.Tensor, device: str):
    rule = ElementRule(allow, torch.zeros_like(allow))
    return segment_pattern(rule, q_segments.to(device), k_segments.to(device))


@functools.lru_cache(maxsize=64)
def _text_pattern(
    keyframes: tuple, frames_per_latent: int, variant: str, grid: tuple, parts: tuple[int, int], device: str
):
    """Foreground video tokens see the foreground text only, background tokens the background text."""
    _, foreground = _remap_layout(keyframes, grid, frames_per_latent, variant)
    q = foreground.to(torch.int32)  # BACKGROUND 0 / FOREGROUND 1
    background, foreground_text = parts
    k = torch.cat([torch.full((background,), TEXT), torch.full((foreground_text,), FOREGROUND_TEXT)])
    allow = torch.zeros(5, 5, dtype=torch.bool)
    allow[BACKGROUND, TEXT] = allow[FOREGROUND, FOREGROUND_TEXT] = True
    return _segmented(q, k.to(torch.int32), allow, device)


@functools.lru_cache(maxsize=64)
def _r_token_pattern(
    keyframes: tuple,
    frames_per_latent: int,
    variant: str,
    grid: tuple,
    text_len: int,
    text_first: bool,
    device: str,
):
    """Every token sees every token, but foreground and R tokens do not see each other."""
    source, foreground = _remap_layout(keyframes, grid, frames_per_latent, variant)
    video = foreground.to(torch.int32)
    video[r_tokens(source, foreground)] = R_TOKEN
    text = torch.full((text_len,), TEXT, dtype=torch.int32)
    segments = torch.cat([text, video]) if text_first else torch.cat([video, text])
    allow = torch.ones(5, 5, dtype=torch.bool)
    allow[FOREGROUND, R_TOKEN] = allow[R_TOKEN, FOREGROUND] = False
    return _segmented(segments, segments, allow, device)


def trajectory_picture(
    keyframes, num_frames: int, size: tuple[int, int] = (256, 144), columns: int = 8, frames=None
):
    """The planned boxes over the video: `columns` frames side by side (over `frames`, PIL images, when
    given), each with its box and frame number."""
    from PIL import Image, ImageDraw

    keyframes = parse_trajectory(keyframes)
    width, height = size
    picks = [round(i * (num_frames - 1) / max(columns - 1, 1)) for i in range(columns)]
    sheet = Image.new("RGB", (width * columns, height + 14), "white")
    draw = ImageDraw.Draw(sheet)
    for c, frame in enumerate(picks):
        tile = frames[frame].resize(size) if frames is not None else Image.new("RGB", size, (235, 235, 235))
        sheet.paste(tile, (c * width, 0))
        if keyframes:
            y1, y2, x1, x2 = box_at(keyframes, frame)
            draw.rectangle(
                [c * width + x1 * width, y1 * height, c * width + x2 * width - 1, y2 * height - 1],
                outline=(40, 200, 40),
                width=2,
            )
        draw.text((c * width + 2, height + 1), f"frame {frame}", fill="black")
    return sheet


__all__ = [
    "TrajectoryRoPE",
    "box_at",
    "parse_trajectory",
    "points_to_trajectory",
    "r_tokens",
    "remap_index",
    "token_boxes",
    "trajectory_picture",
]
