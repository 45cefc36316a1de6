"""Evaluation runs: score outputs listed in a manifest, or generate dense and with a method for each prompt x
seed and score them; write JSON and an HTML report (tables, plots, thumbnails)."""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from . import metrics


def read_output(path: str | Path) -> np.ndarray:
    """An image (PNG / JPEG) as (1, H, W, 3) or a video (MP4 / WebM / GIF) as (F, H, W, 3), uint8 RGB."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"output {str(path)!r} does not exist")
    if path.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"):
        from PIL import Image

        return np.asarray(Image.open(path).convert("RGB"))[None]
    import cv2

    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    if not frames:
        raise ValueError(f"output {str(path)!r} could not be read as a video")
    return np.stack(frames)


SET_METRICS = ("fid", "kid", "fvd")


def score(frames: np.ndarray, *, dense: np.ndarray | None = None, prompt: str | None = None,
          clip_model: str | None = None, dino_model: str | None = None, trajectory: list | None = None,
          finder=None, subjects: list | None = None, lpips_net=None) -> dict[str, Any]:  # fmt: skip
    """Every metric that applies. Models are used only when their ids are given (`lpips_net`: "alex", "vgg",
    "squeeze" or a network, see `metrics.lpips`). PSNR is capped at PSNR_CAP (100 dB) so that identical
    outputs count, as SSIM 1 does, in the summaries."""
    result: dict[str, Any] = {"frames": len(frames)}
    if dense is not None:
        result.update(
            psnr=metrics.psnr(frames, dense, cap=metrics.PSNR_CAP), ssim=metrics.ssim(frames, dense)
        )
        if lpips_net is not None:
            result["lpips"] = metrics.lpips(frames, dense, lpips_net)
    if clip_model and prompt:
        result["clip_score"] = metrics.clip_score(list(frames), prompt, clip_model)
    if len(frames) > 1:
        result.update(temporal_flickering=metrics.temporal_flickering(frames),
                      dynamic_degree=metrics.dynamic_degree(frames))  # fmt: skip
        if len(frames) > 2:
            result["motion_smoothness"] = metrics.motion_smoothness(frames)
        if dino_model:
            result["subject_consistency"] = metrics.subject_consistency(frames, dino_model)
    if trajectory is not None:
        from ..methods.trajectory import box_at, parse_trajectory

        keys = parse_trajectory(trajectory)
        last = keys[-1][0]
        boxes = [box_at(keys, i * last / max(len(frames) - 1, 1)) for i in range(len(frames))]
        result["trajectory"] = metrics.trajectory_adherence(frames, boxes, finder)
    if subjects and dino_model:
        from .. import Subject

        listed = [Subject.of({k: v for k, v in s.items() if k != "reference"}) for s in subjects]
        boxes = [
            (s.box[1], s.box[3], s.box[0], s.box[2]) for s in listed
        ]  # (x0, y0, x1, y1) -> (y1, y2, x1, x2)
        references = [read_output(s["reference"])[0] for s in subjects]
        result["subject_similarity"] = metrics.subject_similarity(frames[0], references, boxes, dino_model)
    return result


def score_sets(outputs: dict[str, list], dense: dict[str, list], names=SET_METRICS, *, image_features=None,
               video_features=None) -> list[dict]:  # fmt: skip
    """Distances between each method's outputs and the dense outputs of the same prompts and seeds: one row per
    method, {"method", "outputs", "reference": "dense", "metrics": {"fid", "kid": {"mean", "std"}, "fvd"}}.
    `image_features` / `video_features`: feature networks in place of Inception / I3D (see `metrics.fid`,
    `metrics.fvd`); FVD applies to videos only."""
    unknown = [n for n in names if n not in SET_METRICS]
    if unknown:
        raise ValueError(f"set metrics {unknown} are not among {list(SET_METRICS)}")
    rows = []
    for method, frames in outputs.items():
        reference = dense.get(method, [])
        if len(reference) != len(frames):
            raise ValueError(
                f"method {method!r}: {len(frames)} outputs but {len(reference)} with a dense output; FID / KID / FVD "
                "compare a method's outputs with the dense ones, so every entry needs 'dense'"
            )
        scores: dict[str, Any] = {}
        if "fid" in names:
            scores["fid"] = metrics.fid(frames, reference, image_features)
        if "kid" in names:
            scores["kid"] = metrics.kid(frames, reference, image_features)
        if "fvd" in names:
            if any(len(f) < 2 for f in frames):
                raise ValueError(f"method {method!r}: FVD scores videos, and some outputs are images")
            scores["fvd"] = metrics.fvd(frames, reference, video_features)
        rows.append({"method": method, "outputs": len(frames), "reference": "dense", "metrics": scores})
    return rows


def evaluate_manifest(manifest: str | Path, *, clip_model=None, dino_model=None, lpips_net=None, sets=(),
                      image_features=None, video_features=None) -> list[dict]:  # fmt: skip
    """Score each entry of a manifest: a JSON list of {"output", "dense"?, "prompt"?, "method"?, "seed"?,
    "trajectory"?, "colour"? (for the built-in box finder), "subjects"? (with "reference" image paths)};
    paths relative to the manifest. `sets` ("fid", "kid", "fvd") adds one row per method (`score_sets`)."""
    path = Path(manifest)
    if path.is_dir():
        path = path / "manifest.json"
    try:
        entries = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"manifest {str(path)!r} cannot be read as JSON: {error}") from error
    if not isinstance(entries, list):
        raise ValueError(f"manifest {str(path)!r} must hold a list of entries")
    root, rows = path.parent, []
    outputs: dict[str, list] = {}
    denses: dict[str, list] = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "output" not in entry:
            raise ValueError(f"manifest entry {i} must be an object with an 'output' path")
        frames = read_output(root / entry["output"])
        dense = read_output(root / entry["dense"]) if entry.get("dense") else None
        finder = metrics.colour_box_finder(entry["colour"]) if entry.get("colour") else None
        if entry.get("trajectory") is not None and finder is None:
            raise ValueError(f"manifest entry {i}: a trajectory needs 'colour' for the built-in box finder")
        subjects = [dict(s, reference=str(root / s["reference"])) for s in entry.get("subjects", [])] or None
        scores = score(frames, dense=dense, prompt=entry.get("prompt"), clip_model=clip_model, dino_model=dino_model,
                       trajectory=entry.get("trajectory"), finder=finder, subjects=subjects,
                       lpips_net=lpips_net)  # fmt: skip
        rows.append({**{k: entry[k] for k in ("output", "dense", "prompt", "method", "seed") if k in entry},
                     "metrics": scores, "thumbnail": _thumbnail(frames[0])})  # fmt: skip
        if sets:
            outputs.setdefault(entry.get("method", "output"), []).append(frames)
            if dense is not None:
                denses.setdefault(entry.get("method", "output"), []).append(dense)
    if sets:
        rows += score_sets(
            outputs, denses, sets, image_features=image_features, video_features=video_features
        )
    return rows


def run_batch(prompts: list[str], *, preset: str, method: str, params: dict | None = None, seeds=(0,),
              out: str | Path, clip_model=None, dino_model=None, overwrite: bool = False, lpips_net=None,
              sets=(), image_features=None, video_features=None) -> list[dict]:  # fmt: skip
    """Generate dense and with the method for each prompt x seed (one pipeline), score, write files; `sets`
    ("fid", "kid", "fvd") adds the method's row of distances to the dense outputs (`score_sets`)."""
    from ..pipelines import generate, load_preset, save

    out = Path(out)
    pipe = load_preset(preset)
    rows, outputs, denses = [], [], []
    for p, prompt in enumerate(prompts):
        for seed in seeds:
            result = generate(
                preset, prompt, method=method, params=params, seed=seed, compare_dense=True, pipe=pipe
            )
            suffix = ".png" if result.kind == "image" else ".mp4"
            name = f"p{p:03d}-s{seed}"
            saved = save(_alone(result, result.frames), out / f"{name}-{method}{suffix}", overwrite=overwrite)
            save(_alone(result, result.dense_frames), out / f"{name}-dense{suffix}", overwrite=overwrite)
            frames, dense = np.stack(result.frames), np.stack(result.dense_frames)
            scores = score(frames, dense=dense, prompt=prompt, clip_model=clip_model, dino_model=dino_model,
                           lpips_net=lpips_net)  # fmt: skip
            scores.update(seconds=result.seconds, dense_seconds=result.dense_seconds, speedup=result.speedup)
            rows.append({"prompt": prompt, "seed": seed, "method": method, "output": saved[0].name,
                         "metrics": scores, "thumbnail": _thumbnail(frames[0])})  # fmt: skip
            outputs.append(frames)
            denses.append(dense)
    if sets:
        rows += score_sets({method: outputs}, {method: denses}, sets, image_features=image_features,
                           video_features=video_features)  # fmt: skip
    return rows


def _alone(result, frames):
    from dataclasses import replace

    return replace(result, frames=frames, dense_frames=None)


def write_report(
    rows: list[dict], out: str | Path, *, title: str = "attnpack evaluation", overwrite: bool = False
) -> list[Path]:
    """report.json and report.html (summary by method, a table per output with thumbnails, the set distances
    per method, a plot). The summary is the mean of each finite number per method: PSNR arrives capped at
    PSNR_CAP, so identical outputs count (as SSIM 1 does); a NaN (nothing found) is left out."""
    from ..bench.report import write_atomically

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = [{k: v for k, v in row.items() if k != "thumbnail"} for row in rows]
    summary = _summary(data)
    json_path, html_path = out / "report.json", out / "report.html"
    write_atomically(
        json_path,
        lambda p: p.write_text(
            json.dumps({"summary": summary, "outputs": data}, indent=2, default=_number) + "\n"
        ),
        overwrite,
    )
    write_atomically(html_path, lambda p: p.write_text(_html(title, summary, rows)), overwrite)
    return [json_path, html_path]


def _summary(rows: list[dict]) -> dict[str, dict[str, float]]:
    by_method: dict[str, dict[str, list]] = {}
    for row in rows:
        bucket = by_method.setdefault(row.get("method", "output"), {})
        for name, value in _flat(row["metrics"]).items():
            if isinstance(value, int | float) and math.isfinite(value):
                bucket.setdefault(name, []).append(value)
    return {m: {k: float(np.mean(v)) for k, v in values.items()} for m, values in by_method.items()}


def _flat(values: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        elif isinstance(value, list):
            out.update({f"{prefix}{key}.{i}": v for i, v in enumerate(value)})
        else:
            out[f"{prefix}{key}"] = value
    return out


def _number(value):
    return str(value)


def _thumbnail(frame: np.ndarray, side: int = 160) -> str:
    from PIL import Image

    image = Image.fromarray(np.asarray(frame))
    scale = side / max(image.size)
    image = image.resize(
        (max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.NEAREST
    )
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _plot(summary: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [
        n
        for n in ("psnr", "ssim", "lpips", "clip_score", "temporal_flickering", "fid", "fvd", "speedup")
        if any(n in v for v in summary.values())
    ]
    figure, axes = plt.subplots(1, max(1, len(names)), figsize=(3 * max(1, len(names)), 2.6))
    axes = np.atleast_1d(axes)
    for axis, name in zip(axes, names, strict=False):
        methods = [m for m in summary if name in summary[m]]
        axis.bar(methods, [summary[m][name] for m in methods], color="#4c72b0")
        axis.set_title(name, fontsize=9)
        axis.tick_params(labelsize=7)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode()


def _html(title: str, summary: dict, rows: list[dict]) -> str:
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))  # noqa: E731
    names = sorted({k for values in summary.values() for k in values})
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    summary_rows = "".join(
        f"<tr><td>{html.escape(m)}</td>"
        + "".join(f"<td>{cell(v[n]) if n in v else ''}</td>" for n in names)
        + "</tr>"
        for m, v in summary.items()
    )
    outputs, sets = [], []
    for row in rows:
        if "thumbnail" not in row:  # a method's set distances (score_sets)
            values = " ".join(f"{html.escape(k)} {cell(v)}" for k, v in _flat(row["metrics"]).items())
            sets.append(f"<tr><td>{html.escape(str(row.get('method')))}</td><td>{row.get('outputs')}</td>"
                        f"<td>{values}</td></tr>")  # fmt: skip
            continue
        flat = _flat(row["metrics"])
        details = "".join(f"<tr><td>{html.escape(k)}</td><td>{cell(v)}</td></tr>" for k, v in flat.items())
        label = " · ".join(
            html.escape(str(row[k])) for k in ("method", "prompt", "seed", "output") if k in row
        )
        outputs.append(
            f'<div class="out"><img src="data:image/png;base64,{row["thumbnail"]}"><p>{label}</p><table>{details}</table></div>'
        )
    sets_table = (
        "<h2>Distances to the dense outputs (per method)</h2><table><tr><th>method</th><th>outputs</th>"
        f"<th>FID / KID / FVD</th></tr>{''.join(sets)}</table>"
        if sets
        else ""
    )
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:24px}}table{{border-collapse:collapse;font-size:13px}}td,th{{border:1px solid #ccc;padding:3px 6px}}
.out{{display:inline-block;vertical-align:top;margin:8px;width:300px}}.out img{{image-rendering:pixelated;max-width:160px}}</style></head>
<body><h1>{html.escape(title)}</h1><h2>Summary (mean per method)</h2><table><tr><th>method</th>{head}</tr>{summary_rows}</table>
{sets_table}<img src="data:image/png;base64,{_plot(summary)}"><h2>Outputs</h2>{"".join(outputs)}</body></html>
"""
