"""`attnpack bench kernels`: the block-sparse kernel at real-model attention geometries.

For each geometry, in one process: every dense implementation (each SDPA backend: flash, cuDNN,
memory-efficient; FlashAttention-3 and xformers when installed; attnpack's kernel with all blocks on), then,
for each pattern the methods run there, attnpack's kernel and FlexAttention on the same block mask. The
patterns are the methods' own, built the way the methods build them:

- video DiTs (Wan 2.1, HunyuanVideo): radial attention, official and spatial, with the model's preset
  (`RadialAttention.PRESETS`: Wan 2.1 decay 0.2 with the sink frame, HunyuanVideo decay 0.95 without);
- FLUX: CLEAR at radius 16, without pooled tokens (attnpack's default, the released clear_local_16) and
  with `down_factor=4` (the released clear_local_16_down_4: every image query also sees the pooled keys).

JSON, per geometry: `rows` (implementation, kind "sdpa" / "dense" / "sparse", `pattern` on sparse rows,
ms, TFLOP/s of the computed blocks, or `skipped` with the reason); `patterns` (name, method, settings,
blocks, kv_tokens, block and element density, and its `summary`: ideal speedup 1 / block density, speedup
over the best dense implementation and over attnpack dense, `sparse_efficiency` = speedup over the best
dense x block density, `sparse_efficiency_vs` naming that implementation, attnpack against FlexAttention);
`summary` (best_sdpa, best_dense, best_dense_ms, every row's speedup over the best dense).
"""

from __future__ import annotations

import gc
import logging
import math
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ..kernels import block_sparse_attention
from ..methods.radial import PRESETS
from ..patterns import BlockSparsePattern, clear_window, radial
from .report import median_ms, plot_speedups, prepare_run, result_header, write_json
from .runners import dense_op_runs, flex_runner

logger = logging.getLogger("attnpack")

CLEAR_DOWN_FACTORS = (None, 4)  # the released settings at radius 16: no pooled tokens, pooled / 4


@dataclass(frozen=True)
class Geometry:
    name: str
    description: str
    heads: int
    head_dim: int
    grid: tuple[int, ...]  # (H, W) image tokens or (F, H, W) video tokens
    text: int = 0
    text_first: bool = True
    preset: str | None = None  # RadialAttention.PRESETS entry of a video model
    clear_radius: float = 16  # CLEAR's radius on an image grid, in tokens
    clear_down_factors: tuple[int | None, ...] = CLEAR_DOWN_FACTORS
    radial_block_size: int = 128  # RadialAttention's block_size
    blocks: tuple[int, int] | None = None  # default: the device's (patterns.default_blocks)

    def __post_init__(self):
        if len(self.grid) == 3 and self.preset not in PRESETS:  # radial needs the model's settings
            raise ValueError(
                f"bench kernels: geometry {self.name!r} has preset={self.preset!r}; a video grid needs one of "
                f"{', '.join(PRESETS)}"
            )

    @property
    def tokens(self) -> int:
        return self.text + math.prod(self.grid)


@dataclass(frozen=True)
class MethodPattern:
    """One method's pattern at a geometry: `name` labels its rows (attnpack-<name>, flex-<name>)."""

    name: str
    method: str  # "radial" or "clear"
    settings: dict[str, Any] = field(default_factory=dict)


GEOMETRIES = {
    g.name: g
    for g in (
        Geometry(
            "wan2.1-1.3b-480p-81f",
            "Wan 2.1 1.3B, 480x832, 81 frames",
            12,
            128,
            (21, 30, 52),
            preset="wan2.1",
        ),
        Geometry(
            "wan2.1-14b-720p-81f",
            "Wan 2.1 14B, 720x1280, 81 frames",
            40,
            128,
            (21, 45, 80),
            preset="wan2.1",
        ),
        Geometry(
            "hunyuan-720p-117f",
            "HunyuanVideo, 720x1280, 117 frames, 256 text tokens last",
            24,
            128,
            (30, 48, 80),
            text=256,
            text_first=False,
            preset="hunyuanvideo",
        ),
        Geometry("flux-1024", "FLUX.1 at 1024x1024, 512 text tokens first", 24, 128, (64, 64), text=512),
        Geometry("flux-2048", "FLUX.1 at 2048x2048, 512 text tokens first", 24, 128, (128, 128), text=512),
        Geometry("flux-4096", "FLUX.1 at 4096x4096, 512 text tokens first", 24, 128, (256, 256), text=512),
        Geometry(
            "tiny",
            "a smoke-test video geometry that runs on a CPU: 5 x 8 x 16 + 16 text last, radial",
            2,
            64,
            (5, 8, 16),
            text=16,
            text_first=False,
            preset="wan2.1",
            radial_block_size=16,
            blocks=(16, 16),
        ),
        Geometry(
            "tiny-flux",
            "a smoke-test image geometry that runs on a CPU: 16 x 16 + 16 text first, CLEAR",
            2,
            64,
            (16, 16),
            text=16,
            clear_radius=4,
            blocks=(16, 16),
        ),
    )
}
SMOKE = ("tiny", "tiny-flux")
DEFAULT = [name for name in GEOMETRIES if name not in SMOKE]
OPTIONS = ("dtype", "warmup_ms", "rep_ms")  # what the command line passes to run() besides the common ones


def method_patterns(geometry: Geometry) -> list[MethodPattern]:
    """The patterns the methods run at `geometry`: radial on a video grid, CLEAR on an image grid."""
    if len(geometry.grid) == 3:
        preset = PRESETS[geometry.preset]
        settings = dict(
            preset=geometry.preset,
            decay_factor=preset["decay_factor"],
            sink=preset["sink"],
            block_size=geometry.radial_block_size,
        )
        return [
            MethodPattern(f"radial-{variant}", "radial", settings | {"variant": variant})
            for variant in ("official", "spatial")
        ]
    radius = geometry.clear_radius
    return [
        MethodPattern(
            f"clear-r{radius:g}" + ("" if down is None else f"-down{down}"),
            "clear",
            dict(radius=radius, down_factor=down),
        )
        for down in geometry.clear_down_factors
    ]


def build_pattern(spec: MethodPattern, geometry: Geometry, device: torch.device) -> BlockSparsePattern:
    """`spec`'s pattern at `geometry`, with the arguments the method passes (RadialAttention /
    ClearAttention.sparse_attention)."""
    if spec.method == "radial":
        num_frames, height, width = geometry.grid
        settings = spec.settings
        return radial(
            num_frames,
            (height, width),
            decay_factor=settings["decay_factor"],
            sink=settings["sink"],
            text_tokens=geometry.text,
            text_first=geometry.text_first,
            variant=settings["variant"],
            block_size=settings["block_size"],
            blocks=geometry.blocks,
            device=device,
        )
    if spec.method == "clear":
        return clear_window(
            geometry.grid,
            spec.settings["radius"],
            text_tokens=geometry.text,
            text_first=geometry.text_first,
            down_factor=spec.settings["down_factor"],
            blocks=geometry.blocks,
            device=device,
        )
    raise ValueError(f"bench kernels: method={spec.method!r} is not accepted; choose 'radial' or 'clear'")


def _time(row: dict[str, Any], fn, flops: float, device, warmup_ms, rep_ms, geometry_name: str) -> None:
    try:
        ms = median_ms(fn, device, warmup_ms, rep_ms)
        row.update(ms=round(ms, 4), tflops=round(flops / ms / 1e9, 2))
    except (RuntimeError, ValueError, NotImplementedError) as error:
        row["skipped"] = str(error).splitlines()[0][:200]
        logger.info("bench %s: %s skipped: %s", geometry_name, row["implementation"], row["skipped"])


def run_geometry(
    geometry: Geometry, device: torch.device, dtype: torch.dtype, warmup_ms: float, rep_ms: float
):
    """Time every implementation at one geometry; returns the result record."""
    g = torch.Generator(device=device).manual_seed(0)
    shape = (1, geometry.tokens, geometry.heads, geometry.head_dim)
    q, k, v = (torch.randn(shape, generator=g, device=device, dtype=dtype) for _ in range(3))
    dense_pattern = BlockSparsePattern.dense(geometry.tokens, geometry.tokens, block_q=128, block_kv=64).to(
        device
    )
    dense_flops = 4.0 * geometry.heads * geometry.head_dim * geometry.tokens**2
    backend = "triton" if device.type == "cuda" else "reference"
    attend = partial(block_sparse_attention, backend=backend)

    rows: list[dict[str, Any]] = []
    for name, fn, missing in dense_op_runs(q, k, v):
        row: dict[str, Any] = {
            "implementation": name,
            "kind": "sdpa" if name.startswith("sdpa-") else "dense",
        }
        if fn is None:
            row["skipped"] = missing
        else:
            _time(row, fn, dense_flops, device, warmup_ms, rep_ms, geometry.name)
        rows.append(row)
    row = {"implementation": "attnpack-dense", "kind": "dense", "backend": backend}
    _time(row, partial(attend, q, k, v, dense_pattern), dense_flops, device, warmup_ms, rep_ms, geometry.name)
    rows.append(row)

    patterns = []
    for spec in method_patterns(geometry):
        pattern = build_pattern(spec, geometry, device)
        extra = pattern.kv_len - geometry.tokens  # CLEAR's pooled keys follow the sequence
        pk, pv = k, v
        if extra:  # random like the rest: the kernel's speed does not depend on the values
            pk, pv = (
                torch.cat(
                    [x, torch.randn(1, extra, *x.shape[2:], generator=g, device=device, dtype=dtype)], 1
                )
                for x in (k, v)
            )
        sparse_flops = 4.0 * geometry.heads * geometry.head_dim * pattern.computed_elements
        row = {
            "implementation": f"attnpack-{spec.name}",
            "kind": "sparse",
            "pattern": spec.name,
            "backend": backend,
        }
        _time(
            row, partial(attend, q, pk, pv, pattern), sparse_flops, device, warmup_ms, rep_ms, geometry.name
        )
        rows.append(row)
        row = {"implementation": f"flex-{spec.name}", "kind": "sparse", "pattern": spec.name}
        try:
            flex = flex_runner(q, pk, pv, pattern)
        except (RuntimeError, ValueError, NotImplementedError) as error:
            row["skipped"] = str(error).splitlines()[0][:200]
        else:
            _time(row, flex, sparse_flops, device, warmup_ms, rep_ms, geometry.name)
        rows.append(row)
        patterns.append(
            {
                "name": spec.name,
                "method": spec.method,
                "settings": spec.settings,
                "block_q": pattern.block_q,
                "block_kv": pattern.block_kv,
                "kv_tokens": pattern.kv_len,
                "block_density": round(pattern.block_density, 5),
                "element_density": round(pattern.element_density, 5),
            }
        )
    del q, k, v, attend
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    summary = summarize(rows)
    for entry in patterns:
        entry["summary"] = summarize_pattern(rows, entry, summary)
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
        "patterns": patterns,
        "rows": rows,
        "summary": summary,
    }


def summarize(rows: list[dict]) -> dict[str, Any]:
    """The best SDPA backend, the best dense implementation of all (SDPA backends, FlashAttention-3,
    xformers, attnpack dense) and every row's speedup over the latter."""
    ms = {row["implementation"]: row["ms"] for row in rows if "ms" in row}
    kind = {row["implementation"]: row["kind"] for row in rows}
    summary: dict[str, Any] = {}
    sdpa = {name: t for name, t in ms.items() if kind[name] == "sdpa"}
    if sdpa:
        summary["best_sdpa"] = min(sdpa, key=sdpa.get)
    dense = {name: t for name, t in ms.items() if kind[name] in ("sdpa", "dense")}
    if dense:
        best = min(dense, key=dense.get)
        summary |= {"best_dense": best, "best_dense_ms": dense[best]}
        for name, t in ms.items():
            summary[f"{name}_speedup_vs_best_dense"] = round(dense[best] / t, 3)
    return summary


def summarize_pattern(rows: list[dict], pattern: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    """The numbers the targets are stated in, for one pattern."""
    ms = {row["implementation"]: row["ms"] for row in rows if "ms" in row}
    ours, flex = f"attnpack-{pattern['name']}", f"flex-{pattern['name']}"
    result: dict[str, Any] = {"ideal_speedup": round(1.0 / pattern["block_density"], 3)}
    if ours not in ms:
        return result
    if "best_dense" in summary:
        speedup = summary["best_dense_ms"] / ms[ours]
        result |= {
            "speedup_vs_best_dense": round(speedup, 3),
            # the target: >= 0.85 of the ideal speedup, over the fastest dense kernel of the same run
            "sparse_efficiency": round(speedup * pattern["block_density"], 3),
            "sparse_efficiency_vs": summary["best_dense"],
        }
    if "attnpack-dense" in ms:
        result["speedup_vs_attnpack_dense"] = round(ms["attnpack-dense"] / ms[ours], 3)
    if flex in ms:
        result["attnpack_vs_flex"] = round(ms[flex] / ms[ours], 3)
    return result


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
        "kernels", geometries, GEOMETRIES, SMOKE, "geometry", device, out, overwrite
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
            "flex-* run on inputs already in the pattern's token order (their kernel alone)",
            "patterns are the methods' own (radial with the model's preset, CLEAR r16 with and without "
            "pooled / 4 keys); CLEAR's pooled keys are random, their pooling is not timed",
            "sparse_efficiency = speedup over the best dense implementation of the run (sparse_efficiency_vs) "
            "x block density",
        ],
    ) | {
        "geometries": [
            asdict(GEOMETRIES[name]) | record for name, record in zip(geometries, records, strict=True)
        ],
    }
    write_json(out, result, overwrite)
    groups, series = (
        [],
        {"attnpack": [], "FlexAttention, same block mask": [], "ideal: 1 / block density": []},
    )
    for record in records:
        for pattern in record["patterns"]:
            groups.append(f"{record['geometry']} {pattern['name']}")
            series["attnpack"].append(pattern["summary"].get("speedup_vs_best_dense"))
            speedups = record["summary"]
            series["FlexAttention, same block mask"].append(
                speedups.get(f"flex-{pattern['name']}_speedup_vs_best_dense")
            )
            series["ideal: 1 / block density"].append(pattern["summary"]["ideal_speedup"])
    plot_speedups(
        out.with_suffix(".png"),
        f"block-sparse attention, the methods' patterns, {dtype}, {info['name']}",
        groups,
        series,
        overwrite,
        xlabel="speedup over the best dense implementation of the run (higher is better)",
    )
    return out


def table(result: dict) -> list[str]:
    """The command line's summary of a result file."""
    lines = [f"{'geometry':<24} {'implementation':<28} {'ms':>10} {'TFLOP/s':>9}  note"]
    for record in result["geometries"]:
        for row in record["rows"]:
            ms = f"{row['ms']:.3f}" if "ms" in row else "-"
            tflops = f"{row['tflops']:.1f}" if "tflops" in row else "-"
            lines.append(
                f"{record['geometry']:<24} {row['implementation']:<28} {ms:>10} {tflops:>9}  {row.get('skipped', '')}"
            )
        summary = record["summary"]
        if "best_dense" in summary:
            lines.append(f"{'':<24} best dense: {summary['best_dense']} ({summary['best_dense_ms']:.3f} ms)")
        for pattern in record["patterns"]:
            numbers = ", ".join(f"{k}={v}" for k, v in pattern["summary"].items())
            lines.append(f"{'':<24} {pattern['name']} (block density {pattern['block_density']}): {numbers}")
    return lines
