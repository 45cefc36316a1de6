"""`attnpack bench clear`: CLEAR's local attention at FLUX resolutions.

CLEAR is timed as it really runs, in each of its released configurations at the benchmark's radius
(r = 16; 512 text tokens, 24 heads of 128): `r16`, no pooled tokens (attnpack's default, the released
clear_local_16), and `r16-down4`, with the (H/4)(W/4) pooled keys every image query also attends (the
released clear_local_16_down_4). Two measurements per resolution (1024², 2048², 4096²):

- the attention op: the dense implementations (each SDPA backend, FlashAttention-3 and xformers when
  installed), then per configuration FlexAttention with CLEAR's own mask (the public code's `mask_mod`:
  arithmetic on the raster token index, its BlockMask from `create_block_mask` with 128 x 128 blocks),
  attnpack's kernel on the tiled pattern, and FlexAttention on the tiled pattern for reference;
- one transformer step: the full-size FLUX.1 config with random weights, built in bf16 on the device, with
  the fastest dense backend of the machine (`runners.pick_dense_backend`, recorded as `dense_backend`)
  against ClearAttention in each configuration (no distilled weights: speed does not depend on them).

JSON, per resolution: `op.rows` (implementation, `configuration` "dense" or the label, and on CLEAR rows
radius, down_factor, kv_tokens; block_density, ms, TFLOP/s or `skipped`); `op.summary` (best_sdpa,
best_dense, best_dense_ms); `configurations` (label, radius, down_factor, kv_tokens, element_density, `op`:
each implementation's speedup over the best dense one and attnpack against FlexAttention with CLEAR's mask;
`step`: clear_s, speedup); `step` (dense_backend, dense_s).
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
from ..methods.clear import ClearLayer
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
from .runners import dense_op_runs, flex_mask_runner, flex_runner, pick_dense_backend

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
FLEX_RASTER = "flex-raster (CLEAR's mask)"
CLEAR_MASK_BLOCKS = (128, 128)  # create_block_mask's default, which the public code keeps


@dataclass(frozen=True)
class Configuration:
    """One setting ClearAttention runs with; `label` names its rows."""

    radius: float
    down_factor: int | None = None

    @property
    def label(self) -> str:
        return f"r{self.radius:g}" + ("" if self.down_factor is None else f"-down{self.down_factor}")


@dataclass(frozen=True)
class Resolution:
    name: str
    pixels: int  # square images
    heads: int = 24
    head_dim: int = 128
    text: int = 512
    radius: float = 16
    down_factors: tuple[int | None, ...] = (None, 4)  # the released settings at r = 16
    blocks: tuple[int, int] | None = None

    @property
    def grid(self) -> tuple[int, int]:
        return (self.pixels // 16, self.pixels // 16)  # VAE 8, 2 x 2 packing

    @property
    def configurations(self) -> list[Configuration]:
        return [Configuration(self.radius, down) for down in self.down_factors]


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


def clear_mask_mod(grid: tuple[int, int], radius: float, text_tokens: int, down_factor: int | None = None):
    """CLEAR's mask as its public code writes it, a FlexAttention `mask_mod` on the raster token index:
    [text, image rows one after another, pooled tokens]. Image queries see the text, the pooled tokens
    and the image keys within `radius` (squared distance < radius², strict as theirs); text queries see
    the text and the full-resolution image."""
    height, width = grid
    image_end = text_tokens + height * width
    limit = float(radius) ** 2

    def mask_mod(b, h, q_idx, kv_idx):
        q_row, q_col = (q_idx - text_tokens) // width, (q_idx - text_tokens) % width
        kv_row, kv_col = (kv_idx - text_tokens) // width, (kv_idx - text_tokens) % width
        near = (q_row - kv_row) ** 2 + (q_col - kv_col) ** 2 < limit
        text_query, text_key = q_idx < text_tokens, kv_idx < text_tokens
        if down_factor is None:
            return text_query | text_key | near
        pooled_key = kv_idx >= image_end
        return (text_query & ~pooled_key) | (~text_query & (text_key | pooled_key | near))

    return mask_mod


def clear_block_mask(
    grid: tuple[int, int],
    radius: float,
    text_tokens: int,
    down_factor: int | None,
    device: torch.device,
    blocks: tuple[int, int] = CLEAR_MASK_BLOCKS,
):
    """The BlockMask of `clear_mask_mod`, made with `create_block_mask` as the public code makes it
    (compiled on CUDA, so that the Q x KV mask is never materialised)."""
    from torch.nn.attention.flex_attention import create_block_mask

    height, width = grid
    queries = text_tokens + height * width
    pooled = (height // down_factor) * (width // down_factor) if down_factor else 0
    create = torch.compile(create_block_mask) if device.type == "cuda" else create_block_mask
    return create(
        clear_mask_mod(grid, radius, text_tokens, down_factor),
        None,
        None,
        queries,
        queries + pooled,
        device=device,
        BLOCK_SIZE=blocks,
    )


def block_mask_density(mask, q_len: int, kv_len: int) -> float:
    """The fraction of the Q x KV scores a BlockMask's computed blocks cover (its full blocks too)."""
    block_q, block_kv = mask.BLOCK_SIZE
    computed = mask.to_dense()[0, 0].bool()
    rows = (q_len - torch.arange(computed.shape[0]) * block_q).clamp(max=block_q)
    cols = (kv_len - torch.arange(computed.shape[1]) * block_kv).clamp(max=block_kv)
    area = (computed.cpu() * rows[:, None] * cols[None, :]).sum()
    return float(area) / (q_len * kv_len)


def _timed_row(row: dict[str, Any], fn, flops: float, device, warmup_ms: float, rep_ms: float) -> dict:
    try:
        ms = median_ms(fn, device, warmup_ms, rep_ms)
        row.update(ms=round(ms, 4), tflops=round(flops * row["block_density"] / ms / 1e9, 2))
    except (RuntimeError, ValueError, NotImplementedError) as error:
        row["skipped"] = str(error).splitlines()[0][:200]
    return row


def time_op(
    resolution: Resolution, device: torch.device, dtype: torch.dtype, warmup_ms: float, rep_ms: float
) -> tuple[list[dict], dict[str, dict]]:
    """The attention op alone: rows of (implementation, configuration, ms, computed fraction), and per
    configuration its key count and element density."""
    grid, text = resolution.grid, resolution.text
    tokens = text + grid[0] * grid[1]
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (
        torch.randn(1, tokens, resolution.heads, resolution.head_dim, generator=g, device=device, dtype=dtype)
        for _ in range(3)
    )
    per_key = 4.0 * resolution.heads * resolution.head_dim * tokens  # FLOPs per key column
    rows = []
    for name, fn, missing in dense_op_runs(q, k, v):
        row = {"implementation": name, "configuration": "dense", "block_density": 1.0}
        if fn is None:
            row["skipped"] = missing
        else:
            _timed_row(row, fn, per_key * tokens, device, warmup_ms, rep_ms)
        rows.append(row)
    backend = "triton" if device.type == "cuda" else "reference"
    configurations = {}
    for config in resolution.configurations:
        tiled = clear_window(
            grid,
            config.radius,
            text_tokens=text,
            down_factor=config.down_factor,
            blocks=resolution.blocks,
            device=device,
        )
        kv_len = tiled.kv_len
        extra = kv_len - tokens  # the pooled keys follow the sequence; random: speed does not depend on them
        pk, pv = (
            torch.cat([x, torch.randn(1, extra, *x.shape[2:], generator=g, device=device, dtype=dtype)], 1)
            for x in (k, v)
        )
        raster_blocks = resolution.blocks or CLEAR_MASK_BLOCKS
        raster = clear_block_mask(grid, config.radius, text, config.down_factor, device, raster_blocks)
        common = {"configuration": config.label, "radius": config.radius, "down_factor": config.down_factor}
        common["kv_tokens"] = kv_len
        # CLEAR's own mask on the raster order: the inputs as they come, (B, H, S, D) for FlexAttention
        raster_inputs = [x.transpose(1, 2) for x in (q, pk, pv)]
        for name, density, fn in (
            (
                FLEX_RASTER,
                block_mask_density(raster, tokens, kv_len),
                flex_mask_runner(*raster_inputs, raster),
            ),
            ("flex-tiled", tiled.block_density, flex_runner(q, pk, pv, tiled)),
            (
                "attnpack-clear",
                tiled.block_density,
                partial(block_sparse_attention, q, pk, pv, tiled, backend=backend),
            ),
        ):
            row = {"implementation": name, **common, "block_density": round(density, 5)}
            rows.append(_timed_row(row, fn, per_key * kv_len, device, warmup_ms, rep_ms))
        configurations[config.label] = {
            "configuration": config.label,
            "radius": config.radius,
            "down_factor": config.down_factor,
            "kv_tokens": kv_len,
            "element_density": round(tiled.element_density, 5),
        }
    return rows, configurations


def flux_inputs(config: dict, grid: tuple[int, int], text: int, device: torch.device, dtype: torch.dtype):
    """One FLUX transformer call's inputs for an image of `grid` tokens and `text` text tokens."""
    g = torch.Generator(device=device).manual_seed(0)
    rows = torch.arange(grid[0], device=device).repeat_interleave(grid[1])
    cols = torch.arange(grid[1], device=device).repeat(grid[0])
    return dict(
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


def time_step(
    resolution: Resolution, device: torch.device, dtype: torch.dtype, repeats: int
) -> tuple[dict[str, Any], dict[str, dict]]:
    """One FLUX transformer forward with random weights: dense on the fastest dense backend, and with
    ClearAttention in each configuration. Returns (dense record, per-configuration records)."""
    from diffusers import FluxTransformer2DModel

    config = TINY_CONFIG if resolution.name in SMOKE else FLUX_CONFIG
    transformer = random_model(FluxTransformer2DModel, config, device, dtype)
    inputs = flux_inputs(config, resolution.grid, resolution.text, device, dtype)
    baseline = pick_dense_backend(partial(transformer, **inputs), device)
    # Every forward on the picked backend, so that any dense attention CLEAR keeps gets it too.
    with baseline.context():
        dense = time_forward(transformer, inputs, device, repeats)
    configurations = {}
    for setting in resolution.configurations:
        with (
            baseline.context(),
            apply(transformer, "clear", radius=setting.radius, down_factor=setting.down_factor),
        ):
            for module in transformer.modules():
                if isinstance(module, ClearLayer):  # apply leaves its spatial weights on the CPU
                    module.to(device)
            seconds = time_forward(transformer, inputs, device, repeats)
        configurations[setting.label] = {"clear_s": round(seconds, 4), "speedup": round(dense / seconds, 3)}
    del transformer, inputs
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"dense_backend": baseline.record, "dense_s": round(dense, 4)}, configurations


def summarize(rows: list[dict], configurations: dict[str, dict]) -> dict[str, Any]:
    """The best SDPA backend and the best dense implementation; into each configuration, its rows'
    speedups over the latter and attnpack against FlexAttention with CLEAR's mask."""
    dense = {
        row["implementation"]: row["ms"] for row in rows if row["configuration"] == "dense" and "ms" in row
    }
    summary: dict[str, Any] = {}
    sdpa = {name: t for name, t in dense.items() if name.startswith("sdpa-")}
    if sdpa:
        summary["best_sdpa"] = min(sdpa, key=sdpa.get)
    if dense:
        best = min(dense, key=dense.get)
        summary |= {"best_dense": best, "best_dense_ms": dense[best]}
    for label, entry in configurations.items():
        ms = {
            row["implementation"]: row["ms"] for row in rows if row["configuration"] == label and "ms" in row
        }
        op = {}
        if dense:
            op = {f"{name}_speedup_vs_best_dense": round(dense[best] / t, 3) for name, t in ms.items()}
        if "attnpack-clear" in ms and FLEX_RASTER in ms:
            op["attnpack_vs_flex_raster"] = round(ms[FLEX_RASTER] / ms["attnpack-clear"], 3)
        entry["op"] = op
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
        rows, configurations = time_op(resolution, device, dtype, warmup_ms, rep_ms)
        record = {
            "resolution": name,
            "pixels": resolution.pixels,
            "tokens": resolution.text + resolution.grid[0] * resolution.grid[1],
            "radius": resolution.radius,
            "op": {"rows": rows, "summary": summarize(rows, configurations)},
        }
        if steps:
            record["step"], step_configurations = time_step(resolution, device, dtype, repeats)
            for label, step in step_configurations.items():
                configurations[label]["step"] = step
        record["configurations"] = list(configurations.values())
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
            "configurations: r16 without pooled tokens (the default) and r16-down4 with pooled / 4 keys, "
            "both released CLEAR settings",
            f"{FLEX_RASTER}: FlexAttention with CLEAR's own arithmetic mask_mod, raster token order, "
            "create_block_mask with 128 x 128 blocks",
            "flex-* run on inputs already in their pattern's order (their kernel alone); the op's pooled "
            "keys are random and their pooling is not timed (it is in the step)",
            "speedups are over the best dense implementation of the run (op.summary.best_dense); the step's "
            "dense baseline is the fastest dense backend probed at the model's own attention calls "
            "(step.dense_backend), and the CLEAR steps run on it too",
            "the transformer step uses random weights: speed does not depend on them",
        ],
    ) | {
        "resolutions": records,
    }
    write_json(out, result, overwrite)
    series: dict[str, list] = {}
    for config in RESOLUTIONS[resolutions[0]].configurations:
        label = config.label
        for name, title in (("attnpack-clear", "attnpack"), (FLEX_RASTER, "FlexAttention, CLEAR's mask")):
            series[f"{title}, {label}"] = [
                _configuration(r, label).get("op", {}).get(f"{name}_speedup_vs_best_dense") for r in records
            ]
        if steps:
            series[f"transformer step, {label}"] = [
                _configuration(r, label).get("step", {}).get("speedup") for r in records
            ]
    plot_speedups(
        out.with_suffix(".png"),
        f"CLEAR local attention, {info['name']}",
        [f"{r['resolution']} ({r['tokens']:,} tokens)" for r in records],
        series,
        overwrite,
        xlabel="speedup over dense attention (the best dense implementation / backend; higher is better)",
    )
    return out


def _configuration(record: dict, label: str) -> dict:
    return next((c for c in record["configurations"] if c["configuration"] == label), {})


def table(result: dict) -> list[str]:
    """The command line's summary of a result file."""
    lines = [f"{'resolution':<12} {'configuration':<14} {'implementation':<28} {'ms':>10} {'TFLOP/s':>9}"]
    for record in result["resolutions"]:
        for row in record["op"]["rows"]:
            ms = f"{row['ms']:.3f}" if "ms" in row else "-"
            tflops = f"{row['tflops']:.1f}" if "tflops" in row else row.get("skipped", "")
            lines.append(
                f"{record['resolution']:<12} {row['configuration']:<14} {row['implementation']:<28} "
                f"{ms:>10} {tflops:>9}"
            )
        if "step" in record:
            step = record["step"]
            backend = step["dense_backend"]["picked"]
            lines.append(
                f"{record['resolution']:<12} transformer step: dense ({backend}) {step['dense_s']:.3f} s"
            )
            for config in record["configurations"]:
                if "step" in config:
                    lines.append(
                        f"{record['resolution']:<12} transformer step: {config['configuration']} "
                        f"{config['step']['clear_s']:.3f} s, {config['step']['speedup']:.2f}x"
                    )
    return lines
