"""`attnpack bench kernels`: the block-sparse kernel at real-model attention geometries.

For each geometry, in one process: every dense SDPA backend (flash, cuDNN, memory-efficient), xformers when
installed, attnpack's kernel with all blocks on, attnpack's kernel on a sparse pattern, and FlexAttention on
the same block mask. Until the method builders land, the sparse patterns are generic ones of the kind the
methods use: a disc of radius 16 on the image grid behind the text (FLUX), and a box window on the video
grid that halves with every doubling of the frame distance (video DiTs).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ..kernels import block_sparse_attention
from ..patterns import (
    BlockSparsePattern,
    ElementRule,
    Metric,
    TokenTable,
    concat_orders,
    default_blocks,
    grid_coordinates,
    identity_order,
    tile_order,
)
from .report import median_ms, plot_speedups, prepare_run, result_header, write_json
from .runners import flex_runner, sdpa_runner

logger = logging.getLogger("attnpack")


@dataclass(frozen=True)
class Geometry:
    name: str
    description: str
    heads: int
    head_dim: int
    grid: tuple[int, ...]  # (H, W) image tokens or (F, H, W) video tokens
    text: int = 0
    text_first: bool = True
    radius: int = 16  # of the sparse pattern's window, in tokens
    tile: tuple[int, ...] = (8, 16)
    blocks: tuple[int, int] | None = None  # default: the device's (patterns.default_blocks)

    @property
    def tokens(self) -> int:
        return self.text + math.prod(self.grid)


GEOMETRIES = {
    g.name: g
    for g in (
        Geometry(
            "wan2.1-1.3b-480p-81f", "Wan 2.1 1.3B, 480x832, 81 frames", 12, 128, (21, 30, 52), tile=(1, 8, 16)
        ),
        Geometry(
            "wan2.1-14b-720p-81f", "Wan 2.1 14B, 720x1280, 81 frames", 40, 128, (21, 45, 80), tile=(1, 8, 16)
        ),
        Geometry(
            "hunyuan-720p-117f",
            "HunyuanVideo, 720x1280, 117 frames, 256 text tokens last",
            24,
            128,
            (30, 48, 80),
            text=256,
            text_first=False,
            tile=(1, 8, 16),
        ),
        Geometry("flux-1024", "FLUX.1 at 1024x1024, 512 text tokens first", 24, 128, (64, 64), text=512),
        Geometry("flux-2048", "FLUX.1 at 2048x2048, 512 text tokens first", 24, 128, (128, 128), text=512),
        Geometry("flux-4096", "FLUX.1 at 4096x4096, 512 text tokens first", 24, 128, (256, 256), text=512),
        Geometry(
            "tiny",
            "a smoke-test geometry that runs on a CPU",
            2,
            64,
            (2, 8, 8),
            text=16,
            radius=3,
            tile=(1, 4, 4),
            blocks=(16, 16),
        ),
    )
}
DEFAULT = [name for name in GEOMETRIES if name != "tiny"]
OPTIONS = ("dtype", "warmup_ms", "rep_ms")  # what the command line passes to run() besides the common ones


def sparse_pattern(geometry: Geometry, device: torch.device) -> BlockSparsePattern:
    """Text attends and is attended everywhere; grid tokens see a disc (2D) or a box that halves with every
    doubling of the frame distance (3D), in tiled order."""
    grid_len, text = math.prod(geometry.grid), geometry.text
    grid_offset, text_offset = (text, 0) if geometry.text_first else (0, grid_len)
    grid_order = tile_order(geometry.grid, geometry.tile, offset=grid_offset)
    text_order = identity_order(text, offset=text_offset)
    order = (
        concat_orders(text_order, grid_order)
        if geometry.text_first
        else concat_orders(grid_order, text_order)
    )
    coords = torch.zeros(geometry.tokens, 3, dtype=torch.int32)
    coords[grid_offset : grid_offset + grid_len] = grid_coordinates(geometry.grid)
    segments = torch.zeros(geometry.tokens, dtype=torch.int32)  # 0: text
    segments[grid_offset : grid_offset + grid_len] = 1
    tokens = TokenTable(coords[order], segments[order]).to(device)
    allow = torch.tensor([[True, True], [True, False]])
    spatial = torch.tensor([[False, False], [False, True]])
    if len(geometry.grid) == 2:
        rule = ElementRule(allow, spatial, Metric.EUCLIDEAN, torch.tensor([float(geometry.radius) ** 2]))
    else:
        frames = torch.arange(geometry.grid[0])
        halvings = torch.floor(torch.log2(frames + 1.0))
        limits = geometry.radius / 2**halvings + 0.5  # box half-width r: max(|dy|, |dx|) <= r
        rule = ElementRule(allow, spatial, Metric.BOX, torch.where(limits >= 1.0, limits, -1.0))
    block_q, block_kv = geometry.blocks or default_blocks(geometry.head_dim, device)
    return BlockSparsePattern.from_rule(
        rule,
        tokens,
        tokens,
        block_q=block_q,
        block_kv=block_kv,
        q_order=order.to(device),
        kv_order=order.to(device),
    )


def run_geometry(
    geometry: Geometry, device: torch.device, dtype: torch.dtype, warmup_ms: float, rep_ms: float
):
    """Time every implementation at one geometry; returns the result record."""
    g = torch.Generator(device=device).manual_seed(0)
    shape = (1, geometry.tokens, geometry.heads, geometry.head_dim)
    q, k, v = (torch.randn(shape, generator=g, device=device, dtype=dtype) for _ in range(3))
    pattern = sparse_pattern(geometry, device)
    dense_pattern = BlockSparsePattern.dense(geometry.tokens, geometry.tokens, block_q=128, block_kv=64).to(
        device
    )
    dense_flops = 4.0 * geometry.heads * geometry.head_dim * geometry.tokens**2
    sparse_flops = 4.0 * geometry.heads * geometry.head_dim * pattern.computed_elements
    cuda = device.type == "cuda"

    backend = "triton" if cuda else "reference"
    candidates: list[tuple[str, str, Any, float]] = [  # (implementation, kind, callable, flops)
        (f"sdpa-{name}", "sdpa", partial(sdpa_runner(name), q, k, v), dense_flops)
        for name in (("flash", "cudnn", "efficient") if cuda else ("math",))
    ]
    with contextlib.suppress(ImportError):
        import xformers.ops

        if cuda:
            attend = partial(xformers.ops.memory_efficient_attention, q, k, v)
            candidates.append(("xformers", "dense", attend, dense_flops))
    attend = partial(block_sparse_attention, q, k, v, backend=backend)
    candidates += [
        ("attnpack-dense", "dense", partial(attend, dense_pattern), dense_flops),
        ("attnpack-sparse", "sparse", partial(attend, pattern), sparse_flops),
        ("flex-sparse", "sparse", flex_runner(q, k, v, pattern), sparse_flops),
    ]

    rows = []
    for implementation, kind, fn, flops in candidates:
        row: dict[str, Any] = {"implementation": implementation, "kind": kind}
        if implementation.startswith("attnpack"):
            row["backend"] = backend
        try:
            if fn is None:
                raise RuntimeError("FlexAttention is unavailable here")
            ms = median_ms(fn, device, warmup_ms, rep_ms)
            row.update(ms=round(ms, 4), tflops=round(flops / ms / 1e9, 2))
        except (RuntimeError, ValueError, NotImplementedError) as error:
            row["skipped"] = str(error).splitlines()[0][:200]
            logger.info("bench %s: %s skipped: %s", geometry.name, implementation, row["skipped"])
        rows.append(row)
    candidates.clear()
    del q, k, v, attend
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return {
        "geometry": geometry.name,
        "description": geometry.description,
        "shape": {
            "batch": 1,
            "tokens": geometry.tokens,
            "heads": geometry.heads,
            "head_dim": geometry.head_dim,
        },
        "grid": list(geometry.grid),
        "pattern": {
            "kind": "disc" if len(geometry.grid) == 2 else "box window halving with frame distance",
            "radius": geometry.radius,
            "tile": list(geometry.tile),
            "block_q": pattern.block_q,
            "block_kv": pattern.block_kv,
            "block_density": round(pattern.block_density, 5),
            "element_density": round(pattern.element_density, 5),
        },
        "rows": rows,
        "summary": summarize(rows, pattern.block_density),
    }


def summarize(rows: list[dict], block_density: float) -> dict[str, Any]:
    """The numbers the targets are stated in."""
    ms = {row["implementation"]: row["ms"] for row in rows if "ms" in row}
    sdpa = {name: t for name, t in ms.items() if name.startswith("sdpa-")}
    summary: dict[str, Any] = {"ideal_sparse_speedup": round(1.0 / block_density, 3)}
    if sdpa:
        best = min(sdpa, key=sdpa.get)
        summary["best_sdpa"] = best
        for name, t in ms.items():
            summary[f"{name}_speedup_vs_best_sdpa"] = round(sdpa[best] / t, 3)
    if "attnpack-dense" in ms and "attnpack-sparse" in ms:
        speedup = ms["attnpack-dense"] / ms["attnpack-sparse"]
        summary["sparse_speedup_vs_dense"] = round(speedup, 3)
        summary["sparse_efficiency"] = round(speedup * block_density, 3)  # target >= 0.85
    if "flex-sparse" in ms and "attnpack-sparse" in ms:
        summary["attnpack_vs_flex_sparse"] = round(ms["flex-sparse"] / ms["attnpack-sparse"], 3)
    return summary


def run(
    geometries: list[str],
    *,
    device: str | None = None,
    dtype: str = "bfloat16",
    out: Path | None = None,
    overwrite: bool = False,
    warmup_ms: float = 25,
    rep_ms: float = 100,
) -> Path:
    """Run the kernel benchmark and write JSON + PNG; returns the JSON's path."""
    device, info, out = prepare_run(
        "kernels", geometries, GEOMETRIES, ("tiny",), "geometry", device, out, overwrite
    )
    dtypes = {"bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        raise ValueError(f"dtype={dtype!r} is not accepted; choose one of {', '.join(dtypes)}")

    from tqdm.auto import tqdm

    records = [
        run_geometry(GEOMETRIES[name], device, dtypes[dtype], warmup_ms, rep_ms)
        for name in tqdm(geometries, desc="bench kernels", unit="geometry")
    ]
    result = result_header(
        "kernels",
        info,
        dtype,
        {
            "method": "triton.testing.do_bench median (CUDA events)"
            if device.type == "cuda"
            else "wall-clock median",
            "warmup_ms": warmup_ms,
            "rep_ms": rep_ms,
        },
        [
            "tflops counts the FLOPs of computed blocks (4 * heads * head_dim * computed query-key pairs)",
            "flex-sparse runs on inputs already in the pattern's token order (its kernel alone)",
        ],
    ) | {
        "geometries": [
            asdict(GEOMETRIES[name]) | record for name, record in zip(geometries, records, strict=True)
        ],
    }
    write_json(out, result, overwrite)
    names = ["attnpack-dense", "attnpack-sparse", "flex-sparse"]
    series = {name: [r["summary"].get(f"{name}_speedup_vs_best_sdpa") for r in records] for name in names}
    series["ideal sparse: attnpack-dense / block density"] = [
        None if dense is None else dense * r["summary"]["ideal_sparse_speedup"]
        for dense, r in zip(series["attnpack-dense"], records, strict=True)
    ]
    plot_speedups(
        out.with_suffix(".png"),
        f"block-sparse attention, {dtype}, {info['name']}",
        [f"{r['geometry']} ({r['shape']['tokens']:,} tokens)" for r in records],
        series,
        overwrite,
    )
    return out


def table(result: dict) -> list[str]:
    """The command line's summary of a result file."""
    lines = [f"{'geometry':<24} {'implementation':<16} {'ms':>10} {'TFLOP/s':>9}  note"]
    for record in result["geometries"]:
        for row in record["rows"]:
            ms = f"{row['ms']:.3f}" if "ms" in row else "-"
            tflops = f"{row['tflops']:.1f}" if "tflops" in row else "-"
            lines.append(
                f"{record['geometry']:<24} {row['implementation']:<16} {ms:>10} {tflops:>9}  {row.get('skipped', '')}"
            )
        lines.append(f"{'':<24} " + ", ".join(f"{k}={v}" for k, v in record["summary"].items()))
    return lines
