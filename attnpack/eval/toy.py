"""Measured quality on the toy models: prompts from the procedural world that training never saw (seeds from
EVAL_SEED on), generated with the trained models, scored by finding the world's shapes with OpenCV
(`attnpack.eval.shapes`). The same scores of the world's own pictures of those prompts are the ceiling.

`measure_adherence` is what a model card records and the tests recompute; `toy_quality` runs every method
the toy models support (`attnpack eval --toy`) and `quality_tables` turns its result into the README's tables.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import numpy as np
import torch

from ..training.toy_models import TOY_GEOMETRY, TOY_METHODS
from ..training.world import PATHS, Sample, Thing, caption, parse_caption, pixels, sample
from .metrics import frame_difference, psnr, ssim, trajectory_adherence
from .shapes import main_object, mean_scores, object_finder, scene_adherence

EVAL_SEED = 1_000_000  # training uses seeds below the recipe's sample count
CHECK_PROMPTS = {"image": 24, "video": 6}  # what the model card records and the tests recompute
# Which way each path goes (dy, dx): arcs and bounces travel right.
PATH_DIRECTION = {
    "right": (0, 1),
    "left": (0, -1),
    "down": (1, 0),
    "up": (-1, 0),
    "arc": (0, 1),
    "bounce": (0, 1),
}
assert set(PATH_DIRECTION) == set(PATHS)
PSNR_CAP = 100.0  # identical outputs: PSNR is infinite; the tables show the cap


def eval_samples(kind: str, count: int, *, seed: int = EVAL_SEED, things: int | None = None,
                 frames: int | None = None) -> list[Sample]:  # fmt: skip
    """`count` held-out world samples; `things`: only samples with exactly that many objects; `frames`: videos
    of that length instead of the trained one."""
    geometry = TOY_GEOMETRY[kind]
    found, s = [], seed
    while len(found) < count:
        candidate = sample(s, size=geometry.size, frames=frames or geometry.frames, max_things=2)
        if things is None or len(candidate.things) == things:
            found.append(candidate)
        s += 1
    return found


def _as_uint8(array) -> np.ndarray:
    array = np.asarray(array)
    return array if array.dtype == np.uint8 else (np.clip(array, 0, 1) * 255).round().astype(np.uint8)


def generate_toy(pipe, kind: str, prompts: list[str], seeds: list[int], method=None, batch: int = 8,
                 **overrides: Any) -> list[np.ndarray]:  # fmt: skip
    """One output per prompt ((F, H, W, 3) uint8; F = 1 for images), each from its own seeded generator, so
    a prompt's output does not depend on what it is batched with. `method`: applied for the call."""
    from ..api import apply

    call = {**TOY_GEOMETRY[kind].call, **overrides}
    size = batch if kind == "image" else 1
    outputs = []
    with apply(pipe, method) if method is not None else contextlib.nullcontext():
        for first in range(0, len(prompts), size):
            chunk = prompts[first : first + size]
            generators = [torch.Generator().manual_seed(s) for s in seeds[first : first + len(chunk)]]
            out = pipe(prompt=chunk, generator=generators, output_type="np", **call)
            if kind == "image":
                outputs.extend(_as_uint8(image)[None] for image in out.images)
            else:
                outputs.extend(_as_uint8(video) for video in out.frames)
    return outputs


def video_adherence(frames: np.ndarray, text: str) -> dict[str, float]:
    """Per-frame scene adherence, averaged; `motion`: the share of captioned paths whose object's centre
    moved (first to last frame it is found in) more along the path's direction than across it."""
    scene = parse_caption(text)
    scores = mean_scores([scene_adherence(frame, scene) for frame in frames])
    moving = [thing for thing in scene.things if thing.path]
    if moving:
        right = 0
        for thing in moving:
            find = object_finder(thing.colour, thing.shape)
            boxes = [box for box in map(find, frames) if box is not None]
            if len(boxes) >= 2:
                (y1, y2, x1, x2), (v1, v2, u1, u2) = boxes[0], boxes[-1]
                dy, dx = (v1 + v2 - y1 - y2) / 2, (u1 + u2 - x1 - x2) / 2
                want_y, want_x = PATH_DIRECTION[thing.path]
                along = dy * want_y + dx * want_x
                right += along > 0.05 and along > abs(dy * want_x - dx * want_y)
        scores["motion"] = right / len(moving)
    return scores


def score_outputs(kind: str, outputs: list[np.ndarray], captions: list[str]) -> dict[str, float]:
    if kind == "image":
        return mean_scores([scene_adherence(o[0], c) for o, c in zip(outputs, captions, strict=True)])
    return mean_scores([video_adherence(o, c) for o, c in zip(outputs, captions, strict=True)])


def measure_adherence(pipe, kind: str, count: int | None = None, *, seed: int = EVAL_SEED, method=None,
                      **overrides: Any) -> dict[str, Any]:  # fmt: skip
    """Prompt adherence of `pipe` (a toy model) on `count` held-out world prompts; of the world's own pictures
    of the same prompts through the model's VAE and back (what its decoder can show); and of those pictures
    themselves (the detector's ceiling)."""
    count = count or CHECK_PROMPTS[kind]
    samples = eval_samples(kind, count, seed=seed)
    captions = [s.caption for s in samples]
    seeds = list(range(seed, seed + count))
    outputs = generate_toy(pipe, kind, captions, seeds, method=method, **overrides)
    return {
        "count": count,
        "seeds": [seed, seed + count - 1],
        "call": {**TOY_GEOMETRY[kind].call, **overrides},
        "adherence": score_outputs(kind, outputs, captions),
        "vae_round_trip": score_outputs(kind, [vae_round_trip(pipe, s.frames) for s in samples], captions),
        "ground_truth": score_outputs(kind, [s.frames for s in samples], captions),
    }


def vae_round_trip(pipe, frames: np.ndarray) -> np.ndarray:
    """A picture or video ((F, H, W, 3) uint8) through the pipeline's VAE and back: what its decoder can show."""
    x = pixels(frames)[None].to(pipe.device, pipe.vae.dtype)
    if x.shape[2] == 1 and type(pipe).__name__ == "FluxPipeline":
        x = x[:, :, 0]
    with torch.no_grad():
        out = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mode()).sample.float()
    out = out if out.ndim == 5 else out[:, :, None]
    return ((out[0].permute(1, 2, 3, 0).clamp(-1, 1) + 1) * 127.5).round().byte().cpu().numpy()


def fidelity(outputs: list[np.ndarray], dense: list[np.ndarray]) -> dict[str, float]:
    """PSNR (capped at PSNR_CAP for identical outputs) and SSIM against the dense outputs, means."""
    return {
        "psnr": float(np.mean([min(psnr(a, b), PSNR_CAP) for a, b in zip(outputs, dense, strict=True)])),
        "ssim": float(np.mean([ssim(a, b) for a, b in zip(outputs, dense, strict=True)])),
    }


def _method(name: str, kind: str, **extra: Any):
    from ..methods import make_method

    return make_method(name, **{**TOY_METHODS[kind][name], **extra})


class _Timer:
    def __init__(self):
        self.seconds = 0.0

    @contextlib.contextmanager
    def __call__(self):
        start = time.perf_counter()
        yield
        self.seconds += time.perf_counter() - start


def _row(model: str, task: str, method: str, measures: dict, seconds: float | None = None, **extra) -> dict:
    row = {"model": model, "task": task, "method": method, "measures": measures, **extra}
    if seconds is not None:
        row["seconds_per_output"] = round(seconds, 3)
    return row


# ---- the suites


ADHERENCE_METHODS = {
    "image": ("dense", "clear", "pooled_agent"),
    "video": ("dense", "radial", "pooled_agent"),
}


def adherence_suite(pipe, kind: str, count: int, seed: int = EVAL_SEED) -> tuple[list[dict], dict[str, list]]:
    """Prompt adherence (videos: per frame, motion and flicker) and fidelity to dense of the methods that
    approximate dense attention, at the trained size; the world's pictures and their VAE round trip beside."""
    model = f"toy-{kind}"
    samples = eval_samples(kind, count, seed=seed)
    captions, seeds = [s.caption for s in samples], list(range(seed, seed + count))
    truth = [s.frames for s in samples]
    rows = [
        _row(model, "adherence", f"world {'pictures' if kind == 'image' else 'videos'}",
             score_outputs(kind, truth, captions)),
        _row(model, "adherence", "VAE round trip",
             score_outputs(kind, [vae_round_trip(pipe, t) for t in truth], captions)),
    ]  # fmt: skip
    outputs: dict[str, list] = {}
    for name in ADHERENCE_METHODS[kind]:
        timer = _Timer()
        with timer():
            method = None if name == "dense" else _method(name, kind)
            outputs[name] = generate_toy(pipe, kind, captions, seeds, method=method)
        measures = score_outputs(kind, outputs[name], captions)
        if kind == "video":
            measures["flicker"] = float(np.mean([frame_difference(o) for o in outputs[name]]))
        if name != "dense":
            measures |= fidelity(outputs[name], outputs["dense"])
        rows.append(_row(model, "adherence", name, measures, timer.seconds / count,
                         settings=TOY_METHODS[kind][name]))  # fmt: skip
    return rows, outputs


SUBJECT_BOXES = ([0.04, 0.2, 0.48, 0.8], [0.52, 0.2, 0.96, 0.8])  # [x0, y0, x1, y1]: left and right halves


def subject_scenes(count: int, seed: int = EVAL_SEED) -> list[tuple[list[dict], str, list[Thing]]]:
    """Scenes of two subjects of different shapes: (subjects with their prompts and boxes, scene prompt, things)."""
    scenes = []
    for s in eval_samples("image", 4 * count, seed=seed, things=2):
        first, second = s.things
        if first.shape == second.shape:
            continue  # the subject's name is its shape word: it must be one of a kind in the scene prompt
        subjects = [
            {"name": t.shape, "prompt": caption([t], s.background, s.textured, video=False), "box": box}
            for t, box in zip(s.things, SUBJECT_BOXES, strict=True)
        ]
        scenes.append((subjects, s.caption, list(s.things)))
        if len(scenes) == count:
            break
    return scenes


def subject_scores(references: list[np.ndarray], scene: np.ndarray, subjects: list[dict],
                   things: list[Thing]) -> dict[str, float]:  # fmt: skip
    """Per subject: `consistent`: the object in its box has the reference's colour and shape; `as_prompted`:
    the object in its box is the one its prompt names; `in_box`: the named object is found in the scene with
    its centre inside the box."""
    consistent = as_prompted = in_box = 0
    for reference, subject, thing in zip(references, subjects, things, strict=True):
        x0, y0, x1, y1 = subject["box"]
        box = (y0, y1, x0, x1)
        ref, here = main_object(reference), main_object(scene, box)
        consistent += bool(ref and here and (ref.colour, ref.shape) == (here.colour, here.shape))
        as_prompted += bool(here and (here.colour, here.shape) == (thing.colour, thing.shape))
        found = object_finder(thing.colour, thing.shape)(scene)
        if found is not None:
            cy, cx = (found[0] + found[1]) / 2, (found[2] + found[3]) / 2
            in_box += y0 <= cy <= y1 and x0 <= cx <= x1
    n = len(subjects)
    return {"consistent": consistent / n, "as_prompted": as_prompted / n, "in_box": in_box / n}


def subjects_suite(pipe, count: int, seed: int = EVAL_SEED) -> tuple[list[dict], dict[str, list]]:
    """IR-Diffusion's isolation + reposition attention against plain generation of the same prompts."""
    from ..pipelines import multi_subject

    call = {k: v for k, v in TOY_GEOMETRY["image"].call.items()}
    scenes = subject_scenes(count, seed)
    plain, isolated, sheets = [], [], []
    timers = {"dense": _Timer(), "isolation": _Timer()}
    for i, (subjects, scene, things) in enumerate(scenes):
        with timers["dense"]():
            refs = generate_toy(pipe, "image", [s["prompt"] for s in subjects], [seed + i] * len(subjects))
            (alone,) = generate_toy(pipe, "image", [scene], [seed + i])
        plain.append(subject_scores([r[0] for r in refs], alone[0], subjects, things))
        with timers["isolation"]():
            out = multi_subject(pipe, subjects, scene, generator=torch.Generator().manual_seed(seed + i),
                                method=TOY_METHODS["image"]["isolation"], **call)  # fmt: skip
        references = [np.asarray(r.convert("RGB")) for r in out.references]
        isolated.append(subject_scores(references, np.asarray(out.image.convert("RGB")), subjects, things))
        sheets.append(np.asarray(out.sheet.convert("RGB")))
    rows = [
        _row("toy-image", "several subjects", "dense", mean_scores(plain), timers["dense"].seconds / count),
        _row("toy-image", "several subjects", "isolation", mean_scores(isolated),
             timers["isolation"].seconds / count, settings=TOY_METHODS["image"]["isolation"]),
    ]  # fmt: skip
    return rows, {"isolation": sheets}


def long_video_suite(pipe, count: int, lengths=(33, 65), seed: int = EVAL_SEED) -> tuple[list[dict], dict]:
    """2x and 4x the trained length: plain generation against FreeNoise and FreeLong windows, beside world
    videos of that length and their VAE round trip (what the VAE can show past the length it was trained on).
    `identity`: the share of frames in which each captioned object is found with its colour and shape."""
    from ..pipelines import long_video

    def measures(videos, captions):
        scores = mean_scores([video_adherence(v, c) for v, c in zip(videos, captions, strict=True)])
        return {"identity": scores["shape"], "exact": scores["exact"], "background": scores["background"],
                "flicker": float(np.mean([frame_difference(v) for v in videos]))}  # fmt: skip

    call = {k: v for k, v in TOY_GEOMETRY["video"].call.items() if k != "num_frames"}
    samples = eval_samples("video", count, seed=seed)
    captions = [s.caption for s in samples]
    rows, outputs = [], {}
    for frames in lengths:
        world = eval_samples("video", count, seed=seed, frames=frames)
        truth, truth_captions = [w.frames for w in world], [w.caption for w in world]
        rows += [
            _row("toy-video", "long video", "world videos", measures(truth, truth_captions), frames=frames),
            _row("toy-video", "long video", "VAE round trip",
                 measures([vae_round_trip(pipe, t) for t in truth], truth_captions), frames=frames),
        ]  # fmt: skip
        for name in ("dense", "freenoise", "freelong"):
            timer, videos = _Timer(), []
            for i, s in enumerate(samples):
                generator = torch.Generator().manual_seed(seed + i)
                with timer():
                    if name == "dense":
                        out = pipe(
                            prompt=s.caption, num_frames=frames, generator=generator, output_type="np", **call
                        )
                    else:
                        out = long_video(pipe, s.caption, num_frames=frames, method=_method(name, "video"),
                                         generator=generator, output_type="np", **call)  # fmt: skip
                videos.append(_as_uint8(out.frames[0]))
            settings = TOY_METHODS["video"][name] if name != "dense" else {}
            rows.append(_row("toy-video", "long video", name, measures(videos, captions), timer.seconds / count,
                             frames=frames, settings=settings))  # fmt: skip
            outputs[f"{name}-{frames}"] = videos
    return rows, outputs


TRAJECTORIES = (  # keyframes [frame, y1, y2, x1, x2] for a large shape (0.32 of the side) over 17 frames
    [[0, 0.34, 0.66, 0.02, 0.34], [16, 0.34, 0.66, 0.66, 0.98]],  # left to right
    [[0, 0.02, 0.34, 0.34, 0.66], [16, 0.66, 0.98, 0.34, 0.66]],  # top to bottom
    [[0, 0.02, 0.34, 0.02, 0.34], [16, 0.66, 0.98, 0.66, 0.98]],  # diagonal
)


def trajectory_suite(pipe, count: int, seed: int = EVAL_SEED) -> tuple[list[dict], dict]:
    """DiTraj: a large shape told where to go, against plain generation of the same prompt. Centroid distance
    (image widths) and mIoU between the requested box and the shape found in each frame."""
    from ..methods.trajectory import box_at, parse_trajectory
    from ..pipelines import trajectory_video

    call = dict(TOY_GEOMETRY["video"].call)
    frames = call["num_frames"]
    rows, outputs = [], {}
    cases = []
    for i, s in enumerate(eval_samples("video", count, seed=seed, things=1)):
        thing = Thing(s.things[0].shape, s.things[0].colour, "large")
        prompt = caption([thing], s.background, s.textured, video=False)  # no motion words: the path decides
        keyframes = TRAJECTORIES[i % len(TRAJECTORIES)]
        cases.append((prompt, thing, keyframes, seed + i))
    for name in ("dense", "trajectory"):
        timer, scores, videos = _Timer(), [], []
        for prompt, thing, keyframes, s in cases:
            generator = torch.Generator().manual_seed(s)
            with timer():
                if name == "dense":
                    video = pipe(prompt=prompt, generator=generator, output_type="np", **call).frames[0]
                else:
                    video = trajectory_video(pipe, prompt=prompt, trajectory=keyframes, generator=generator,
                                             output_type="np", **TOY_METHODS["video"]["trajectory"], **call).frames[0]  # fmt: skip
            video = _as_uint8(video)
            videos.append(video)
            requested = [box_at(parse_trajectory(keyframes), f) for f in range(frames)]
            scores.append(trajectory_adherence(video, requested, object_finder(thing.colour, thing.shape)))
        measures = mean_scores(scores)
        rows.append(_row("toy-video", "trajectory", name, measures, timer.seconds / count,
                         settings=TOY_METHODS["video"][name] if name != "dense" else {}))  # fmt: skip
        outputs[name] = videos
    return rows, outputs


def toy_quality(image_pipe=None, video_pipe=None, *, prompts: int = 32, subjects: int = 12, videos: int = 12,
                long_videos: int = 6, trajectories: int = 9, seed: int = EVAL_SEED) -> tuple[dict, dict]:  # fmt: skip
    """Every suite on the toy models given, else on the shipped ones: (result, outputs by suite). A model that
    is neither given nor shipped is left out, with the reason in result["not_measured"]."""
    from tqdm.auto import tqdm

    from ..bench.report import result_header
    from ..environment import device_info
    from ..training.toy_models import load_toy

    pipes, missing, not_measured = {"image": image_pipe, "video": video_pipe}, {}, {}
    for kind in pipes:
        if pipes[kind] is None:
            try:
                pipes[kind] = load_toy(kind)
            except FileNotFoundError as error:
                missing[kind] = str(error)
                not_measured[f"toy-{kind}"] = f"not shipped: `attnpack train toy-{kind}` trains it"
    if len(missing) == len(pipes):
        raise FileNotFoundError("; ".join(missing.values()))
    for pipe in pipes.values():
        if pipe is not None:
            pipe.set_progress_bar_config(disable=True)
    image_pipe, video_pipe = pipes["image"], pipes["video"]
    suites = []
    if image_pipe is not None:
        suites += [("image", lambda: adherence_suite(image_pipe, "image", prompts, seed)),
                   ("subjects", lambda: subjects_suite(image_pipe, subjects, seed))]  # fmt: skip
    if video_pipe is not None:
        suites += [("video", lambda: adherence_suite(video_pipe, "video", videos, seed)),
                   ("long video", lambda: long_video_suite(video_pipe, long_videos, seed=seed)),
                   ("trajectory", lambda: trajectory_suite(video_pipe, trajectories, seed))]  # fmt: skip
    rows, outputs = [], {}
    for name, run in tqdm(suites, desc="toy quality", unit="suite"):
        suite_rows, suite_outputs = run()
        rows.extend(suite_rows)
        outputs[name] = suite_outputs
    device = (image_pipe or video_pipe).device
    result = result_header("toy-quality", device_info(device), torch.float32, {"seed": seed},
                           ["held-out world prompts; figures from OpenCV shape detection (attnpack.eval.shapes)"])  # fmt: skip
    result["counts"] = {"prompts": prompts, "subjects": subjects, "videos": videos, "long_videos": long_videos,
                        "trajectories": trajectories}  # fmt: skip
    result["rows"] = rows
    if not_measured:
        result["not_measured"] = not_measured
    return result, outputs


# ---- tables and pictures


def _cell(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}"


def _table(title: str, columns: list[str], rows: list[list[str]]) -> list[str]:
    if not rows:  # a suite that did not run
        return []
    return [title, "", "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns),
            *("| " + " | ".join(row) + " |" for row in rows), ""]  # fmt: skip


def quality_tables(result: dict) -> str:
    """The README's tables (markdown) from a `toy_quality` result."""
    rows = result["rows"]
    pick = lambda model, task: [r for r in rows if r["model"] == model and r["task"] == task]  # noqa: E731
    seconds = lambda r: _cell(r.get("seconds_per_output"))  # noqa: E731
    trained = TOY_GEOMETRY["video"].frames
    adherence = [
        [model, r["method"], *(_cell(r["measures"].get(k)) for k in ("colour", "shape", "exact", "motion")),
         _cell(r["measures"].get("psnr"), 1), _cell(r["measures"].get("ssim")), seconds(r)]
        for model in ("toy-image", "toy-video") for r in pick(model, "adherence")
    ]  # fmt: skip
    subjects = [
        [r["method"], *(_cell(r["measures"][k]) for k in ("consistent", "as_prompted", "in_box")), seconds(r)]
        for r in pick("toy-image", "several subjects")
    ]
    long = [
        [f"{r['frames']} ({r['frames'] / trained:.0f}x)", r["method"],
         *(_cell(r["measures"][k]) for k in ("identity", "exact", "background")),
         _cell(r["measures"]["flicker"], 1), seconds(r)]
        for r in pick("toy-video", "long video")
    ]  # fmt: skip
    trajectory = [
        [r["method"], _cell(r["measures"]["centroid_distance"], 3), _cell(r["measures"]["miou"]),
         _cell(r["measures"]["found"]), seconds(r)]
        for r in pick("toy-video", "trajectory")
    ]  # fmt: skip
    lines = [
        *_table("**Prompt adherence and fidelity to dense** (share of captioned objects found with their colour "
                "/ colour and shape; `exact`: every object and the background right; motion: captioned paths "
                "followed; PSNR / SSIM against dense, same seeds)",
                ["model", "method", "colour", "shape", "exact", "motion", "PSNR dB", "SSIM", "s / output"],
                adherence),
        *_table("**Several subjects** (toy-image, two subjects in the left and right halves; per subject: the "
                "object in its box has its reference's colour and shape / is the one its prompt names / the "
                "named object's centre is inside its box)",
                ["method", "consistent", "as prompted", "in box", "s / scene"], subjects),
        *_table(f"**Long videos** (toy-video, trained on {trained} frames; `identity`: share of frames showing "
                "each captioned object with its colour and shape; flicker: mean absolute frame difference, 0-255)",
                ["frames", "method", "identity", "exact", "background", "flicker", "s / video"], long),
        *_table("**Trajectory control** (toy-video, a large shape sent left to right, top to bottom or "
                "diagonally; centroid distance in image widths, lower is better; mIoU with the requested "
                "boxes; found: frames where the shape is found)",
                ["method", "centroid distance", "mIoU", "found", "s / video"], trajectory),
    ]  # fmt: skip
    lines += [f"Not measured: {model} ({why})." for model, why in result.get("not_measured", {}).items()]
    return "\n".join(lines)


def contact_sheet(outputs: dict, columns: int = 6) -> np.ndarray:
    """A labelled picture of what the suites made: per image / video method its first `columns` outputs
    (the middle frame of videos); per trajectory and long-video method `columns` frames of its first video."""
    from PIL import Image, ImageDraw

    rows = []
    for suite in ("image", "video"):
        for name, items in outputs.get(suite, {}).items():
            rows.append((f"{suite}: {name}", [o[len(o) // 2] for o in items[:columns]]))
    for suite in ("trajectory", "long video"):
        for name, items in outputs.get(suite, {}).items():
            video = items[0]
            picks = np.linspace(0, len(video) - 1, columns).round().astype(int)
            rows.append((f"{suite}: {name}, frames", [video[i] for i in picks]))
    label_width, side = 170, TOY_GEOMETRY["image"].size
    sheet = Image.new("RGB", (label_width + columns * side, len(rows) * side), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (label, tiles) in enumerate(rows):
        for j, tile in enumerate(tiles):
            sheet.paste(Image.fromarray(tile), (label_width + j * side, i * side))
        draw.text((4, i * side + side // 2 - 6), label, fill="black")
    return np.asarray(sheet)


def write_quality(result: dict, outputs: dict, out, *, overwrite: bool = False) -> list:
    """toy-quality-<device>.json, .md (the tables) and .png (a contact sheet) in folder `out`."""
    import json
    from pathlib import Path

    from PIL import Image

    from ..bench.report import write_atomically
    from ..environment import device_slug

    stem = Path(out) / f"toy-quality-{device_slug(result['device'])}"
    paths = [stem.with_suffix(".json"), stem.with_suffix(".md"), stem.with_suffix(".png")]
    existing = [str(p) for p in paths if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{', '.join(existing)} exists; pass --overwrite to replace it, or choose another --out")  # fmt: skip
    write_atomically(paths[0], lambda p: p.write_text(json.dumps(result, indent=1) + "\n"), overwrite)
    write_atomically(paths[1], lambda p: p.write_text(quality_tables(result)), overwrite)
    sheet = contact_sheet(outputs)
    write_atomically(paths[2], lambda p: Image.fromarray(sheet).save(p, format="PNG"), overwrite)
    return paths


__all__ = [
    "CHECK_PROMPTS",
    "EVAL_SEED",
    "adherence_suite",
    "contact_sheet",
    "eval_samples",
    "fidelity",
    "generate_toy",
    "long_video_suite",
    "measure_adherence",
    "quality_tables",
    "subjects_suite",
    "toy_quality",
    "trajectory_suite",
    "video_adherence",
    "write_quality",
]
