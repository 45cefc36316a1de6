"""`attnpack bench radial`: one transformer forward at full-size configs, dense against radial attention.

Speed does not depend on weights, so the transformers are built from their published configs with random
weights, directly in bf16 on the device. For each model: stock dense attention on the fastest dense backend
of the machine, radial with every layer sparse, and radial with the paper's dense layers (what its sparse
steps cost); the 50-step estimate spends the paper's dense warm-up steps dense and the rest at the
sparse-step cost. The dense backend (`runners.pick_dense_backend`: one forward's SDPA calls recorded, then
SDPA's default, FlashAttention-3, cuDNN, flash and memory-efficient SDPA timed at their shapes) is recorded
per model as `dense_backend`, and every forward runs on it, radial's dense layers included. Off CUDA it is
SDPA's default.

Under torchrun with `--parallel ulysses|ring` every rank runs the model under diffusers' context
parallelism (`ranks.py`); the baseline is then attnpack's dense processor (diffusers' stock one has no ring
attention without an LSE-returning backend, and none on HunyuanVideo) on SDPA's default, and times are
the slowest rank's.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ..api import apply
from ..methods.radial import PRESETS
from ..parallel import context_parallel_plan
from .ranks import Ranks, start
from .report import plot_speedups, prepare_run, random_model, result_header, time_forward, write_json
from .runners import default_baseline, pick_dense_backend

logger = logging.getLogger("attnpack")

WAN_COMMON = dict(
    patch_size=(1, 2, 2),
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)


@dataclass(frozen=True)
class Model:
    name: str
    description: str
    family: str  # "wan" or "hunyuan_video"
    config: dict[str, Any] = field(repr=False)
    latent: tuple[int, ...]  # (B, C, F, H, W)
    text: int
    preset: str


MODELS = {
    m.name: m
    for m in (
        Model(
            "wan2.1-1.3b-480p-81f",
            "Wan 2.1 T2V 1.3B, 480x832, 81 frames (21 x 30 x 52 = 32,760 tokens)",
            "wan",
            WAN_COMMON | dict(num_attention_heads=12, ffn_dim=8960, num_layers=30),
            (1, 16, 21, 60, 104),
            512,
            "wan2.1",
        ),
        Model(
            "wan2.1-14b-720p-81f",
            "Wan 2.1 T2V 14B, 720x1280, 81 frames (21 x 45 x 80 = 75,600 tokens)",
            "wan",
            WAN_COMMON | dict(num_attention_heads=40, ffn_dim=13824, num_layers=40),
            (1, 16, 21, 90, 160),
            512,
            "wan2.1",
        ),
        Model(
            "hunyuan-720p-117f",
            "HunyuanVideo, 768x1280, 117 frames (30 x 48 x 80 = 115,200 tokens + 256 text)",
            "hunyuan_video",
            dict(
                in_channels=16,
                out_channels=16,
                num_attention_heads=24,
                attention_head_dim=128,
                num_layers=20,
                num_single_layers=40,
                num_refiner_layers=2,
                mlp_ratio=4.0,
                patch_size=2,
                patch_size_t=1,
                qk_norm="rms_norm",
                guidance_embeds=True,
                text_embed_dim=4096,
                pooled_projection_dim=768,
                rope_theta=256.0,
                rope_axes_dim=(16, 56, 56),
            ),
            (1, 16, 30, 96, 160),
            256,
            "hunyuanvideo",
        ),
        Model(
            "tiny",
            "a two-layer Wan on a CPU, to check the benchmark itself",
            "wan",
            WAN_COMMON
            | dict(num_attention_heads=2, attention_head_dim=32, ffn_dim=64, num_layers=2, text_dim=32),
            (1, 16, 9, 16, 32),
            16,
            "wan2.1",
        ),
        Model(
            "tiny-hunyuan",
            "a two-block HunyuanVideo on a CPU, to check the benchmark itself",
            "hunyuan_video",
            dict(
                in_channels=4,
                out_channels=4,
                num_attention_heads=2,
                attention_head_dim=16,
                num_layers=1,
                num_single_layers=1,
                num_refiner_layers=1,
                patch_size=2,
                patch_size_t=1,
                guidance_embeds=True,
                text_embed_dim=16,
                pooled_projection_dim=8,
                rope_axes_dim=(4, 6, 6),
            ),
            (1, 4, 5, 16, 32),
            16,
            "hunyuanvideo",
        ),
    )
}
SMOKE_MODELS = ("tiny", "tiny-hunyuan")
DEFAULT = [name for name in MODELS if name not in SMOKE_MODELS]
OPTIONS = ("repeats", "parallel")  # what the command line passes to run() besides the common ones
STEPS = 50


def build(model: Model, device: torch.device, dtype: torch.dtype):
    """The transformer with random weights, made directly in `dtype` on `device`, and one forward's inputs."""
    from diffusers import HunyuanVideoTransformer3DModel, WanTransformer3DModel

    cls = WanTransformer3DModel if model.family == "wan" else HunyuanVideoTransformer3DModel
    transformer = random_model(cls, model.config, device, dtype)
    g = torch.Generator(device=device).manual_seed(0)
    text_dim = model.config["text_dim"] if model.family == "wan" else model.config["text_embed_dim"]
    inputs = dict(
        hidden_states=torch.randn(model.latent, generator=g, device=device, dtype=dtype),
        timestep=torch.tensor([500], device=device),
        encoder_hidden_states=torch.randn(1, model.text, text_dim, generator=g, device=device, dtype=dtype),
        return_dict=False,
    )
    if model.family == "hunyuan_video":
        inputs |= dict(
            encoder_attention_mask=torch.ones(1, model.text, device=device, dtype=torch.bool),
            pooled_projections=torch.randn(
                1, model.config["pooled_projection_dim"], generator=g, device=device, dtype=dtype
            ),
            guidance=torch.tensor([6000.0], device=device, dtype=dtype),
        )
    return transformer, inputs


def run_model(
    model: Model, device: torch.device, dtype: torch.dtype, repeats: int, ranks: Ranks | None = None
) -> dict[str, Any]:
    transformer, inputs = build(model, device, dtype)
    preset = PRESETS[model.preset]
    settings = dict(decay_factor=preset["decay_factor"], sink=preset["sink"])
    if model.name in SMOKE_MODELS:
        settings["block_size"] = 16

    if ranks is None:
        baseline = pick_dense_backend(partial(transformer, **inputs), device)
    else:  # every rank would have to probe and agree; the baseline there is attnpack's dense processor
        baseline = default_baseline(
            f"under {ranks.mode} over {ranks.world} ranks: SDPA's default, nothing probed"
        )

    def timed() -> float:
        # Every forward on the picked backend: radial's dense layers get it too.
        with baseline.context():
            seconds = time_forward(transformer, inputs, device, repeats)
        return seconds if ranks is None else ranks.slowest(seconds)

    if ranks is None:
        dense = timed()
    else:
        transformer.enable_parallelism(config=ranks.config(), cp_plan=context_parallel_plan(transformer))
        with apply(transformer, "dense"):
            dense = timed()
    with apply(transformer, "radial", dense_layers=0, **settings):
        sparse = timed()
    with apply(transformer, "radial", dense_layers=preset["dense_layers"], **settings):
        sparse_steps = timed()
    dense_steps = preset["dense_steps"]
    estimate = STEPS * dense / (dense_steps * dense + (STEPS - dense_steps) * sparse_steps)
    transformer = inputs = None  # `timed` holds them; free the weights before the next model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "model": model.name,
        "description": model.description,
        "latent": list(model.latent),
        "text_tokens": model.text,
        "settings": settings | {"dense_layers": preset["dense_layers"], "dense_steps": dense_steps},
        "dense_backend": baseline.record,
        "seconds": {
            "dense": round(dense, 4),
            "radial_all_sparse": round(sparse, 4),
            "radial_sparse_step": round(sparse_steps, 4),
        },
        "speedup_all_sparse": round(dense / sparse, 3),
        "speedup_sparse_step": round(dense / sparse_steps, 3),
        f"speedup_{STEPS}_steps": round(estimate, 3),
    }


def run(
    models: list[str],
    *,
    device: str | None = None,
    out: Path | None = None,
    overwrite: bool = False,
    repeats: int = 3,
    parallel: str | None = None,
) -> Path:
    """Run the radial benchmark and write JSON + PNG; returns the JSON's path. `parallel`: "ulysses" or
    "ring" over the ranks of a torchrun (rank 0 writes)."""
    ranks = start(parallel, device)
    suite = "radial" if ranks is None else f"radial-{ranks.label}"
    device = device if ranks is None else str(ranks.device)
    device, info, out = prepare_run(suite, models, MODELS, SMOKE_MODELS, "model", device, out, overwrite)

    from tqdm.auto import tqdm

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    records = []
    for name in tqdm(models, desc="bench radial", unit="model", disable=ranks is not None and not ranks.main):
        records.append(run_model(MODELS[name], device, dtype, repeats, ranks))
    timing = {"method": "median of one transformer forward (CUDA events)", "repeats": repeats}
    notes = [
        "random weights: speed does not depend on them",
        "dense: the fastest dense backend probed at the model's own attention calls (dense_backend; SDPA's "
        "default off CUDA); every forward, radial's too, runs on it",
        f"speedup_{STEPS}_steps: the paper's dense steps at the dense cost, the rest at radial_sparse_step",
    ]
    if ranks is not None:
        timing |= {"parallel": ranks.mode, "ranks": ranks.world, "per_rank": "the slowest rank's time"}
        notes.append(f"dense: attnpack's dense processor under {ranks.mode} over {ranks.world} ranks")
    result = result_header(suite, info, dtype, timing, notes) | {"models": records}
    if ranks is not None and not ranks.main:
        ranks.barrier()
        return out
    write_json(out, result, overwrite)
    title = "" if ranks is None else f", {ranks.mode} x {ranks.world}"
    plot_speedups(
        out.with_suffix(".png"),
        f"radial attention, one transformer forward{title}, {info['name']}",
        [r["model"] for r in records],
        {
            "all layers sparse": [r["speedup_all_sparse"] for r in records],
            "sparse step (paper's dense layers)": [r["speedup_sparse_step"] for r in records],
            f"{STEPS}-step schedule": [r[f"speedup_{STEPS}_steps"] for r in records],
        },
        overwrite,
        xlabel="speedup over dense attention (higher is better)",
    )
    if ranks is not None:
        ranks.barrier()
    return out


def table(result: dict) -> list[str]:
    """The command line's summary of a result file."""
    lines = [
        f"{'model':<24} {'dense on':<15} {'dense s':>9} {'sparse s':>9} {'step s':>9} {'all-sparse':>11} "
        f"{'50 steps':>9}"
    ]
    for record in result["models"]:
        seconds = record["seconds"]
        lines.append(
            f"{record['model']:<24} {record['dense_backend']['picked']:<15} {seconds['dense']:>9.3f} "
            f"{seconds['radial_all_sparse']:>9.3f} {seconds['radial_sparse_step']:>9.3f} "
            f"{record['speedup_all_sparse']:>10.2f}x {record[f'speedup_{STEPS}_steps']:>8.2f}x"
        )
    return lines
