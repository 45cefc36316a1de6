"""`attnpack bench patterns`: what building each method's pattern costs at the real geometries, on a CPU or a GPU.

One row per (method, geometry). Pattern rows build the method's `BlockSparsePattern` the way the method
does, with every `functools.lru_cache` of `attnpack.patterns.*` / `attnpack.methods.*` cleared and a fresh
method object, and report:

- first build (cold) and cached build (the same call again) in seconds;
- the first build's peak memory growth: on a CPU the process's peak RSS (VmHWM, reset through
  /proc/self/clear_refs; a thread sampling /proc/self/statm every millisecond where that is refused), on
  CUDA `torch.cuda.max_memory_allocated` above what was allocated before;
- block density, element density (timed on its own: it may count exactly) and their ratio (what the kernel
  computes per pair the pattern allows), blocks full / partial.

FreeNoise and FreeLong have no block pattern of their own worth timing: their rows run the method's
`attend` on random q, k, v of the real shapes and report the step's time and its memory as a ratio to the
dense attention's q, k, v and out bytes (q, k, v held + the step's peak growth, over 4x one tensor). Where
a CPU cannot run the attention itself at that size (Wan, 95,160 tokens), the attention is replaced by a
stand-in that returns a zero output of the same shape, so that the row measures the rest of the step
(FreeNoise's window slicing and accumulation, FreeLong's spectral blend); the row's note says so.

Each row runs in its own process (forked from a server that imported attnpack once) under a time limit: a
row past it is recorded as skipped, with whatever it had measured by then. Before its row the process builds
the kind's tiny geometry once (lazy imports, CUDA context, kernel loads), then clears the caches again.
"""

from __future__ import annotations

import fnmatch
import math
import os
import re
import statistics
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .report import plot_speedups, result_header, result_path, write_json

MB = 1e6

# Goals of issue 21 (first build; the memory is the first build's peak growth).
GOALS = {
    "first_build_s": {"cpu": 1.0, "cuda": 0.05},
    "host_us": {"cpu": 50.0, "cuda": 50.0},  # per call, before the launch
    "peak_mb": {"cpu": 200.0, "cuda": 200.0},
    "block_to_element": 1.6,  # radial spatial and trajectory rows
    "memory_vs_dense_io": 1.5,  # FreeNoise / FreeLong rows
}
PATTERN_KINDS = ("radial", "clear", "isolation", "trajectory", "frame_band")
TEMPORAL_KINDS = ("freenoise", "freelong")

# A box crossing the frame left to right over the video (the shape of workflows/trajectory.json's path),
# keyframes [video frame, y1, y2, x1, x2].
CROSSING = [[0, 0.34, 0.66, 0.02, 0.34], [80, 0.34, 0.66, 0.66, 0.98]]
TINY_CROSSING = [[0, 0.25, 0.75, 0.0, 0.4], [16, 0.25, 0.75, 0.6, 1.0]]
# Three subjects side by side (x0, y0, x1, y1), each from the middle of its own reference image.
SUBJECT_BOXES = [(0.04, 0.30, 0.34, 0.92), (0.36, 0.22, 0.64, 0.92), (0.66, 0.30, 0.96, 0.92)]
REFERENCE_BOX = (0.20, 0.08, 0.80, 0.96)


@dataclass(frozen=True)
class Row:
    name: str
    kind: str
    description: str
    params: dict[str, Any] = field(default_factory=dict)
    warmup: str | None = None  # the tiny row built first in the same process
    ratio_goal: bool = False  # block / element density <= 1.6
    stand_in_on_cpu: bool = False  # attention too slow for a CPU at this size: a zero-output stand-in


def _radial(name, description, frames, shape, preset, variant, text=0, text_first=False, warmup=None):
    params = dict(frames=frames, frame_shape=shape, text_tokens=text, text_first=text_first, variant=variant)
    return Row(
        name, "radial", description, params | preset, warmup, ratio_goal=variant == "spatial"
    )  # fmt: skip


WAN21 = dict(decay_factor=0.2, sink=True)  # RadialAttention.PRESETS["wan2.1"]
HUNYUAN = dict(decay_factor=0.95, sink=False)  # RadialAttention.PRESETS["hunyuanvideo"]
VIDEOS = [  # name, description, latent frames, tokens per frame, radial settings, text tokens, text first
    ("wan2.1-1.3b-480p-81f", "Wan 2.1 1.3B 480x832 81f: 21 x 30 x 52 = 32,760 tokens", 21, (30, 52), WAN21, 0, False),
    ("wan2.1-14b-720p-81f", "Wan 2.1 14B 720x1280 81f: 21 x 45 x 80 = 75,600 tokens", 21, (45, 80), WAN21, 0, False),
    ("hunyuan-720p-129f", "HunyuanVideo 720x1280 129f: 33 x 45 x 80 = 118,800 + 256 text (after)", 33, (45, 80),
     HUNYUAN, 256, False),
    ("cogvideox-480p-49f", "CogVideoX 480x720 49f: 13 x 30 x 45 = 17,550 + 226 text (first)", 13, (30, 45), WAN21,
     226, True),
]  # fmt: skip


def _rows() -> list[Row]:
    rows = [
        _radial("tiny-radial-official", "tiny: 5 x 16 x 16 + 16 text", 5, (16, 16), WAN21, "official", 16),
        _radial("tiny-radial-spatial", "tiny: 5 x 16 x 16 + 16 text", 5, (16, 16), WAN21, "spatial", 16),
        Row("tiny-clear", "clear", "tiny: 16 x 16 + 16 text", dict(grid=(16, 16), radius=4.0, text_tokens=16)),
        Row("tiny-clear-down2", "clear", "tiny: 16 x 16 + 16 text, pooled / 2",
            dict(grid=(16, 16), radius=4.0, text_tokens=16, down_factor=2)),
        Row("tiny-isolation", "isolation", "tiny: 16 x 16 target + 3 references",
            dict(grid=(16, 16), subjects=3)),
        Row("tiny-trajectory-self", "trajectory", "tiny: 5 x 8 x 16", dict(grid=(5, 8, 16), role="self",
            trajectory=TINY_CROSSING), ratio_goal=True),
        Row("tiny-trajectory-cross", "trajectory", "tiny: 5 x 8 x 16 queries, 2 x 8 text",
            dict(grid=(5, 8, 16), role="cross", text=8, trajectory=TINY_CROSSING), ratio_goal=True),
        Row("tiny-frame-band", "frame_band", "tiny: 9 x 4 x 8, radius 2", dict(grid=(9, 4, 8), radius=2)),
        Row("tiny-freenoise-animatediff", "freenoise", "tiny: 32 sequences of 24 frames, windows 8 / 4",
            dict(layout="temporal", sequences=32, frames=24, spatial=(4, 8), heads=2, head_dim=16,
                 context_length=8, context_stride=4)),
        Row("tiny-freenoise-wan", "freenoise", "tiny: 9 x 4 x 8 tokens, windows 5 / 2 (stand-in attention)",
            dict(layout="video", grid=(9, 4, 8), heads=2, head_dim=16, context_length=5, context_stride=2),
            stand_in_on_cpu=True),
        Row("tiny-freelong-animatediff", "freelong", "tiny: 32 sequences of 24 frames, window 8",
            dict(layout="temporal", sequences=32, frames=24, spatial=(4, 8), latent=(8, 16), heads=2,
                 head_dim=16, local_window=8)),
        Row("tiny-freelong-wan", "freelong", "tiny: 9 x 4 x 8 tokens, window 5 (stand-in attention)",
            dict(layout="video", grid=(9, 4, 8), heads=2, head_dim=16, local_window=5), stand_in_on_cpu=True),
    ]  # fmt: skip
    for variant in ("official", "spatial"):
        for name, description, frames, shape, preset, text, first in VIDEOS:
            rows.append(_radial(f"radial-{variant}-{name}", description, frames, shape, preset, variant, text,
                                first, f"tiny-radial-{variant}"))  # fmt: skip
    for pixels in (1024, 2048, 4096):
        grid = (pixels // 16, pixels // 16)
        for down in (None, 4):
            suffix = "" if down is None else f"-down{down}"
            pooled = "" if down is None else f", pooled / {down}"
            rows.append(Row(
                f"clear-r16-flux-{pixels}{suffix}", "clear",
                f"FLUX {pixels}²: {grid[0]} x {grid[1]} = {grid[0] * grid[1]:,} + 512 text (first){pooled}",
                dict(grid=grid, radius=16.0, text_tokens=512, down_factor=down),
                "tiny-clear" if down is None else "tiny-clear-down2",
            ))  # fmt: skip
    for side in (64, 32):
        rows.append(Row(
            f"isolation-sdxl-1024-{side}x{side}", "isolation",
            f"SDXL 1024² self-attention at {side} x {side}: {side * side:,} target queries, keys = 3 repositioned "
            f"references + target = {4 * side * side:,}", dict(grid=(side, side), subjects=3), "tiny-isolation",
        ))  # fmt: skip
    for name, description, grid in (
        ("wan2.1-480p-81f", "Wan 2.1 480x832 81f: 21 x 30 x 52 = 32,760 tokens", (21, 30, 52)),
        ("wan2.1-720p-81f", "Wan 2.1 720x1280 81f: 21 x 45 x 80 = 75,600 tokens", (21, 45, 80)),
    ):
        rows.append(
            Row(
                f"trajectory-self-{name}",
                "trajectory",
                f"{description}, self-attention",
                dict(grid=grid, role="self", trajectory=CROSSING),
                "tiny-trajectory-self",
                ratio_goal=True,
            )
        )
        rows.append(Row(f"trajectory-cross-{name}", "trajectory",
                        f"{description}, cross-attention to [background; foreground] text, 2 x 512",
                        dict(grid=grid, role="cross", text=512, trajectory=CROSSING), "tiny-trajectory-cross",
                        ratio_goal=True))  # fmt: skip
    wan241 = dict(layout="video", grid=(61, 30, 52), heads=12, head_dim=128)
    rows += [
        Row("frame-band-wan2.1-480p-241f", "frame_band",
            "FreeLong's frame band on Wan 2.1 480x832 241f: 61 x 30 x 52 = 95,160 tokens, radius 10",
            dict(grid=(61, 30, 52), radius=10), "tiny-frame-band"),
        Row("freenoise-wan2.1-480p-241f", "freenoise",
            "Wan 2.1 1.3B 480x832 241f: 61 x 30 x 52 = 95,160 tokens, 12 x 128 heads, windows 21 / 5",
            wan241 | dict(context_length=21, context_stride=5), "tiny-freenoise-wan", stand_in_on_cpu=True),
        Row("freenoise-animatediff-512-64f", "freenoise",
            "AnimateDiff 512² 64f, top motion-module level: 2 x 64 x 64 sequences, 8 x 40 heads, windows 16 / 4",
            dict(layout="temporal", sequences=2 * 64 * 64, frames=64, spatial=(64, 64), heads=8, head_dim=40,
                 context_length=16, context_stride=4), "tiny-freenoise-animatediff"),
        Row("freelong-wan2.1-480p-241f", "freelong",
            "Wan 2.1 1.3B 480x832 241f: 61 x 30 x 52 = 95,160 tokens, 12 x 128 heads, window 21",
            wan241 | dict(local_window=21), "tiny-freelong-wan", stand_in_on_cpu=True),
        Row("freelong-animatediff-512-64f", "freelong",
            "AnimateDiff 512² 64f, the largest level FreeLong blends (skip_highest_resolution): 2 x 32 x 32 "
            "sequences, 8 x 80 heads, window 16",
            dict(layout="temporal", sequences=2 * 32 * 32, frames=64, spatial=(32, 32), latent=(64, 64), heads=8,
                 head_dim=80, local_window=16), "tiny-freelong-animatediff"),
    ]  # fmt: skip
    return rows


ROWS = {row.name: row for row in _rows()}
GEOMETRIES = ROWS
SMOKE = tuple(name for name in ROWS if name.startswith("tiny-"))
DEFAULT = [name for name in ROWS if name not in SMOKE]
OPTIONS = ("time_limit",)


def select(names: list[str]) -> list[str]:
    """Row names from exact names, shell patterns (`clear-*`) or prefixes (`tiny`, `radial-spatial`), in the
    order given, each once."""
    chosen: list[str] = []
    for name in names:
        matches = [name] if name in ROWS else fnmatch.filter(ROWS, name) or fnmatch.filter(ROWS, f"{name}*")
        if not matches:
            raise ValueError(
                f"row {name!r} is not known (names, shell patterns and prefixes are accepted); known rows: "
                f"{', '.join(ROWS)}"
            )
        chosen += [m for m in matches if m not in chosen]
    return chosen


# ---- caches and memory


def clear_caches() -> None:
    """Clear every functools cache of the pattern and method modules (whatever their names are today)."""
    import sys

    for module_name, module in list(sys.modules.items()):
        if module is None or not module_name.startswith(("attnpack.patterns", "attnpack.methods")):
            continue
        for value in list(vars(module).values()):
            if callable(getattr(value, "cache_clear", None)) and hasattr(value, "cache_info"):
                value.cache_clear()


def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as status:
        return int(re.search(rf"^{field_name}:\s+(\d+) kB", status.read(), re.M).group(1))


class PeakMemory:
    """Peak memory growth of a block, in bytes: CUDA's allocator peak, or on a CPU the peak RSS (VmHWM after
    resetting it, exact), else a thread sampling /proc/self/statm every millisecond."""

    def __init__(self, device: torch.device):
        self.device = device
        self.method = ""
        self.peak = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated"
            return self
        self.before = _status_kib("VmRSS") * 1024
        try:
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")  # reset the peak RSS to the current RSS
            self.method = "peak RSS (VmHWM reset through /proc/self/clear_refs)"
            self._thread = None
        except OSError:
            self.method = "RSS sampled every 1 ms (/proc/self/statm)"
            self._sampled, self._stop = self.before, threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        with open("/proc/self/statm") as statm:
            while not self._stop.is_set():
                statm.seek(0)
                self._sampled = max(self._sampled, int(statm.read().split()[1]) * page)
                time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.before
        elif self._thread is None:
            self.peak = _status_kib("VmHWM") * 1024 - self.before
        else:
            self._stop.set()
            self._thread.join()
            self.peak = self._sampled - self.before


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- what each kind builds


def _prepare_pattern(row: Row, device: torch.device) -> tuple[Callable[[], Any], dict[str, Any]]:
    """A fresh build of the row's pattern (call it twice: cold, then cached) and what the row records."""
    p = row.params
    if row.kind == "radial":
        from ..patterns import radial

        settings = dict(decay_factor=p["decay_factor"], sink=p["sink"], variant=p["variant"], block_size=128)
        args = (p["frames"], tuple(p["frame_shape"]))
        kwargs = settings | dict(text_tokens=p["text_tokens"], text_first=p["text_first"], device=device)
        return (lambda: radial(*args, **kwargs)), settings | {"path": "attnpack.patterns.radial"}
    if row.kind == "clear":
        from ..patterns import clear_window

        settings = dict(radius=p["radius"], down_factor=p.get("down_factor"), text_tokens=p["text_tokens"])
        return (lambda: clear_window(tuple(p["grid"]), device=device, **settings)), settings | {
            "path": "attnpack.patterns.clear_window"
        }
    if row.kind == "frame_band":
        from ..patterns import frame_band

        return (lambda: frame_band(tuple(p["grid"]), p["radius"], device=device)), {
            "radius": p["radius"],
            "path": "attnpack.patterns.frame_band (FreeLongAttention on Wan)",
        }
    if row.kind == "trajectory":
        return _prepare_trajectory(row, device)
    if row.kind == "isolation":
        return _prepare_isolation(row, device)
    raise ValueError(f"bench patterns: kind {row.kind!r} builds no pattern")


def _call(query, key, layout, ctx, module=None, value=None):
    from ..families.base import AttnCall

    value = key if value is None else value
    return AttnCall(query, key, value, layout, module, site=None, context=ctx)


def _prepare_trajectory(row: Row, device: torch.device):
    """TrajectoryRoPE.sparse_attention on an attention call at step 0 (q / k tensors of the real lengths
    with one head of one channel: the method reads their lengths and device only)."""
    from ..context import AttnContext
    from ..layout import Role, TokenLayout
    from ..methods.trajectory import TrajectoryRoPE

    p = row.params
    grid = tuple(p["grid"])
    tokens = math.prod(grid)
    ctx = AttnContext()
    ctx.grid, ctx.step_index, ctx.num_steps = grid, 0, 50
    method = TrajectoryRoPE(trajectory=p["trajectory"])
    query = torch.zeros(1, tokens, 1, 1, device=device)
    if p["role"] == "self":
        call = _call(query, query, TokenLayout(Role.SELF, tokens, tokens, grid=grid), ctx)
    else:
        ctx.text_parts = (
            p["text"],
            p["text"],
        )  # what pipelines.trajectory_video sets: [background; foreground]
        key = torch.zeros(1, 2 * p["text"], 1, 1, device=device)
        call = _call(query, key, TokenLayout(Role.CROSS, tokens, 2 * p["text"], grid=grid), ctx)

    def build():
        attention = method.sparse_attention(call)
        if attention.pattern is None:
            raise RuntimeError("TrajectoryRoPE.sparse_attention ran dense at step 0")
        return attention.pattern

    return build, {
        "role": p["role"],
        "trajectory": p["trajectory"],
        "path": "TrajectoryRoPE.sparse_attention (layout, r_tokens, _segmented)",
    }


def _prepare_isolation(row: Row, device: torch.device):
    """The target's self-attention pattern at one SDXL level, made as IsolationAttention.attend makes it
    on every call: masks from the boxes, references repositioned onto the target's boxes, this step's
    dropout, the segments of the row, then the method's pattern (cached by segment layout)."""
    from ..methods.isolation import IsolationAttention, IsolationRun
    from ..patterns.subjects import reposition

    p = row.params
    grid = tuple(p["grid"])
    subjects = [
        dict(name=f"subject{i}", prompt=f"subject {i}", box=box, reference_box=REFERENCE_BOX)
        for i, box in enumerate(SUBJECT_BOXES[: p["subjects"]])
    ]
    method = IsolationAttention(subjects=subjects)
    run = IsolationRun()  # what the method keeps in the pipeline's context

    def build():
        targets, sources = method.masks(grid)
        moved = [reposition(torch.zeros(*grid, 1), s, t)[1] for s, t in zip(sources, targets, strict=True)]
        query_segments, key_segments = method.row_segments(targets, moved, run.step, grid, 0)
        return method.pattern(query_segments, torch.cat(key_segments), True, device)

    return build, {
        "subjects": subjects,
        "dropout": method.dropout,
        "path": "IsolationAttention masks + reposition + row_segments + pattern",
    }


def _prepare_temporal(row: Row, device: torch.device, dtype: torch.dtype):
    """The method's attend on random q, k, v of the row's shape: (step, q bytes, settings, stand-in patches)."""
    from ..context import AttnContext
    from ..layout import Role, TokenLayout
    from ..methods.freelong import FreeLongAttention
    from ..methods.freenoise import FreeNoiseAttention

    p = row.params
    ctx = AttnContext()
    ctx.step_index, ctx.num_steps = 0, 50
    if p["layout"] == "video":
        grid = tuple(p["grid"])
        tokens = math.prod(grid)
        shape = (1, tokens, p["heads"], p["head_dim"])
        layout = TokenLayout(Role.SELF, tokens, tokens, grid=grid)
        ctx.grid = grid
    else:
        frames = p["frames"]
        shape = (p["sequences"], frames, p["heads"], p["head_dim"])
        layout = TokenLayout(Role.TEMPORAL, frames, frames, grid=(frames,), batch_grid=tuple(p["spatial"]))
        ctx.grid = tuple(p.get("latent", p["spatial"]))
    if row.kind == "freenoise":
        method = FreeNoiseAttention(context_length=p["context_length"], context_stride=p["context_stride"])
    else:
        method = FreeLongAttention(local_window=p["local_window"])
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(shape, generator=g, device=device, dtype=dtype) for _ in range(3))
    call = _call(q, k, layout, ctx, module=torch.nn.Module(), value=v)
    patches = []
    stand_in = row.stand_in_on_cpu and device.type != "cuda"
    if stand_in:
        zeros = lambda query, *args, **kwargs: torch.zeros_like(query)  # noqa: E731
        if row.kind == "freenoise":
            from ..kernels.temporal_windows import reference

            patches = [(reference, "dense_attention", zeros)]
        else:
            from ..methods import freelong

            patches = [(freelong, "dense_attention", zeros), (freelong, "block_sparse_attention", zeros)]
    if row.kind == "freelong" and p["layout"] == "video":
        from ..patterns import frame_band

        for window in method.windows(grid[0]):  # built once per run: its own row (frame-band-*) times it
            frame_band(grid, window // 2, device=q.device)  # the method's cache key: the tensors' device
    settings = {key: value for key, value in vars(method).items() if not key.startswith("_")}
    settings["shape"] = list(shape)
    settings["path"] = f"{type(method).__name__}.attend" + (
        " with the attention replaced by a zero-output stand-in" if stand_in else ""
    )
    return (lambda: method.attend(call)), q.numel() * q.element_size(), settings, patches


# ---- one row


def _row_goals(row: Row, device: torch.device) -> dict[str, float]:
    where = "cuda" if device.type == "cuda" else "cpu"
    if row.kind in TEMPORAL_KINDS:
        return {"memory_vs_dense_io": GOALS["memory_vs_dense_io"]}
    goals = {key: GOALS[key][where] for key in ("first_build_s", "peak_mb", "host_us")}
    if row.ratio_goal:
        goals["block_to_element"] = GOALS["block_to_element"]
    return goals


def _measure_pattern(row: Row, device: torch.device, send: Callable[[dict], None]) -> None:
    clear_caches()
    build, settings = _prepare_pattern(row, device)
    send({"settings": settings})
    with PeakMemory(device) as memory:
        start = time.perf_counter()
        pattern = build()
        _sync(device)
        first = time.perf_counter() - start
    send({"first_s": first, "peak_mb": memory.peak / MB, "memory_method": memory.method})
    times = []
    for _ in range(5):
        start = time.perf_counter()
        again = build()
        _sync(device)
        times.append(time.perf_counter() - start)
    blocks = pattern.num_groups * pattern.num_q_blocks * pattern.num_kv_blocks
    send({
        "cached_s": statistics.median(times),
        "cached_same_object": again is pattern,
        "tokens": {"q": pattern.q_len, "kv": pattern.kv_len},
        "block_shape": [pattern.block_q, pattern.block_kv],
        "blocks": {"full": int(pattern.full.sum()), "partial": int(pattern.partial.sum()), "of": blocks},
        "block_density": pattern.block_density,
    })  # fmt: skip
    send(_host_time(pattern, device))
    start = time.perf_counter()
    element = pattern.element_density
    _sync(device)
    send({
        "element_density_s": time.perf_counter() - start,
        "element_density": element,
        "block_to_element": pattern.block_density / element if element > 0 else None,
    })  # fmt: skip


def _host_time(pattern, device: torch.device) -> dict[str, Any]:
    """Host work of one Triton forward call before its launch (the launch replaced by a no-op: outputs
    allocated, arguments looked up), in microseconds, median of 200 calls after the first, which makes the
    pattern's cached launch arguments. One head of 64 channels at the pattern's lengths."""
    from unittest import mock

    try:
        from ..kernels.block_sparse_attention import triton_kernels
    except ImportError as error:
        return {"host_us_note": f"triton does not import: {error}"}
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q = torch.zeros(1, pattern.q_len, 1, 64, device=device, dtype=dtype)
    kv = torch.zeros(1, pattern.kv_len, 1, 64, device=device, dtype=dtype)
    times = []
    with mock.patch.object(triton_kernels, "_launch", lambda *args: None):
        for _ in range(201):
            start = time.perf_counter()
            triton_kernels.forward(q, kv, kv, pattern, 0.125)
            times.append(time.perf_counter() - start)
    return {"host_us": statistics.median(times[1:]) * 1e6}


def _measure_temporal(row: Row, device: torch.device, send: Callable[[dict], None]) -> None:
    from unittest import mock

    clear_caches()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    step, unit, settings, patches = _prepare_temporal(row, device, dtype)
    note = None
    if patches:
        note = (
            "attention replaced by a zero-output stand-in (a CPU cannot attend this many tokens in the "
            "limit): measures the rest of the step"
        )
    send({"settings": settings, "dtype": str(dtype).removeprefix("torch."), "dense_io_mb": 4 * unit / MB}
         | ({"note": note} if note else {}))  # fmt: skip
    with _patched(mock, patches):
        with PeakMemory(device) as memory:
            start = time.perf_counter()
            out = step()
            _sync(device)
            first = time.perf_counter() - start
        del out
        send({
            "first_s": first,
            "peak_mb": memory.peak / MB,
            "memory_method": memory.method,
            "memory_vs_dense_io": (3 * unit + memory.peak) / (4 * unit),
        })  # fmt: skip
        start = time.perf_counter()
        step()
        _sync(device)
        send({"cached_s": time.perf_counter() - start})


class _patched:
    def __init__(self, mock, patches):
        self.contexts = [mock.patch.object(module, name, new) for module, name, new in patches]

    def __enter__(self):
        for context in self.contexts:
            context.__enter__()

    def __exit__(self, *exc):
        for context in reversed(self.contexts):
            context.__exit__(*exc)


def measure(name: str, device: torch.device, send: Callable[[dict], None]) -> None:
    """Measure one row, sending what it has learnt as it goes (so a row cut short keeps its first numbers);
    the kind's tiny row runs first, unrecorded."""
    row = ROWS[name]
    run_row = _measure_temporal if row.kind in TEMPORAL_KINDS else _measure_pattern
    if device.type == "cuda":
        torch.ones(1, device=device).sum().item()  # the CUDA context, outside any measurement
    if row.warmup is not None:
        run_row(ROWS[row.warmup], device, lambda _: None)
    run_row(row, device, send)


def _worker(name: str, device: str, connection) -> None:
    """A row's process: measure it, send each partial result, then "done" (or the error)."""
    try:
        measure(name, torch.device(device), connection.send)
    except Exception as error:  # the parent records it as the row's error
        connection.send(
            {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()[-2000:]}
        )
    connection.send("done")
    connection.close()


def _noop() -> None:
    pass


def _measure_in_subprocesses(names: list[str], device: torch.device, time_limit: float, progress):
    import multiprocessing

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    starter = context.Process(target=_noop)  # the server imports attnpack once, outside any row's limit
    starter.start()
    starter.join()
    for name in names:
        record: dict[str, Any] = {}
        receiver, sender = context.Pipe(duplex=False)
        process = context.Process(target=_worker, args=(name, str(device), sender), daemon=True)
        started = time.perf_counter()
        process.start()
        sender.close()
        finished = timed_out = False
        while not finished:
            left = time_limit - (time.perf_counter() - started)
            if left <= 0 or not receiver.poll(left):
                timed_out = True
                break
            try:
                message = receiver.recv()
            except EOFError:
                break
            if message == "done":
                finished = True
            else:
                record.update(message)
        if timed_out:
            process.kill()
            record["skipped"] = f"over the {time_limit:g} s limit"
        process.join()
        receiver.close()
        if not finished and not timed_out and "error" not in record:
            record["error"] = (
                f"the row's process ended with exit code {process.exitcode} (killed for memory?)"
            )
        record["row_wall_s"] = time.perf_counter() - started
        progress(name)
        yield name, record


def _measure_here(names: list[str], device: torch.device, progress):
    for name in names:
        record: dict[str, Any] = {}
        started = time.perf_counter()
        try:
            measure(name, device, record.update)
        except Exception as error:
            record["error"] = f"{type(error).__name__}: {error}"
        record["row_wall_s"] = time.perf_counter() - started
        progress(name)
        yield name, record


def _judge(row: Row, record: dict[str, Any], device: torch.device) -> dict[str, Any]:
    goals = _row_goals(row, device)
    passes: dict[str, bool | None] = {}
    for goal, limit in goals.items():
        value = record.get(goal)
        if value is None and goal == "first_build_s":
            value = record.get("first_s")
        if value is None:
            over = "skipped" in record and goal in ("first_build_s", "peak_mb")
            passes[goal] = False if over and goal == "first_build_s" else None
        else:
            passes[goal] = value <= limit
    if any(v is False for v in passes.values()):
        passed = False
    elif any(v is None for v in passes.values()):
        passed = None
    else:
        passed = True
    return {"goals": goals, "pass": passes, "passed": passed}


def _round(value):
    if isinstance(value, float):
        return float(f"{value:.4g}") if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _round(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_round(v) for v in value]
    return value


# ---- the suite


def run(
    names: list[str],
    *,
    device: str | None = None,
    out: Path | None = None,
    overwrite: bool = False,
    time_limit: float | None = 120.0,
) -> Path:
    """Measure the rows `names` (names, shell patterns or prefixes) on `device` (default: CUDA when present)
    and write JSON + PNG; returns the JSON's path. Each row runs in its own process under `time_limit`
    seconds; `time_limit=0` (or None) runs them in this process without a limit (the smoke test's way)."""
    from tqdm.auto import tqdm

    from ..environment import device_info

    names = select(list(names))
    if time_limit is not None and (isinstance(time_limit, bool) or not time_limit >= 0):
        raise ValueError(
            f"time_limit={time_limit!r} must be a number of seconds >= 0 (0: no limit, in process)"
        )
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device={str(device)!r}; accepted: cpu, cuda")
    info = device_info(device)
    out = result_path("patterns", info, out, overwrite)

    bar = tqdm(total=len(names), desc="bench patterns")

    def progress(name: str) -> None:
        bar.set_postfix_str(name, refresh=False)
        bar.update()

    if time_limit:
        measured = _measure_in_subprocesses(names, device, float(time_limit), progress)
    else:
        measured = _measure_here(names, device, progress)
    rows = []
    for name, record in measured:
        row = ROWS[name]
        rows.append(_round({"name": name, "kind": row.kind, "description": row.description, **record}
                           | _judge(row, record, device)))  # fmt: skip
    bar.close()
    where = "cuda" if device.type == "cuda" else "cpu"
    goals = {
        "first_build_s": GOALS["first_build_s"][where],
        "peak_mb": GOALS["peak_mb"][where],
        "host_us": GOALS["host_us"][where],
        "block_to_element": f"<= {GOALS['block_to_element']} for radial spatial and trajectory rows",
        "memory_vs_dense_io": f"<= {GOALS['memory_vs_dense_io']} for FreeNoise / FreeLong rows",
    }
    result = result_header(
        "patterns",
        info,
        torch.bfloat16 if device.type == "cuda" else torch.float32,
        {
            "first_s": "one cold call, every lru_cache of attnpack.patterns / attnpack.methods cleared, a fresh "
            "method object, after the kind's tiny row in the same process",
            "cached_s": "median of 5 repeated calls (patterns); one repeated call (FreeNoise / FreeLong)",
            "host_us": "one Triton forward call with its launch replaced by a no-op, median of 200 after the "
            "first (one head of 64 channels)",
            "peak_mb": "growth during the first call, 1 MB = 10^6 bytes",
            "time_limit_s": time_limit or None,
            "process": "one process per row (forkserver)" if time_limit else "all rows in this process",
        },
        [
            "dtype applies to the FreeNoise / FreeLong rows' random q, k, v (patterns are index tensors)",
            "memory_vs_dense_io = (q, k, v bytes + the step's peak growth) / (q, k, v, out bytes)",
            "block_to_element = block density / element density: pairs computed per pair allowed",
            "HunyuanVideo's text is the pipeline's padded 256 tokens (the family passes all of them, padding "
            "masked by key padding); CogVideoX's 226 come first",
            "radial settings are the model's preset (wan2.1 for Wan and CogVideoX, hunyuanvideo for HunyuanVideo)",
        ],
    ) | {"goals": goals, "rows": rows}
    write_json(out, result, overwrite)
    plot_speedups(
        out.with_suffix(".png"),
        f"attnpack pattern builds against their goals, {info['name']}",
        [r["name"] for r in rows],
        {
            "first build / goal": [_ratio(r.get("first_s"), r["goals"].get("first_build_s")) for r in rows],
            "peak memory / goal": [
                _ratio(r.get("peak_mb"), r["goals"].get("peak_mb"))
                or _ratio(r.get("memory_vs_dense_io"), r["goals"].get("memory_vs_dense_io"))
                for r in rows
            ],
            "block / element density / goal": [
                _ratio(r.get("block_to_element"), r["goals"].get("block_to_element")) for r in rows
            ],
        },
        overwrite,
        xlabel="measured / goal (1.0 is the goal: lower is better; a missing bar: not measured or no goal)",
    )
    return out


def _ratio(value, goal):
    return None if value is None or goal is None else value / goal


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def table(result: dict) -> list[str]:
    """The command line's summary of a result file: a markdown table, goals first."""
    goals = result["goals"]
    lines = [
        f"goals: first build < {goals['first_build_s']} s and < {goals['peak_mb']:g} MB; host work per call "
        f"< {goals['host_us']:g} µs; block / element "
        f"{goals['block_to_element']}; memory / dense I/O {goals['memory_vs_dense_io']}",
        "",
        "| row | tokens q x kv | first s | cached s | peak MB | block dens | elem dens | blk/elem | full / partial"
        " | elem dens s | host µs | vs dense I/O | pass | note |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for r in result["rows"]:
        tokens = r.get("tokens")
        shape = r.get("settings", {}).get("shape")
        if tokens:
            size = f"{tokens['q']:,} x {tokens['kv']:,}"
        elif shape:
            size = " x ".join(str(n) for n in shape)
        else:
            size = "-"
        blocks = r.get("blocks")
        counts = f"{blocks['full']:,} / {blocks['partial']:,}" if blocks else "-"
        passed = {True: "pass", False: "FAIL", None: "?"}[r.get("passed")]
        failed = [goal for goal, ok in r.get("pass", {}).items() if ok is False]
        if failed:
            passed += f" ({', '.join(failed)})"
        note = "; ".join(str(r[key]) for key in ("skipped", "error", "note") if r.get(key))
        lines.append(
            f"| {r['name']} | {size} | {_fmt(r.get('first_s'), '.3f')} | {_fmt(r.get('cached_s'), '.2g')} | "
            f"{_fmt(r.get('peak_mb'), '.0f')} | {_fmt(r.get('block_density'), '.4f')} | "
            f"{_fmt(r.get('element_density'), '.4f')} | {_fmt(r.get('block_to_element'), '.2f')} | {counts} | "
            f"{_fmt(r.get('element_density_s'), '.3f')} | {_fmt(r.get('host_us'), '.0f')} | "
            f"{_fmt(r.get('memory_vs_dense_io'), '.2f')} | "
            f"{passed} | {note} |"
        )
    return lines
