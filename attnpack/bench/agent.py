"""`attnpack bench agent`: one UNet step at full-size SD 1.5 (512²) and SDXL (1024²), dense against AgentSD.

The UNets are built from their published configs with random weights (speed does not depend on them),
directly in fp16 on the device, and called with a batch of 2 (classifier-free guidance) and 77 text tokens.
Timed per model: stock dense attention, AgentSD's stage 1 (sx = sy = 4, ratio 0.4, agent_ratio 0.95) and
stage 2 (sx = sy = 2, ratio 0.4, agent_ratio 0.5: plain ToMe, the agents would not save work), each held for
the whole run; the 50-step estimate runs 20 steps at the stage-1 cost and 30 at the stage-2 cost, as the
AgentSD README schedules them. Peak memory per UNet call is recorded on CUDA.

Dense attention runs on the fastest dense backend of the machine (`runners.pick_dense_backend`: one forward's
SDPA calls recorded, then SDPA's default, FlashAttention-3, cuDNN, flash and memory-efficient SDPA timed at
their shapes), recorded per model as `dense_backend`; every forward, AgentSD's too, runs on it. Off CUDA it
is SDPA's default.
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
from ..methods.agent import AgentAttention
from .report import (
    peak_memory_gib,
    plot_speedups,
    prepare_run,
    random_model,
    result_header,
    time_forward,
    write_json,
)
from .runners import pick_dense_backend

logger = logging.getLogger("attnpack")

STEPS, STAGE_1_STEPS = 50, 20
SD15_CONFIG = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
)
SDXL_CONFIG = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
TINY_CONFIG = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=16,
)


@dataclass(frozen=True)
class Model:
    name: str
    description: str
    config: dict[str, Any] = field(repr=False)
    latent: tuple[int, int, int, int]  # (B, C, H, W)
    preset: str  # AgentAttention.preset

    @property
    def text_dim(self) -> int:
        return self.config["cross_attention_dim"]


MODELS = {
    m.name: m
    for m in (
        Model("sd1.5-512", "SD 1.5 UNet, 512x512 (64 x 64 latent), batch 2", SD15_CONFIG, (2, 4, 64, 64), "sd1.5"),
        Model("sdxl-1024", "SDXL UNet, 1024x1024 (128 x 128 latent), batch 2", SDXL_CONFIG, (2, 4, 128, 128), "sdxl"),
        Model("tiny", "a two-level UNet, 16 x 16 latent (a CPU check of the benchmark)", TINY_CONFIG, (2, 4, 16, 16), "sd1.5"),
    )
}  # fmt: skip
SMOKE = ("tiny",)
DEFAULT = [name for name in MODELS if name not in SMOKE]
OPTIONS = ("repeats",)
STAGES = {
    "stage1": dict(ratio=0.4, agent_ratio=0.95, sx=4, sy=4),
    "stage2": dict(ratio=0.4, agent_ratio=0.5, sx=2, sy=2),
}


def build(model: Model, device: torch.device, dtype: torch.dtype):
    """The UNet with random weights and one call's inputs."""
    from diffusers import UNet2DConditionModel

    unet = random_model(UNet2DConditionModel, model.config, device, dtype)
    g = torch.Generator(device=device).manual_seed(0)
    batch = model.latent[0]
    inputs = dict(
        sample=torch.randn(model.latent, generator=g, device=device, dtype=dtype),
        timestep=torch.tensor(500, device=device),
        encoder_hidden_states=torch.randn(batch, 77, model.text_dim, generator=g, device=device, dtype=dtype),
        return_dict=False,
    )
    if model.config.get("addition_embed_type") == "text_time":
        inputs["added_cond_kwargs"] = dict(
            text_embeds=torch.randn(batch, 1280, generator=g, device=device, dtype=dtype),
            time_ids=torch.tensor([[1024, 1024, 0, 0, 1024, 1024]] * batch, device=device, dtype=dtype),
        )
    return unet, inputs


def run_model(model: Model, device: torch.device, dtype: torch.dtype, repeats: int) -> dict[str, Any]:
    unet, inputs = build(model, device, dtype)
    baseline = pick_dense_backend(partial(unet, **inputs), device)
    # Every forward on the picked backend: AgentSD's own attention calls get it too.
    with baseline.context():
        seconds = {"dense": time_forward(unet, inputs, device, repeats)}
        memory = {"dense": peak_memory_gib(partial(unet, **inputs), device)}
    for stage, settings in STAGES.items():
        # Each stage held for the whole run (late_start=1): no scheduler needed around a bare UNet.
        with baseline.context(), apply(unet, AgentAttention.preset(model.preset, late_start=1.0, **settings)):
            seconds[stage] = time_forward(unet, inputs, device, repeats)
            memory[stage] = peak_memory_gib(partial(unet, **inputs), device)
    estimate = (
        STEPS
        * seconds["dense"]
        / (STAGE_1_STEPS * seconds["stage1"] + (STEPS - STAGE_1_STEPS) * seconds["stage2"])
    )
    del unet, inputs
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "model": model.name,
        "description": model.description,
        "latent": list(model.latent),
        "settings": {"preset": model.preset, **AgentAttention.preset(model.preset).config()},
        "dense_backend": baseline.record,
        "seconds": {name: round(value, 4) for name, value in seconds.items()},
        "peak_memory_gib": {
            name: None if value is None else round(value, 3) for name, value in memory.items()
        },
        "speedup_stage1": round(seconds["dense"] / seconds["stage1"], 3),
        "speedup_stage2": round(seconds["dense"] / seconds["stage2"], 3),
        f"speedup_{STEPS}_steps": round(estimate, 3),
    }


def run(
    models: list[str],
    *,
    device: str | None = None,
    out: Path | None = None,
    overwrite: bool = False,
    repeats: int = 5,
) -> Path:
    """Run the agent benchmark and write JSON + PNG; returns the JSON's path."""
    device, info, out = prepare_run("agent", models, MODELS, SMOKE, "model", device, out, overwrite)

    from tqdm.auto import tqdm

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    records = [run_model(MODELS[name], device, dtype, repeats) for name in tqdm(models, desc="bench agent")]
    result = result_header(
        "agent",
        info,
        dtype,
        {"method": "median of one UNet forward (CUDA events)", "repeats": repeats},
        [
            "random weights: speed does not depend on them",
            f"speedup_{STEPS}_steps: {STAGE_1_STEPS} steps at the stage-1 cost, the rest at the stage-2 cost",
            "peak_memory_gib: allocated during one UNet call above the weights and inputs (CUDA only)",
            "dense: the fastest dense backend probed at the UNet's own attention calls (dense_backend)",
        ],
    ) | {
        "models": records,
    }
    write_json(out, result, overwrite)
    plot_speedups(
        out.with_suffix(".png"),
        f"AgentSD, one UNet step, {info['name']}",
        [r["model"] for r in records],
        {
            "stage 1 (agents, sx = sy = 4)": [r["speedup_stage1"] for r in records],
            "stage 2 (ToMe, sx = sy = 2)": [r["speedup_stage2"] for r in records],
            f"{STEPS}-step schedule": [r[f"speedup_{STEPS}_steps"] for r in records],
        },
        overwrite,
        xlabel="speedup over dense attention (higher is better)",
    )
    return out


def table(result: dict) -> list[str]:
    """The command line's summary of a result file."""
    lines = [
        f"{'model':<11} {'dense on':<15} {'dense s':>9} {'stage1 s':>9} {'stage2 s':>9} {'stage 1':>8} "
        f"{'50 steps':>9}"
    ]
    for record in result["models"]:
        seconds = record["seconds"]
        lines.append(
            f"{record['model']:<11} {record['dense_backend']['picked']:<15} {seconds['dense']:>9.4f} "
            f"{seconds['stage1']:>9.4f} {seconds['stage2']:>9.4f} {record['speedup_stage1']:>7.2f}x "
            f"{record[f'speedup_{STEPS}_steps']:>8.2f}x"
        )
    return lines
