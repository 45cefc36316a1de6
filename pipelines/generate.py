"""One generation with a preset and a method, as the CLI, the app and the workflows run it: the method
applied for the call (through the pipeline it needs: long videos, several subjects, trajectories), timed,
optionally beside the dense result, and saved with its full config (PNG text chunk; MP4 + JSON sidecar)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..api import apply
from ..methods import METHODS, make_method
from .presets import get_preset, load_preset


@dataclass
class Generation:
    frames: list  # uint8 (H, W, 3) arrays: one for an image, several for a video
    kind: str  # "image" or "video"
    seconds: float
    config: dict[str, Any]
    dense_frames: list | None = None
    dense_seconds: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. the reference sheet, the trajectory plan

    @property
    def speedup(self) -> float | None:
        return None if self.dense_seconds is None else self.dense_seconds / self.seconds


class Cancelled(RuntimeError):
    """The user stopped the generation."""


def generate(
    preset: str,
    prompt: str,
    *,
    method: str = "dense",
    params: dict[str, Any] | None = None,
    seed: int = 0,
    compare_dense: bool = False,
    pipe=None,
    progress: Callable[[int, int], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
    **overrides: Any,
) -> Generation:
    """Generate with `preset` (name) and `method` (name + `params`); `overrides` replace the preset's call
    settings (height, width, num_frames, num_inference_steps, guidance_scale). `pipe`: an already loaded
    pipeline of the preset (the app keeps them)."""
    info = get_preset(preset)
    params = dict(params or {})
    if method not in info.methods:
        raise ValueError(
            f"method={method!r} is not offered for preset {preset!r}; accepted: {', '.join(info.methods)}"
        )
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("prompt must be a non-empty string")
    call = {**info.call, **{k: v for k, v in overrides.items() if v is not None}}
    settings = {**info.settings(method), **params}
    METHODS[method].needs.check(method, settings)
    make_method(method, **settings)  # a bad setting fails here, before any weights load
    pipe = pipe if pipe is not None else load_preset(preset)
    run = lambda name, values: _run(pipe, info, name, values, prompt, seed, call, progress, cancelled)  # noqa: E731
    frames, seconds, extra = run(method, settings)
    config = {"preset": preset, "model": info.model, "prompt": prompt, "seed": seed, "method": method,
              "params": _jsonable(settings), "call": _jsonable(call), "seconds": round(seconds, 3)}  # fmt: skip
    result = Generation(frames, info.kind, seconds, config, extra=extra)
    if compare_dense and method != "dense":
        result.dense_frames, result.dense_seconds, _ = run("dense", {})
        config.update(dense_seconds=round(result.dense_seconds, 3), speedup=round(result.speedup, 3))
    return result


def _run(pipe, info, method, settings, prompt, seed, call, progress, cancelled):
    generator = torch.Generator().manual_seed(seed)
    steps = call.get("num_inference_steps", 50)
    kwargs = {**call, "generator": generator, **_callbacks(progress, cancelled, steps)}
    runner = RUNNERS[METHODS[method].needs.runner]
    start = time.perf_counter()
    frames, extra = runner(pipe, info, method, dict(settings), prompt, kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return frames, time.perf_counter() - start, extra


# How a generation runs a method, by the runner its class declares (`needs.runner`): each takes the loaded
# pipeline, the preset, the method's name and settings, the prompt and the call's keyword arguments, and
# returns the frames and any pictures beside them (the reference sheet, the trajectory plan).


def _run_applied(pipe, info, method, settings, prompt, kwargs):
    with apply(pipe, make_method(method, **settings)):
        output_type = "np" if info.kind == "video" else "pil"
        out = pipe(prompt=prompt, output_type=output_type, **kwargs)
    return (_frames(out.frames) if info.kind == "video" else [np.asarray(out.images[0])]), {}


def _run_long_video(pipe, info, method, settings, prompt, kwargs):
    from . import long_video

    out = long_video(pipe, prompt, method=make_method(method, **settings), output_type="np", **kwargs)
    return _frames(out.frames), {}


def _run_multi_subject(pipe, info, method, settings, prompt, kwargs):
    from . import multi_subject

    subjects = settings.pop("subjects")
    out = multi_subject(pipe, subjects, prompt, method=settings, **_without(kwargs, "num_frames"))
    return [np.asarray(out.image)], {"sheet": out.sheet}


def _run_trajectory(pipe, info, method, settings, prompt, kwargs):
    from PIL import Image

    from ..methods.trajectory import trajectory_picture
    from . import trajectory_video

    out = trajectory_video(pipe, prompt=prompt, output_type="np", **settings, **kwargs)
    frames = _frames(out.frames)
    over = [Image.fromarray(f) for f in frames]  # the boxes drawn over the video
    return frames, {"plan": trajectory_picture(out.method.keyframes, len(frames), frames=over)}


# What the pictures runners return beside the frames show.
RUNNER_PICTURES = {"multi_subject": "Reference sheet", "trajectory": "Plan"}
RUNNERS: dict[str, Callable] = {
    "apply": _run_applied,
    "long_video": _run_long_video,
    "multi_subject": _run_multi_subject,
    "trajectory": _run_trajectory,
}


def _callbacks(progress, cancelled, steps: int) -> dict[str, Any]:
    if progress is None and cancelled is None:
        return {}

    def on_step_end(pipeline, step, timestep, tensors):
        if progress is not None:
            progress(step + 1, steps)
        if cancelled is not None and cancelled():
            raise Cancelled("generation cancelled")
        return {}

    return {"callback_on_step_end": on_step_end}


def _without(kwargs: dict, *names: str) -> dict:
    return {k: v for k, v in kwargs.items() if k not in names}


def _frames(video) -> list:
    """Pipeline video output (np, (B, F, H, W, 3) floats in [0, 1] or a list) as uint8 frames."""
    array = np.asarray(video[0] if isinstance(video, list) else video)
    if array.ndim == 5:
        array = array[0]
    if array.dtype != np.uint8:
        array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
    return list(array)


def _jsonable(value):
    return json.loads(json.dumps(value, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)))


def side_by_side(left: list, right: list) -> list:
    """Frame pairs joined horizontally (the dense result on the left)."""
    return [np.concatenate([a, b], axis=1) for a, b in zip(left, right, strict=True)]


def save(result: Generation, path: str | Path, *, overwrite: bool = False, fps: int = 8) -> list[Path]:
    """Write the result: PNG with the config in a text chunk, or MP4 with a JSON sidecar. With a dense
    comparison the two sit side by side (dense left). Existing files are refused unless `overwrite`."""
    path = Path(path)
    frames = (
        side_by_side(result.dense_frames, result.frames) if result.dense_frames is not None else result.frames
    )
    suffix = path.suffix.lower()
    if result.kind == "image" and suffix != ".png":
        raise ValueError(f"out={str(path)!r}: images are written as .png")
    if result.kind == "video" and suffix != ".mp4":
        raise ValueError(f"out={str(path)!r}: videos are written as .mp4")
    targets = [path] if result.kind == "image" else [path, path.with_suffix(".json")]
    existing = [str(t) for t in targets if t.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{', '.join(existing)} exists; pass --overwrite to replace it, or choose another --out"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    config = json.dumps(result.config, indent=2)
    from ..bench.report import write_atomically

    if result.kind == "image":
        from PIL import Image, PngImagePlugin

        info = PngImagePlugin.PngInfo()
        info.add_text("attnpack", config)
        write_atomically(
            path, lambda p: Image.fromarray(frames[0]).save(p, format="PNG", pnginfo=info), overwrite
        )
        return [path]
    write_atomically(path, lambda p: _write_mp4(p, frames, fps), overwrite)
    write_atomically(path.with_suffix(".json"), lambda p: p.write_text(config + "\n"), overwrite)
    return targets


def _write_mp4(path: Path, frames: list, fps: int) -> None:
    import cv2

    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write MP4 to {path}")
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
