"""Training the toy models on the procedural world: `attnpack train toy-image|toy-video`.

Three stages, each resumable from its last checkpoint in the work folder:

1. the VAE: L1 + L2 reconstruction and a small KL term, on world pictures (video: 9-frame clips cut from
   17-frame videos);
2. latents: the training set encoded once, and the statistics the pipeline's VAE config records (FLUX: one
   shift and scale; Wan: a mean and std per channel);
3. the denoiser and the text encoders together, by flow matching: x_t = (1 - σ) x0 + σ ε against the target
   ε - x0, σ logit-normal; 10% of the captions empty (classifier-free guidance), for video 30% without the
   motion words; the weights averaged (EMA) into what is saved.

Then the pipeline is written with `save_pretrained` (safetensors), with the recipe, the training log, the
adherence measured on held-out prompts and a model card. Everything is seeded per step (data, noise, σ), so
a resumed run draws what an uninterrupted one would.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .toy_models import BUILDERS, KINDS, TOY_GEOMETRY, fit_defaults
from .world import caption, pixels, sample

logger = logging.getLogger("attnpack")


@dataclass(frozen=True)
class ToyRecipe:
    kind: str  # "image" or "video"
    samples: int  # training set: world seeds 0 .. samples - 1
    vae_steps: int
    vae_batch: int
    steps: int  # denoiser steps
    batch: int
    vae_learning_rate: float = 1e-3  # after 100 warm-up steps, cosine down to a tenth
    # Video VAE: frames per training clip (1 + 4k). It encodes and decodes chunk by chunk (4 frames, 1 latent
    # frame), its causal convolutions reading a cache of the past frames: trained on 5- or 9-frame clips only,
    # it leans on the zero padding before frame 0 and goes wrong past frame 5 / 9; on few scenes a step (2 clips
    # of 17 frames) it learns the shapes slowly or not at all. Phases: the first `vae_image_share` of the steps
    # on single frames of many scenes (after init_per_frame, a VAE for every length by itself), then clips,
    # then the last `vae_long_share` on whole world videos of `vae_long_frames`; every step the same number of
    # frames, vae_batch x vae_clip_frames.
    vae_clip_frames: int = 5
    vae_image_share: float = 0.0
    vae_long_share: float = 0.0
    vae_long_frames: int = 33
    # Bias of the posterior's log-variance at init: 0 keeps diffusers' init. The video VAE starts at -6, since
    # from unit variance its latents stayed so noisy that it only learnt the flat background.
    vae_logvar_init: float = 0.0
    kl_weight: float = 1e-6
    learning_rate: float = 3e-4
    warmup: int = 200
    caption_dropout: float = 0.1
    motion_dropout: float = 0.3  # video: captions without "moves <path>", so motion can be left open
    ema_decay: float = 0.999
    max_things: int = 2
    seed: int = 0
    checkpoint_every: int = 250
    log_every: int = 25

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r} is not a toy model; accepted: {', '.join(KINDS)}")
        for name in ("samples", "vae_batch", "batch", "checkpoint_every", "log_every", "max_things"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be >= 1")
        for name in ("vae_steps", "steps", "warmup"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be >= 0")
        for name in ("caption_dropout", "motion_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be in [0, 1)")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay={self.ema_decay!r} must be in [0, 1)")
        for name in ("vae_clip_frames", "vae_long_frames"):
            if getattr(self, name) % 4 != 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be 1 + 4k (the VAE's time chunks)")
        for name in ("vae_image_share", "vae_long_share"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be in [0, 1]")
        if self.vae_image_share + self.vae_long_share > 1:
            raise ValueError(
                f"vae_image_share + vae_long_share = {self.vae_image_share + self.vae_long_share:g} must be <= 1"
            )

    @property
    def geometry(self):
        return TOY_GEOMETRY[self.kind]

    def with_overrides(self, **overrides: Any) -> ToyRecipe:
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown recipe settings {unknown}; accepted: {', '.join(sorted(known))}")
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


RECIPES = {
    "image": ToyRecipe("image", samples=50_000, vae_steps=3000, vae_batch=16, steps=12_000, batch=32),
    # Video VAE history on a 2-core CPU: 2 clips of 9 frames a step (lr 1e-3, diffusers' posterior init) stayed
    # on a plateau and learnt only the background; from random temporal layers, clips learnt the later frames of
    # each chunk slowly (faded copies of the first frame's content). Started frame by frame (init_per_frame) the
    # single-frame phase alone round-trips held-out videos at any length (17 / 33 frames: colour 0.97 / 0.95,
    # shape 0.71 / 0.72 after 500 steps), while a following 5-frame clip phase brought back an error that grows past
    # the clip length (background 0.75 at 33 frames after 250 clip steps). So single frames only: the VAE keeps
    # every 4th frame and repeats it, and motion comes in steps of 4 frames.
    "video": ToyRecipe(
        "video",
        samples=5_000,
        vae_steps=600,
        vae_batch=6,
        steps=5000,
        batch=8,
        vae_learning_rate=5e-4,
        vae_clip_frames=5,
        vae_image_share=1.0,
        vae_long_share=0.0,
        vae_long_frames=33,
        vae_logvar_init=-6.0,
    ),
}


# ---- the world as training data


def world_sample(recipe: ToyRecipe, seed: int, frames: int | None = None):
    geometry = recipe.geometry
    return sample(seed, size=geometry.size, frames=frames or geometry.frames, max_things=recipe.max_things)


def vae_phases(recipe: ToyRecipe) -> tuple[int, int, int]:
    """Steps of the video VAE's phases: (single frames, clips, whole long videos)."""
    image = round(recipe.vae_steps * recipe.vae_image_share)
    long = round(recipe.vae_steps * recipe.vae_long_share)
    return image, recipe.vae_steps - image - long, long


def long_videos_a_step(recipe: ToyRecipe) -> int:
    return max(1, recipe.vae_batch * recipe.vae_clip_frames // recipe.vae_long_frames)


def vae_batch(recipe: ToyRecipe, step: int) -> torch.Tensor:
    """Step `step`'s VAE batch: images (B, 3, H, W) or clips (B, 3, F, H, W), drawn from the seed and step."""
    rng = np.random.default_rng([recipe.seed, 1, step])
    if recipe.kind == "image":
        seeds = rng.integers(0, recipe.samples, recipe.vae_batch)
        return torch.stack([pixels(world_sample(recipe, int(s)).frames)[:, 0] for s in seeds])
    frames_a_step = recipe.vae_batch * recipe.vae_clip_frames
    image_steps, clip_steps, _ = vae_phases(recipe)
    if step < image_steps:
        seeds = rng.integers(0, recipe.samples, frames_a_step)
        picks = rng.integers(0, recipe.geometry.frames, frames_a_step)
        return torch.stack(
            [pixels(world_sample(recipe, int(s)).frames[[p]]) for s, p in zip(seeds, picks, strict=True)]
        )
    if step >= image_steps + clip_steps:
        frames = recipe.vae_long_frames
        seeds = rng.integers(0, recipe.samples, long_videos_a_step(recipe))
        return torch.stack([pixels(world_sample(recipe, int(s), frames).frames) for s in seeds])
    clips = []
    for s in rng.integers(0, recipe.samples, recipe.vae_batch):
        frames = world_sample(recipe, int(s)).frames
        start = int(rng.integers(0, len(frames) - recipe.vae_clip_frames + 1))
        clips.append(pixels(frames[start : start + recipe.vae_clip_frames]))
    return torch.stack(clips)


def captions(recipe: ToyRecipe, seed: int) -> tuple[str, str]:
    """(caption, caption without motion words) of one training sample."""
    s = world_sample(recipe, seed)
    return s.caption, caption(s.things, s.background, s.textured, video=False)


# ---- checkpoints and the log


class WorkFolder:
    """The work folder of one recipe: checkpoints per stage, the latent cache, the log."""

    def __init__(self, path: Path, recipe: ToyRecipe, restart: bool):
        self.path = Path(path)
        recorded = self.path / "recipe.json"
        if restart and self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        if recorded.exists():
            before = json.loads(recorded.read_text())
            # Longer runs may resume a shorter one; anything else changes what was trained.
            if {k: v for k, v in before.items() if k not in ("steps", "vae_steps")} != {
                k: v for k, v in asdict(recipe).items() if k not in ("steps", "vae_steps")
            }:
                raise ValueError(
                    f"work folder {self.path} holds a run of another recipe ({recorded}); pass --restart to "
                    "start over there, or choose another --work-dir"
                )
        recorded.write_text(json.dumps(asdict(recipe), indent=1) + "\n")
        self.log_path = self.path / "log.jsonl"

    def checkpoint(self, stage: str) -> Path:
        return self.path / stage / "checkpoint"

    def step_of(self, stage: str) -> tuple[int, float]:
        """(steps done, seconds spent) of the stage's last checkpoint; (0, 0) when there is none."""
        marker = self.checkpoint(stage) / "progress.json"
        if not marker.exists():
            return 0, 0.0
        progress = json.loads(marker.read_text())
        return progress["step"], progress["seconds"]

    def save(self, accelerator, stage: str, step: int, seconds: float) -> None:
        """Checkpoint by renames, so an interrupted save leaves the previous checkpoint whole."""
        final = self.checkpoint(stage)
        partial, old = final.with_name("checkpoint-partial"), final.with_name("checkpoint-old")
        shutil.rmtree(partial, ignore_errors=True)
        accelerator.save_state(str(partial))
        (partial / "progress.json").write_text(json.dumps({"step": step, "seconds": seconds}))
        if final.exists():
            final.rename(old)
        partial.rename(final)
        shutil.rmtree(old, ignore_errors=True)

    def log(self, entry: dict[str, Any]) -> None:
        with self.log_path.open("a") as f:
            f.write(json.dumps(entry) + "\n")

    def trim_log(self, stage: str, step: int) -> None:
        """Drop what a stage logged after its checkpoint: the resumed run logs those steps again."""
        if not self.log_path.exists():
            return
        entries = [json.loads(line) for line in self.log_path.read_text().splitlines() if line.strip()]
        kept = [e for e in entries if e["stage"] != stage or e["step"] <= step]
        self.log_path.write_text("".join(json.dumps(e) + "\n" for e in kept))

    def entries(self) -> list[dict[str, Any]]:
        if not self.log_path.exists():
            return []
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line.strip()]


class _Loop:
    """The loop both training stages share: resume, steps under a progress bar, the log, checkpoints."""

    def __init__(self, work: WorkFolder, accelerator, stage: str, total: int, recipe: ToyRecipe):
        self.work, self.accelerator, self.stage, self.total = work, accelerator, stage, total
        self.log_every, self.checkpoint_every = recipe.log_every, recipe.checkpoint_every
        self.start, self.seconds = work.step_of(stage)
        if self.start:
            accelerator.load_state(str(work.checkpoint(stage)))
            logger.info("train %s: resuming at step %d of %d", stage, self.start, total)
        work.trim_log(stage, self.start)

    def run(self, step_fn, learning_rate=None) -> None:
        from tqdm.auto import tqdm

        losses: list[float] = []
        clock = time.perf_counter()
        bar = tqdm(
            total=self.total, initial=min(self.start, self.total), desc=f"train {self.stage}", unit="step"
        )
        for step in range(self.start, self.total):
            losses.append(step_fn(step))
            done = step + 1
            bar.update(1)
            now = time.perf_counter()
            self.seconds, clock = self.seconds + now - clock, now
            if done % self.log_every == 0 or done == self.total:
                entry = {"stage": self.stage, "step": done, "loss": float(np.mean(losses)),
                         "seconds": round(self.seconds, 1)}  # fmt: skip
                if learning_rate is not None:
                    entry["learning_rate"] = learning_rate()
                self.work.log(entry)
                bar.set_postfix(loss=f"{entry['loss']:.4f}")
                losses = []
            if done % self.checkpoint_every == 0 or done == self.total:
                self.work.save(self.accelerator, self.stage, done, self.seconds)
                clock = time.perf_counter()  # saving is not training time
        bar.close()


# ---- stage 1: the VAE


def init_posterior_logvar(vae, bias: float) -> None:
    """Set the bias of the convolution that yields the posterior's log-variance (the second half of the
    moments' channels) to `bias`; 0 leaves the VAE as built."""
    if bias == 0:
        return
    moments = getattr(vae, "quant_conv", None)
    if moments is None or moments.bias is None:
        raise ValueError(
            f"vae_logvar_init={bias!r} needs a VAE with a quant_conv; {type(vae).__name__} has none"
        )
    with torch.no_grad():
        moments.bias[moments.bias.shape[0] // 2 :] = bias


def init_per_frame(vae) -> None:
    """Start a causal video VAE as an image VAE applied frame by frame: every causal convolution sees only the
    current frame (its past taps zero, the current one scaled to keep the variance), temporal downsampling
    keeps the last frame of each step and temporal upsampling repeats it. Trained on single frames it stays
    exactly that (the past taps get no gradient) and round-trips every length alike; clip phases after it
    would learn the motion between kept frames, but brought back an error past the clip length (RECIPES).
    Started from random temporal layers instead, it learnt the later frames of each chunk slowly."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    with torch.no_grad():
        for name, conv in vae.named_modules():
            if not isinstance(conv, WanCausalConv3d) or conv.kernel_size[0] == 1:
                continue
            taps = conv.kernel_size[0]
            if name.endswith("time_conv"):  # (3, 1, 1): out = in (down) or 2 x in (up, two frames)
                conv.weight.zero_()
                conv.bias.zero_()
                identity = torch.eye(conv.in_channels, dtype=conv.weight.dtype)
                for copy in range(conv.out_channels // conv.in_channels):
                    rows = slice(copy * conv.in_channels, (copy + 1) * conv.in_channels)
                    conv.weight[rows, :, -1, 0, 0] = identity
            else:
                conv.weight[:, :, -1] *= taps**0.5
                conv.weight[:, :, :-1] = 0


def train_vae(pipe, recipe: ToyRecipe, work: WorkFolder, accelerator) -> None:
    vae = pipe.vae
    vae.train()
    # A resumed run loads its checkpoint over these.
    if recipe.kind == "video":
        init_per_frame(vae)
    init_posterior_logvar(vae, recipe.vae_logvar_init)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_learning_rate, weight_decay=0.0)
    total = max(recipe.vae_steps, 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / 100) * (0.55 + 0.45 * math.cos(math.pi * step / total))
    )
    vae, optimizer, schedule = accelerator.prepare(vae, optimizer, schedule)
    loop = _Loop(work, accelerator, "vae", recipe.vae_steps, recipe)

    def step_fn(step: int) -> float:
        x = vae_batch(recipe, step).to(accelerator.device)
        torch.manual_seed(recipe.seed * 1_000_003 + step)  # the posterior sample
        posterior = accelerator.unwrap_model(vae).encode(x).latent_dist
        reconstruction = accelerator.unwrap_model(vae).decode(posterior.sample()).sample
        error = reconstruction.float() - x
        loss = error.abs().mean() + error.square().mean() + recipe.kl_weight * posterior.kl().mean()
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        return loss.item()

    loop.run(step_fn, learning_rate=lambda: float(schedule.get_last_lr()[0]))
    accelerator.unwrap_model(vae).eval()


# ---- stage 2: latents


def encode_training_set(pipe, recipe: ToyRecipe, work: WorkFolder, device) -> dict[str, Any]:
    """The training set's latents (normalised as the pipeline expects) and captions; cached in the work
    folder. Also writes the latent statistics into the VAE's config."""
    from tqdm.auto import tqdm

    cache = work.path / f"latents-vae{recipe.vae_steps}.pt"  # stale once the VAE trains longer
    vae = pipe.vae.to(device).eval()
    if cache.exists():
        data = torch.load(cache, weights_only=False)
    else:
        chunks, texts = [], []
        chunk = 64 if recipe.kind == "image" else 8
        with torch.no_grad():
            for first in tqdm(range(0, recipe.samples, chunk), desc="encode training set", unit="chunk"):
                seeds = range(first, min(first + chunk, recipe.samples))
                batch = torch.stack([pixels(world_sample(recipe, s).frames) for s in seeds]).to(device)
                if recipe.kind == "image":
                    batch = batch[:, :, 0]
                chunks.append(vae.encode(batch).latent_dist.mode().cpu())
                texts.extend(captions(recipe, s) for s in seeds)
        raw = torch.cat(chunks)
        data = {"raw": raw, "captions": texts}
        torch.save(data, cache)
    raw = data["raw"]
    if recipe.kind == "image":  # FLUX: (z - shift) * scale
        shift, std = float(raw.mean()), float(raw.std())
        pipe.vae.register_to_config(shift_factor=shift, scaling_factor=1.0 / std)
        latents = (raw - shift) / std
    else:  # Wan: per channel, (z - mean) / std
        mean = raw.mean(dim=(0, 2, 3, 4))
        std = raw.std(dim=(0, 2, 3, 4))
        pipe.vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())
        latents = (raw - mean[None, :, None, None, None]) / std[None, :, None, None, None]
    return {"latents": latents, "captions": data["captions"]}


# ---- stage 3: the denoiser and the text encoders


def _text_modules(pipe) -> dict[str, torch.nn.Module]:
    names = ("text_encoder", "text_encoder_2") if recipe_kind(pipe) == "image" else ("text_encoder",)
    return {name: getattr(pipe, name) for name in names}


def recipe_kind(pipe) -> str:
    return "image" if type(pipe).__name__ == "FluxPipeline" else "video"


def denoiser_loss(
    pipe, latents: torch.Tensor, prompts: list[str], generator: torch.Generator
) -> torch.Tensor:
    """Flow-matching loss of the pipeline's denoiser on clean `latents` (normalised, unpacked) with
    `prompts`, encoded by the pipeline's own encode_prompt so that training reads text as sampling does."""
    device = latents.device
    batch = latents.shape[0]
    sigma = torch.sigmoid(torch.randn(batch, generator=generator)).to(device)
    noise = torch.randn(latents.shape, generator=generator).to(device)
    view = sigma.view(-1, *([1] * (latents.ndim - 1)))
    noisy = (1 - view) * latents + view * noise
    target = noise - latents
    length = TOY_GEOMETRY[recipe_kind(pipe)].text_length
    if recipe_kind(pipe) == "image":
        prompt_embeds, pooled, text_ids = pipe.encode_prompt(
            prompts, None, device=device, max_sequence_length=length
        )
        _, channels, height, width = latents.shape
        packed = pipe._pack_latents(noisy, batch, channels, height, width)
        image_ids = pipe._prepare_latent_image_ids(batch, height // 2, width // 2, device, latents.dtype)
        prediction = pipe.transformer(
            hidden_states=packed,
            timestep=sigma,
            pooled_projections=pooled,
            encoder_hidden_states=prompt_embeds,
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]
        target = pipe._pack_latents(target, batch, channels, height, width)
    else:
        prompt_embeds, _ = pipe.encode_prompt(
            prompts, do_classifier_free_guidance=False, max_sequence_length=length, device=device
        )
        prediction = pipe.transformer(
            hidden_states=noisy, timestep=sigma * 1000, encoder_hidden_states=prompt_embeds, return_dict=False
        )[0]
    return (prediction.float() - target.float()).square().mean()


def train_denoiser(pipe, recipe: ToyRecipe, work: WorkFolder, accelerator, data: dict[str, Any]) -> None:
    from diffusers.training_utils import EMAModel

    device = accelerator.device
    trainable = torch.nn.ModuleDict({"transformer": pipe.transformer, **_text_modules(pipe)})
    trainable.train()
    optimizer = torch.optim.AdamW(trainable.parameters(), lr=recipe.learning_rate, betas=(0.9, 0.99),
                                  weight_decay=0.01)  # fmt: skip
    warmup = max(recipe.warmup, 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    trainable, optimizer, schedule = accelerator.prepare(trainable, optimizer, schedule)
    ema = EMAModel(accelerator.unwrap_model(trainable).parameters(), decay=recipe.ema_decay)
    ema.to(device)
    accelerator.register_for_checkpointing(ema)
    loop = _Loop(work, accelerator, "denoiser", recipe.steps, recipe)
    latents, texts = data["latents"], data["captions"]

    def step_fn(step: int) -> float:
        generator = torch.Generator().manual_seed(recipe.seed * 1_000_003 + step)
        rows = torch.randint(len(latents), (recipe.batch,), generator=generator)
        draws = torch.rand(recipe.batch, 2, generator=generator)
        prompts = []
        for row, (drop, still) in zip(rows.tolist(), draws.tolist(), strict=True):
            moving, without_motion = texts[row]
            if drop < recipe.caption_dropout:
                prompts.append("")
            elif recipe.kind == "video" and still < recipe.motion_dropout:
                prompts.append(without_motion)
            else:
                prompts.append(moving)
        with accelerator.autocast():
            loss = denoiser_loss(pipe, latents[rows].to(device), prompts, generator)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(trainable.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        ema.step(accelerator.unwrap_model(trainable).parameters())
        return loss.item()

    loop.run(step_fn, learning_rate=lambda: float(schedule.get_last_lr()[0]))
    ema.copy_to(accelerator.unwrap_model(trainable).parameters())
    trainable.eval()


# ---- the whole run


@dataclass
class ToyTrainingResult:
    out: Path
    recipe: ToyRecipe
    log: list[dict[str, Any]]
    metrics: dict[str, Any]


def train_toy(
    kind: str,
    out: str | os.PathLike,
    *,
    work_dir: str | os.PathLike | None = None,
    recipe: ToyRecipe | None = None,
    restart: bool = False,
    overwrite: bool = False,
    mixed_precision: str = "no",
    check_prompts: int | None = None,
) -> ToyTrainingResult:
    """Train the toy model `kind` ("image" or "video") and write it to `out` (refused when it exists, unless
    `overwrite`). `work_dir` (default `.attnpack-train/toy-<kind>`) holds the checkpoints and the latent
    cache: running again resumes there. `check_prompts`: held-out prompts the adherence is measured on."""
    from accelerate import Accelerator

    # Imported here, not at the top: attnpack.eval imports attnpack.training (the world, the toy models) as it
    # loads, so a top-level import would make the two packages' __init__s wait on each other. No module loop:
    # eval.toy imports nothing from this module.
    from ..eval.toy import CHECK_PROMPTS, measure_adherence

    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not a toy model; accepted: {', '.join(KINDS)}")
    recipe = recipe or RECIPES[kind]
    if recipe.kind != kind:
        raise ValueError(f"recipe is for {recipe.kind!r}, not {kind!r}")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"train toy-{kind}: {out} exists; pass --overwrite to replace it, or choose another --out")  # fmt: skip
    work = WorkFolder(
        Path(work_dir) if work_dir else Path(".attnpack-train") / f"toy-{kind}", recipe, restart
    )
    accelerator = Accelerator(mixed_precision=mixed_precision)
    torch.manual_seed(recipe.seed)
    pipe = BUILDERS[kind](recipe.seed)
    pipe.to(accelerator.device)

    train_vae(pipe, recipe, work, accelerator)
    data = encode_training_set(pipe, recipe, work, accelerator.device)
    accelerator = Accelerator(mixed_precision=mixed_precision)  # a fresh one: its own checkpoint registry
    train_denoiser(pipe, recipe, work, accelerator, data)

    pipe = fit_defaults(pipe.to("cpu"))
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    pipe.save_pretrained(str(staging), safe_serialization=True)
    metrics = measure_adherence(pipe, kind, count=check_prompts or CHECK_PROMPTS[kind])
    log = work.entries()
    write_card(staging, recipe, log, metrics, mixed_precision, str(accelerator.device))
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    logger.info("train toy-%s: wrote %s", kind, out)
    return ToyTrainingResult(out, recipe, log, metrics)


def write_card(folder: Path, recipe: ToyRecipe, log, metrics, mixed_precision: str, device: str) -> None:
    """recipe.json, training-log.jsonl, metrics.json and README.md (the model card) into `folder`."""
    import diffusers
    import transformers

    (folder / "recipe.json").write_text(json.dumps(asdict(recipe), indent=1) + "\n")
    (folder / "training-log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in log))
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    weights = sum(p.stat().st_size for p in folder.rglob("*.safetensors"))
    versions = (torch.__version__, diffusers.__version__, transformers.__version__)
    card = _card(recipe, log, metrics, weights, device, mixed_precision, *versions)
    (folder / "README.md").write_text(card)


def _stage_summary(log, stage: str) -> str:
    entries = [e for e in log if e["stage"] == stage]
    if not entries:
        return "not run"
    first, last = entries[0], entries[-1]
    return (
        f"{last['step']} steps, loss {first['loss']:.4f} (first {first['step']} steps) -> {last['loss']:.4f} "
        f"(last {last['step'] - (entries[-2]['step'] if len(entries) > 1 else 0)}), {last['seconds'] / 60:.0f} min"
    )


def _video_vae_phases(recipe) -> str:
    frames = recipe.vae_batch * recipe.vae_clip_frames
    what = (f"{frames} single frames", f"{recipe.vae_batch} clips of {recipe.vae_clip_frames} frames",
            f"{long_videos_a_step(recipe)} whole world videos of {recipe.vae_long_frames} frames")  # fmt: skip
    steps = ", then ".join(f"{n} steps of {w}" for n, w in zip(vae_phases(recipe), what, strict=True) if n)
    return f"; started frame by frame (`init_per_frame`), {steps}"


def _card(recipe, log, metrics, weights, device, mixed_precision, *versions) -> str:
    kind = recipe.kind
    geometry = recipe.geometry
    family = "FLUX (FluxPipeline)" if kind == "image" else "Wan 2.1 (WanPipeline)"
    what = (
        f"{geometry.size} x {geometry.size} images"
        if kind == "image"
        else f"{geometry.frames} frames of {geometry.size} x {geometry.size}"
    )
    rows = "\n".join(
        f"| {key} | {value:.3f} | {metrics['vae_round_trip'][key]:.3f} | {metrics['ground_truth'][key]:.3f} |"
        for key, value in metrics["adherence"].items()
    )
    call = ", ".join(f"{k}={v!r}" for k, v in geometry.call.items())
    return f"""# attnpack toy-{kind}

A small {family} model trained from scratch on attnpack's procedural world (`attnpack.training.world`):
{what} of one or two coloured shapes (circle, square, triangle, star; six colours, two sizes) on a plain or
textured background{
        ", moving along straight, arc or bouncing paths" if kind == "video" else ""
    }, each with its
caption. It exists so that attnpack runs something meaningful offline and so that what each attention method
does to quality can be measured; it knows nothing outside that world.

- Load: `attnpack.training.load_toy("{kind}")`, or `DiffusionPipeline.from_pretrained("assets/toy-{kind}")`.
- Call it as it was trained: {call}. Prompts use the world's words
  ("a large red circle and a small blue star over a plain grey background"); other words are `<unk>`.
- Weights: {weights / 1e6:.1f} MB (safetensors, float32).

## Data

World seeds 0-{recipe.samples - 1} (at most {recipe.max_things} shapes each), generated by code in the
repository; nothing downloaded. Held-out prompts for the figures below come from seeds from 1,000,000 on.

## Training

`attnpack train toy-{kind}` ({device}, mixed precision {mixed_precision}; torch {versions[0]}, diffusers
{versions[1]}, transformers {versions[2]}); the recipe is `recipe.json`, the log `training-log.jsonl`.

- VAE: {_stage_summary(log, "vae")}{_video_vae_phases(recipe) if kind == "video" else ""}
- denoiser and text encoders: {_stage_summary(log, "denoiser")}

## Adherence (held-out prompts, OpenCV shape detection)

{metrics["count"]} prompts, seeds as in `metrics.json`, the call above. Share of captioned objects found with
their colour, with colour and shape, and with the size too; background right; `exact`: everything right{
        "; motion: the captioned paths the objects follow" if kind == "video" else ""
    }. Beside the model: the
world's own pictures of the same prompts through this VAE and back (what the decoder can show), and as they
are (the detector's ceiling: overlapping shapes hide each other).

| measure | generated | VAE round trip | world pictures |
| --- | --- | --- | --- |
{rows}
"""
