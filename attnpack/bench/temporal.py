"""`attnpack bench temporal`: the temporal attention of AnimateDiff's motion modules at 512², 64 frames.

One geometry per motion-module level (B = 2 with guidance, so B·H·W sequences of 64 frames): 64 x 64 pixels
with 8 heads of 40, 32 x 32 with 8 of 80, 16 x 16 with 8 of 160. Timed per level:

- FreeLong: attnpack's one-pass global + local kernel (with AnimateDiff's position offsets, and without)
  against two SDPA calls (global, and local with a boolean band mask), the target being >= 1.6x;
- FreeNoise (16-frame windows every 4): attnpack's fused-window kernel against SDPA window by window plus the
  weighted accumulation (attnpack's own reference path);
- dense SDPA over all 64 frames, for scale.
"""

from __future__ import annotations

import gc
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ..kernels import global_local_attention, windowed_attention
from ..kernels.temporal_windows.reference import centered_windows
from ..methods.freenoise import window_weights
from ..methods.temporal import frame_windows
from .report import median_ms, plot_speedups, prepare_run, result_header, write_json


@dataclass(frozen=True)
class Geometry:
    name: str
    sequences: int  # B * H * W
    frames: int
    heads: int
    head_dim: int
    window: int = 16
    stride: int = 4


GEOMETRIES = {
    g.name: g
    for g in (
        Geometry("animatediff-512-64f-level0", 2 * 64 * 64, 64, 8, 40),
        Geometry("animatediff-512-64f-level1", 2 * 32 * 32, 64, 8, 80),
        Geometry("animatediff-512-64f-level2", 2 * 16 * 16, 64, 8, 160),
        Geometry("tiny", 64, 24, 2, 16, window=8, stride=4),
    )
}
SMOKE = ("tiny",)
DEFAULT = [name for name in GEOMETRIES if name not in SMOKE]
OPTIONS = ("warmup_ms", "rep_ms")


def two_sdpa_calls(q, k, v, band):
    """FreeLong the plain way: global SDPA, then SDPA again with the local band as a boolean mask."""
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    return sdpa(qt, kt, vt), sdpa(qt, kt, vt, attn_mask=band)


def run_geometry(
    geometry: Geometry, device: torch.device, dtype: torch.dtype, warmup_ms: float, rep_ms: float
):
    g = torch.Generator(device=device).manual_seed(0)
    shape = (geometry.sequences, geometry.frames, geometry.heads, geometry.head_dim)
    q, k, v = (torch.randn(shape, generator=g, device=device, dtype=dtype) for _ in range(3))
    positions = lambda n: tuple(  # noqa: E731
        torch.randn(n, geometry.heads, geometry.head_dim, generator=g, device=device) for _ in range(3)
    )
    offsets = {"global_offsets": positions(geometry.frames), "local_offsets": positions(geometry.window)}
    starts = centered_windows(geometry.frames, geometry.window).to(device)
    columns = torch.arange(geometry.frames, device=device)
    band = (columns[None, :] >= starts[:, None]) & (columns[None, :] < starts[:, None] + geometry.window)
    windows = frame_windows(geometry.frames, geometry.window, geometry.stride)
    weights = window_weights(geometry.window, "pyramid")
    backend = "triton" if device.type == "cuda" else "reference"
    runs = {
        "sdpa-dense (global only)": partial(torch.nn.functional.scaled_dot_product_attention, *(x.transpose(1, 2) for x in (q, k, v))),
        "freelong: two sdpa calls": partial(two_sdpa_calls, q, k, v, band),
        "freelong: attnpack one pass": partial(global_local_attention, q, k, v, geometry.window, backend=backend),
        "freelong: attnpack one pass + positions": partial(global_local_attention, q, k, v, geometry.window, backend=backend, **offsets),
        "freenoise: window by window (reference)": partial(windowed_attention, q, k, v, windows, weights, backend="reference"),
        "freenoise: attnpack fused windows": partial(windowed_attention, q, k, v, windows, weights, backend=backend),
    }  # fmt: skip
    rows = []
    for name, fn in runs.items():
        row: dict[str, Any] = {"implementation": name}
        try:
            row["ms"] = round(median_ms(fn, device, warmup_ms, rep_ms), 4)
        except (RuntimeError, ValueError) as error:
            row["skipped"] = str(error).splitlines()[0][:200]
        rows.append(row)
    ms = {row["implementation"]: row["ms"] for row in rows if "ms" in row}
    summary = {}
    if "freelong: two sdpa calls" in ms:
        for name in ("freelong: attnpack one pass", "freelong: attnpack one pass + positions"):
            if name in ms:
                summary[f"{name} vs two sdpa calls"] = round(ms["freelong: two sdpa calls"] / ms[name], 3)
    if "freenoise: window by window (reference)" in ms and "freenoise: attnpack fused windows" in ms:
        summary["freenoise fused vs reference"] = round(
            ms["freenoise: window by window (reference)"] / ms["freenoise: attnpack fused windows"], 3
        )
    del q, k, v
    gc.collect()
    return {**asdict(geometry), "rows": rows, "summary": summary}


def run(
    geometries: list[str],
    *,
    device: str | None = None,
    out: Path | None = None,
    overwrite: bool = False,
    warmup_ms: float = 25,
    rep_ms: float = 100,
) -> Path:
    """Run the temporal benchmark and write JSON + PNG; returns the JSON's path."""
    device, info, out = prepare_run(
        "temporal", geometries, GEOMETRIES, SMOKE, "geometry", device, out, overwrite
    )

    from tqdm.auto import tqdm

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    records = [
        run_geometry(GEOMETRIES[name], device, dtype, warmup_ms, rep_ms)
        for name in tqdm(geometries, desc="bench temporal")
    ]
    result = result_header(
        "temporal",
        info,
        dtype,
        {"method": "triton.testing.do_bench median" if device.type == "cuda" else "wall-clock median"},
        [
            "sequences = B * H * W pixels of one motion-module level; random inputs and position offsets",
            "two sdpa calls: global, then local with a boolean band mask (each frame's 16-frame window)",
        ],
    ) | {"geometries": records}
    write_json(out, result, overwrite)
    plot_speedups(
        out.with_suffix(".png"),
        f"temporal attention, AnimateDiff 512², 64 frames, {info['name']}",
        [r["name"] for r in records],
        {
            "FreeLong one pass vs two SDPA": [
                r["summary"].get("freelong: attnpack one pass vs two sdpa calls") for r in records
            ],
            "FreeLong one pass + positions vs two SDPA": [
                r["summary"].get("freelong: attnpack one pass + positions vs two sdpa calls") for r in records
            ],
            "FreeNoise fused vs window by window": [
                r["summary"].get("freenoise fused vs reference") for r in records
            ],
        },
        overwrite,
        xlabel="speedup (higher is better)",
    )
    return out


def table(result: dict) -> list[str]:
    """The command line's summary of a result file."""
    lines = [f"{'geometry':<28} {'implementation':<42} {'ms':>10}"]
    for record in result["geometries"]:
        for row in record["rows"]:
            ms = f"{row['ms']:.3f}" if "ms" in row else row.get("skipped", "-")
            lines.append(f"{record['name']:<28} {row['implementation']:<42} {ms:>10}")
    return lines
