"""`attnpack bench clear`: CLEAR's local attention at FLUX resolutions.

Two measurements per resolution (1024², 2048², 4096²; 512 text tokens, 24 heads of 128):

- the attention op: dense SDPA (each backend), FlexAttention with CLEAR's own raster block mask (what
  the public code runs), and attnpack's kernel on the tiled pattern (FlexAttention on the tiled pattern
  too, for reference);
- one transformer step: the full-size FLUX.1 config with random weights, built in bf16 on the device,
  dense against ClearAttention (no distilled weights: speed does not depend on them).
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ..api import apply
from ..kernels import block_sparse_attention
from ..patterns import clear_window
from .report import (
    median_ms,
    plot_speedups,
    prepare_run,
    random_model,
    result_header,
    time_forward,
    write_json,
)
from .runners import flex_runner, sdpa_runner

logger = logging.getLogger("attnpack")

FLUX_CONFIG = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
TINY_CONFIG = FLUX_CONFIG | dict(
    num_layers=1,
    num_single_layers=1,
    num_attention_heads=2,
    attention_head_dim=16,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    axes_dims_rope=(4, 4, 8),
    in_channels=4,
)


@dataclass(frozen=True)
class Resolution:
    name: str
    pixels: int  # square images
    heads: int = 24
    head_dim: int = 128
    text: int = 512
    radius: float = 16
    blocks: tuple[int, int] | None = None

    @property
    def grid(self) -> tuple[int, int]:
        return (self.pixels // 16, self.pixels // 16)  # VAE 8, 2 x 2 packing


RESOLUTIONS = {
    r.name: r
    for r in (
        Resolution("flux-1024", 1024),
        Resolution("flux-2048", 2048),
        Resolution("flux-4096", 4096),
        Resolution("tiny", 256, heads=2, head_dim=16, text=16, radius=3, blocks=(16, 16)),
    )
}
SMOKE = ("tiny",)
DEFAULT = [name for name in RESOLUTIONS if name not in SMOKE]
OPTIONS = ("repeats", "steps")  # what the command line passes to run() besides the common ones


def time_op(
    resolution: Resolution, device: torch.device, dtype: torch.dtype, warmup_ms: float, rep_ms: float
):
    """The attention op alone: rows of (implementation, ms, computed fraction)."""
    grid, text = resolution.grid, resolution.text
    tokens = text + grid[0] * grid[1]
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (
        torch.randn(1, tokens, resolution.heads, resolution.head_dim, generator=g, device=device, dtype=dtype)
        for _ in range(3)
    )
    tiled = clear_window(grid, resolution.radius, text_tokens=text, blocks=resolution.blocks, device=device)
    raster_blocks = resolution.blocks or (128, 128)  # the public code's FlexAttention blocks
    raster = clear_window(
        grid, resolution.radius, text_tokens=text, tile=(1, grid[1]), blocks=raster_blocks, device=device
    )
    cuda = device.type == "cuda"
    backend = "triton" if cuda else "reference"
    backends = ("flash", "cudnn", "efficient") if cuda else ("math",)
    runs = [(f"sdpa-{name}", partial(sdpa_runner(name), q, k, v), 1.0) for name in backends]
    runs += [
        ("flex-raster (CLEAR's mask)", flex_runner(q, k, v, raster), raster.block_density),
        ("flex-tiled", flex_runner(q, k, v, tiled), tiled.block_density),
        (
            "attnpack-clear",
            partial(block_sparse_attention, q, k, v, tiled, backend=backend),
            tiled.block_density,
        ),
    ]
    rows = []
    flops = 4.0 * resolution.heads * resolution.head_dim * tokens * tokens
    for name, fn, density in runs:
        row: dict[str, Any] = {"implementation": name, "block_density": round(density, 5)}
        try:
            ms = median_ms(fn, device, warmup_ms, rep_ms)
            row.update(ms=round(ms, 4), tflops=round(flops * density / ms / 1e9, 2))
        except (RuntimeError, ValueError, NotImplementedError) as error:
            row["skipped"] = str(error).splitlines()[0][:200]
        rows.append(row)
    return rows, {"element_density": round(tiled.element_density, 5)}


def time_step(
    resolution: Resolution, device: torch.device, dtype: torch.dtype, repeats: int
) -> dict[str, float]:
    """One FLUX transformer forward with random weights: dense and with ClearAttention."""
    from diffusers import FluxTransformer2DModel

    config = TINY_CONFIG if resolution.name in SMOKE else FLUX_CONFIG
    transformer = random_model(FluxTransformer2DModel, config, device, dtype)
    grid, text = resolution.grid, resolution.text
    g = torch.Generator(device=device).manual_seed(0)
    rows = torch.arange(grid[0], device=device).repeat_interleave(grid[1])
    cols = torch.arange(grid[1], device=device).repeat(grid[0])
    inputs = dict(
        hidden_states=torch.randn(
            1, grid[0] * grid[1], config["in_channels"], generator=g, device=device, dtype=dtype
        ),
        encoder_hidden_states=torch.randn(
            1, text, config["joint_attention_dim"], generator=g, device=device, dtype=dtype
        ),
        pooled_projections=torch.randn(
            1, config["pooled_projection_dim"], generator=g, device=device, dtype=dtype
        ),
        timestep=torch.tensor([0.5], device=device, dtype=dtype),
        img_ids=torch.stack([torch.zeros_like(rows), rows, cols], dim=1).to(dtype),
        txt_ids=torch.zeros(text, 3, device=device, dtype=dtype),
        guidance=torch.tensor([3.5], device=device, dtype=dtype),
        return_dict=False,
    )
    dense = time_forward(transformer, inputs, device, repeats)
    settings = dict(radius=resolution.radius)
    with apply(transformer, "clear", **settings):
        clear = time_forward(transformer, inputs, device, repeats)
    del transformer, inputs
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"dense_s": round(dense, 4), "clear_s": round(clear, 4), "speedup": round(dense / clear, 3)}


def summarize(rows: list[dict]) -> dict[str, Any]:
    ms = {row["implementation"]: row["ms"] for row in rows if "ms" in row}
    sdpa = {name: t for name, t in ms.items() if name.startswith("sdpa-")}
    summary: dict[str, Any] = {}
    if sdpa:
        best = min(sdpa, key=sdpa.get)
        summary["best_sdpa"] = best
        for name, t in ms.items():
            summary[f"{name}_speedup_vs_best_sdpa"] = round(sdpa[best] / t, 3)
    if "attnpack-clear" in ms and "flex-raster (CLEAR's mask)" in ms:
        summary["attnpack_vs_flex_raster"] = round(ms["flex-raster (CLEAR's mask)"] / ms["attnpack-clear"], 3)
    return summary


def run(
    resolutions: list[str],
    *,
    device: str | None = None,
    out: Path | None = None,
    overwrite: bool = False,
    warmup_ms: float = 25,
    rep_ms: float = 100,
    repeats: int = 3,
    steps: bool = True,
) -> Path:
    """Run the CLEAR benchmark and write JSON + PNG; returns the JSON's path."""
    device, info, out = prepare_run(
        "clear", resolutions, RESOLUTIONS, SMOKE, "resolution", device, out, overwrite
    )

    from tqdm.auto import tqdm

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    records = []
    for name in tqdm(resolutions, desc="bench clear", unit="resolution"):
        resolution = RESOLUTIONS[name]
        rows, densities = time_op(resolution, device, dtype, warmup_ms, rep_ms)
        record = {
            "resolution": name,
            "pixels": resolution.pixels,
            "tokens": resolution.text + resolution.grid[0] * resolution.grid[1],
            "radius": resolution.radius,
            "op": {"rows": rows, "summary": summarize(rows)} | densities,
        }
        if steps:
            record["step"] = time_step(resolution, device, dtype, repeats)
        records.append(record)
    result = result_header(
        "clear",
        info,
        dtype,
        {
            "op": "triton.testing.do_bench median" if device.type == "cuda" else "wall-clock median",
            "step": f"median of {repeats} transformer forwards",
        },
        [
            "flex-raster: FlexAttention with CLEAR's block mask, raster token order and 128 x 128 blocks",
            "flex-* run on inputs already in their pattern's order (their kernel alone)",
            "the transformer step uses random weights: speed does not depend on them",
        ],
    ) | {
        "resolutions": records,
    }
    write_json(out, result, overwrite)
    series = {
        name: [r["op"]["summary"].get(f"{name}_speedup_vs_best_sdpa") for r in records]
        for name in ("attnpack-clear", "flex-raster (CLEAR's mask)", "flex-tiled")
    }
    if steps:
        series["transformer step (attnpack-clear)"] = [r["step"]["speedup"] for r in records]
    plot_speedups(
        out.with_suffix(".png"),
        f"CLEAR local attention (r = 16), {info['name']}",
        [f"{r['resolution']} ({r['tokens']:,} tokens)" for r in records],
        series,
        overwrite,
        xlabel="speedup over dense attention (best SDPA backend; higher is better)",
    )
    return out


def table(result: dict) -> list[str]:
    """The command line's summary of a result file."""
    lines = [f"{'resolution':<12} {'implementation':<28} {'ms':>10} {'TFLOP/s':>9}"]
    for record in result["resolutions"]:
        for row in record["op"]["rows"]:
            ms = f"{row['ms']:.3f}" if "ms" in row else "-"
            tflops = f"{row['tflops']:.1f}" if "tflops" in row else row.get("skipped", "")
            lines.append(f"{record['resolution']:<12} {row['implementation']:<28} {ms:>10} {tflops:>9}")
        if "step" in record:
            step = record["step"]
            lines.append(
                f"{record['resolution']:<12} {'transformer step':<28} dense {step['dense_s']:.3f} s, "
                f"clear {step['clear_s']:.3f} s: {step['speedup']:.2f}x"
            )
    return lines
