"""attnpack.app: the Gradio web app. `make app` (or `python -m attnpack.app`) serves it on 127.0.0.1:7860.

Five tabs (image, video, long video, several subjects, trajectory), each with a preset, a method and its
settings, a prompt, "compare with dense", a progress bar and a cancel button, the output, the active sparsity
pattern where the method has one, and "export workflow". It opens on the toy presets (small models trained
on attnpack's procedural world of coloured shapes, offline) where they are shipped, else on the tiny
random-weight ones.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import threading
from typing import Any

import numpy as np

from ..methods import METHODS
from ..pipelines import PRESETS, Cancelled, ModelUnavailable, generate, load_preset
from ..pipelines.presets import TOY_NOTE
from ..pipelines.tiny import RANDOM_WEIGHTS_NOTE
from ..training.toy_models import toy_shipped

# The video tabs open on the toy video model where this checkout ships it, else on random-weight ones.
VIDEO_SHIPPED = toy_shipped("video")
VIDEO_DEFAULT = "toy-video" if VIDEO_SHIPPED else "tiny-wan-t2v"

TABS = {
    "Image": {
        "kinds": ("image",),
        "methods": ("clear", "agent", "pooled_agent", "dense"),
        "default": "toy-image",
    },
    "Video": {"kinds": ("video",), "methods": ("radial", "pooled_agent", "dense"), "default": VIDEO_DEFAULT},
    "Long video": {
        "kinds": ("video",),
        "methods": ("freenoise", "freelong"),
        "default": "toy-video" if VIDEO_SHIPPED else "tiny-animatediff",
    },
    "Several subjects": {"kinds": ("image",), "methods": ("isolation",), "default": "toy-image"},
    "Trajectory": {"kinds": ("video",), "methods": ("trajectory",), "default": VIDEO_DEFAULT},
}
SUBJECTS = [
    ["star", "a large red star over a plain grey background", 0.04, 0.2, 0.48, 0.8],
    ["circle", "a large blue circle over a plain grey background", 0.52, 0.2, 0.96, 0.8],
]
_LAST_FRAME = PRESETS[VIDEO_DEFAULT].call.get("num_frames", 9) - 1
TRAJECTORY = [[0, 0.34, 0.66, 0.02, 0.34], [_LAST_FRAME, 0.34, 0.66, 0.66, 0.98]]  # left to right


def presets_for(tab: str) -> list[str]:
    spec = TABS[tab]
    return [
        n
        for n, p in PRESETS.items()
        if p.kind in spec["kinds"] and any(m in p.methods for m in spec["methods"])
    ]


def methods_for(tab: str, preset: str) -> list[str]:
    return [m for m in TABS[tab]["methods"] if m in PRESETS[preset].methods]


def default_settings(preset: str, method: str) -> str:
    """The method's settings as JSON: the preset's recommendation over the method's defaults."""
    cls = METHODS[method]
    defaults = {}
    for f in dataclasses.fields(cls):
        if f.name in ("subjects", "trajectory", "points", "fg_prompt", "bg_prompt"):
            continue  # edited in their own tables
        value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        defaults[f.name] = value
    return json.dumps({**defaults, **PRESETS[preset].settings(method)}, indent=1, default=str)


def method_help(method: str) -> str:
    cls = METHODS[method]
    paragraph = (cls.__doc__ or "").strip().split("\n\n")[0]
    return f"**{cls.__name__}**: {' '.join(line.strip() for line in paragraph.splitlines())}"


class Session:
    """Loaded pipelines (kept between runs) and the cancel flag of the run in progress."""

    def __init__(self):
        self.pipes: dict[str, Any] = {}
        self.lock = threading.Lock()
        self.cancel = threading.Event()
        self.last_frames: dict[str, list] = {}  # per tab: the frames of the last output

    def pipe(self, preset: str):
        if preset not in self.pipes:
            self.pipes[preset] = load_preset(preset)
        return self.pipes[preset]


def friendly(error: BaseException) -> str:
    """What the UI says instead of a stack trace."""
    import torch

    if isinstance(error, torch.OutOfMemoryError):
        return "Out of GPU memory: lower the size, frames or steps, or use a smaller preset."
    if isinstance(error, ModelUnavailable):
        return f"Weights unavailable: {error}"
    if isinstance(error, Cancelled):
        return "Cancelled."
    if isinstance(error, (ValueError, TypeError, FileExistsError)):
        return f"Invalid settings: {error}"
    if isinstance(error, OSError):
        return f"No network or file access: {error}"
    return f"Unexpected error ({type(error).__name__}): {error}"


def workflow_for(
    tab, preset, method, settings, prompt, seed, steps, compare, frames=None, extra=None
) -> dict:
    """The current settings as an API-format workflow."""
    from ..workflow import _node_name

    generate_node = (
        "attnpack.CompareWithDense"
        if compare
        else ("attnpack.GenerateVideo" if PRESETS[preset].kind == "video" else "attnpack.GenerateImage")
    )
    inputs = {"pipeline": ["2", 0], "prompt": prompt, "seed": int(seed), "steps": int(steps)}
    if frames is not None and PRESETS[preset].kind == "video":
        inputs["frames"] = int(frames)
    save = "attnpack.SaveVideo" if PRESETS[preset].kind == "video" else "attnpack.SaveImage"
    filename = f"{method}.{'mp4' if PRESETS[preset].kind == 'video' else 'png'}"
    return {
        "1": {"class_type": "attnpack.LoadPipeline", "inputs": {"preset": preset}},
        "2": {
            "class_type": _node_name(method),
            "inputs": {"pipeline": ["1", 0], **settings, **(extra or {})},
        },
        "3": {"class_type": generate_node, "inputs": inputs},
        "4": {"class_type": save, "inputs": {"result": ["3", 0], "filename": filename}},
    }


def visible(image: np.ndarray, side: int = 256) -> np.ndarray:
    """Small outputs (the tiny presets) enlarged, nearest, so that they can be seen; others as they are."""
    scale = -(-side // max(image.shape[:2]))
    return image if scale <= 1 else image.repeat(scale, axis=0).repeat(scale, axis=1)


def plan_picture(table, frames: list | None, num_frames: int):
    """The keyframe boxes over the video (the last output's frames when there is one)."""
    from PIL import Image

    from ..methods.trajectory import trajectory_picture

    keyframes = _table_params("trajectory", table, "", "")["trajectory"]
    pictures = [Image.fromarray(visible(f)) for f in frames] if frames else None
    count = len(frames) if frames else int(num_frames)
    return np.asarray(trajectory_picture(keyframes, count, size=(192, 128), columns=6, frames=pictures))


def to_video_file(frames: list) -> str:
    """WebM (VP8), which browsers play, for the video players."""
    import cv2

    handle, path = tempfile.mkstemp(suffix=".webm", prefix="attnpack-")
    os.close(handle)
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"VP80"), 8, (width, height))
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def pattern_picture(session: Session, preset: str, method: str, settings: dict):
    """The sparsity pattern the method used at the last run's grid (radial, CLEAR), or None."""
    from ..api import attach
    from ..patterns import clear_window, radial
    from ..patterns.pictures import block_map_image, mask_image

    def picture(pattern):  # token level where it stays small, blocks beyond
        return (
            mask_image(pattern, min_side=384) if pattern.q_len <= 8192 else block_map_image(pattern, side=384)
        )

    grid = attach(session.pipe(preset)).grid if preset in session.pipes else None
    if grid is None:
        return None
    if method == "radial" and len(grid) == 3:
        keys = ("decay_factor", "sink", "variant", "block_size")
        return block_map_image(
            radial(grid[0], grid[1:], **{k: settings[k] for k in keys if k in settings}), side=384
        )
    if method == "clear" and len(grid) == 2:
        return picture(clear_window(grid, settings.get("radius", 16), text_tokens=0))
    return None


def run_tab(session: Session, tab: str, preset: str, method: str, settings_text: str, prompt: str, seed, steps,
            compare: bool, frames=None, table=None, fg_prompt="", bg_prompt="", progress=None):  # fmt: skip
    """One generation for a tab: (output, dense output, status markdown, pattern picture, extra picture)."""
    try:
        settings = json.loads(settings_text or "{}")
        if not isinstance(settings, dict):
            raise ValueError("settings must be a JSON object of name: value")
    except json.JSONDecodeError as error:
        raise ValueError(f"settings are not valid JSON: {error}") from error
    METHODS[method](**_complete(method, settings, table, fg_prompt, bg_prompt))  # validate before loading
    params = {**settings, **_table_params(method, table, fg_prompt, bg_prompt)}
    overrides = {"num_inference_steps": int(steps)}
    if frames is not None and PRESETS[preset].kind == "video":
        overrides["num_frames"] = int(frames)
    session.cancel.clear()
    with session.lock:
        pipe = session.pipe(preset)
        report = (
            (lambda step, total: progress((step, total), desc=f"step {step} of {total}"))
            if progress
            else None
        )
        result = generate(preset, prompt, method=method, params=params, seed=int(seed), compare_dense=compare,
                          pipe=pipe, progress=report, cancelled=session.cancel.is_set, **overrides)  # fmt: skip
    kind = PRESETS[preset].kind
    show = (
        (lambda frames_: to_video_file(frames_)) if kind == "video" else (lambda frames_: visible(frames_[0]))
    )
    session.last_frames[tab] = result.frames
    status = f"**{method}**: {result.seconds:.2f} s"
    if result.dense_seconds is not None:
        status += f" · dense {result.dense_seconds:.2f} s · speedup **{result.speedup:.2f}x**"
    if PRESETS[preset].is_tiny:
        status += f"  \n_{preset}: {RANDOM_WEIGHTS_NOTE}_"
    elif PRESETS[preset].is_toy:
        status += f"  \n_{preset}: {TOY_NOTE}_"
    extra = result.extra.get("sheet") or result.extra.get("plan")
    extra = None if extra is None else visible(np.asarray(extra))
    dense = show(result.dense_frames) if result.dense_frames is not None else None
    return show(result.frames), dense, status, pattern_picture(session, preset, method, settings), extra


def _complete(method, settings, table, fg_prompt, bg_prompt) -> dict:
    return {**settings, **_table_params(method, table, fg_prompt, bg_prompt)}


def _table_params(method: str, table, fg_prompt: str, bg_prompt: str) -> dict:
    rows = _rows(table)
    if method == "isolation":
        return {
            "subjects": [
                {"name": str(r[0]), "prompt": str(r[1]), "box": [float(v) for v in r[2:6]]} for r in rows
            ]
        }
    if method == "trajectory":
        params = {"trajectory": [[int(r[0]), *(float(v) for v in r[1:5])] for r in rows]}
        if fg_prompt and bg_prompt:
            params.update(fg_prompt=fg_prompt, bg_prompt=bg_prompt)
        return params
    return {}


def _rows(table) -> list:
    if table is None:
        return []
    values = table.values.tolist() if hasattr(table, "values") else table
    return [r for r in values if r and str(r[0]).strip() not in ("", "nan")]


def build_app(session: Session | None = None):
    import gradio as gr

    session = session or Session()
    with gr.Blocks(title="attnpack") as demo:
        gr.Markdown(
            "# attnpack\nSparse and structured attention for diffusers pipelines. The **toy** presets run "
            "offline: small models trained on a world of coloured shapes; prompts use its "
            'words ("a large red circle and a small blue star over a plain grey background"). The **tiny** '
            "presets are random-weight smoke models (they run the full pipeline; what they make is noise); real "
            "presets download their models."
        )
        for tab in TABS:
            with gr.Tab(tab, elem_id=f"tab-{tab.lower().replace(' ', '-')}"):
                _tab(gr, session, tab)
    return demo


def _tab(gr, session: Session, tab: str):
    key = tab.lower().replace(" ", "-")
    preset0 = TABS[tab]["default"]
    method0 = methods_for(tab, preset0)[0]
    kind = PRESETS[preset0].kind
    with gr.Row():
        with gr.Column(scale=1):
            preset = gr.Dropdown(presets_for(tab), value=preset0, label="Preset", elem_id=f"{key}-preset")
            method = gr.Dropdown(
                methods_for(tab, preset0), value=method0, label="Method", elem_id=f"{key}-method"
            )
            about = gr.Markdown(method_help(method0))
            settings = gr.Code(default_settings(preset0, method0), language="json", label="Settings")
            prompt = gr.Textbox(_examples(tab)[0][0], label="Prompt", elem_id=f"{key}-prompt")
            table = fg = bg = None
            if tab == "Several subjects":
                table = gr.Dataframe(SUBJECTS, headers=["name", "prompt", "x0", "y0", "x1", "y1"],
                                     datatype=["str", "str", "number", "number", "number", "number"],
                                     label="Subjects (boxes in [0, 1])", interactive=True)  # fmt: skip
            if tab == "Trajectory":
                table = gr.Dataframe(TRAJECTORY, headers=["frame", "y1", "y2", "x1", "x2"],
                                     datatype=["number"] * 5, label="Keyframe boxes", interactive=True)  # fmt: skip
                preview = gr.Button("Preview the boxes over the frames", elem_id=f"{key}-preview")
                fg = gr.Textbox("", label="Foreground prompt (Wan, optional)")
                bg = gr.Textbox("", label="Background prompt (Wan, optional)")
            with gr.Row():
                seed = gr.Number(0, label="Seed", precision=0)
                steps = gr.Number(
                    PRESETS[preset0].call.get("num_inference_steps", 2), label="Steps", precision=0
                )
                frames = None
                if kind == "video":
                    trained = PRESETS[preset0].call.get("num_frames", 9)
                    # Long videos open at twice the trained length, in whole VAE time chunks (1 + 4k).
                    count = 2 * (trained - 1) + 1 if tab == "Long video" else trained
                    frames = gr.Number(count, label="Frames", precision=0)
            compare = gr.Checkbox(False, label="Compare with dense", elem_id=f"{key}-compare")
            with gr.Row():
                go = gr.Button("Generate", variant="primary", elem_id=f"{key}-generate")
                stop = gr.Button("Cancel", elem_id=f"{key}-cancel")
            export = gr.Button("Export workflow", elem_id=f"{key}-export")
            workflow_file = gr.File(
                label="Workflow JSON (runs with: attnpack run FILE)", elem_id=f"{key}-workflow"
            )
            gr.Examples(_examples(tab), inputs=[prompt], label="Example prompts")
        with gr.Column(scale=1):
            status = gr.Markdown(elem_id=f"{key}-status")
            output = (gr.Video if kind == "video" else gr.Image)(label="Output", elem_id=f"{key}-output")
            dense = (gr.Video if kind == "video" else gr.Image)(
                label="Dense (comparison)", elem_id=f"{key}-dense"
            )
            pattern = gr.Image(label="Sparsity pattern (blocks computed)", elem_id=f"{key}-pattern")
            extra = gr.Image(label="Reference sheet" if tab == "Several subjects" else "Plan",
                             visible=tab in ("Several subjects", "Trajectory"), elem_id=f"{key}-extra")  # fmt: skip

    def change_preset(name):
        names = methods_for(tab, name)
        return (
            gr.update(choices=names, value=names[0]),
            default_settings(name, names[0]),
            method_help(names[0]),
        )

    preset.change(change_preset, preset, [method, settings, about])
    method.change(lambda p, m: (default_settings(p, m), method_help(m)), [preset, method], [settings, about])

    inputs = [preset, method, settings, prompt, seed, steps, compare]
    optional = [c for c in (frames, table, fg, bg) if c is not None]

    def on_generate(*values, progress=gr.Progress()):  # noqa: B008 - Gradio injects progress this way
        base, rest = values[: len(inputs)], list(values[len(inputs) :])
        named = {}
        for name, component in (("frames", frames), ("table", table), ("fg_prompt", fg), ("bg_prompt", bg)):
            if component is not None:
                named[name] = rest.pop(0)
        try:
            return run_tab(session, tab, *base, progress=progress, **named)
        except Exception as error:  # every failure becomes a message in the UI, never a stack trace
            raise gr.Error(friendly(error)) from None

    event = go.click(
        on_generate, inputs + optional, [output, dense, status, pattern, extra], concurrency_limit=1
    )
    stop.click(lambda: session.cancel.set(), None, None, cancels=[event])

    def on_export(*values):
        base, rest = values[: len(inputs)], list(values[len(inputs) :])
        p, m, s, text, sd, st, cmp = base
        named = {}
        for name, component in (("frames", frames), ("table", table), ("fg_prompt", fg), ("bg_prompt", bg)):
            if component is not None:
                named[name] = rest.pop(0)
        try:
            params = json.loads(s or "{}")
        except json.JSONDecodeError as error:
            raise gr.Error(f"Invalid settings: settings are not valid JSON: {error}") from None
        extra_params = _table_params(
            m, named.get("table"), named.get("fg_prompt", ""), named.get("bg_prompt", "")
        )
        flow = workflow_for(tab, p, m, params, text, sd, st, cmp, named.get("frames"), extra_params)
        handle, path = tempfile.mkstemp(suffix=".json", prefix=f"attnpack-{m}-")
        with os.fdopen(handle, "w") as f:
            json.dump(flow, f, indent=2, default=str)
        return path

    export.click(on_export, inputs + optional, workflow_file)
    if tab == "Trajectory":

        def on_preview(rows, count):
            try:
                return plan_picture(rows, session.last_frames.get(tab), count)
            except Exception as error:
                raise gr.Error(friendly(error)) from None

        preview.click(on_preview, [table, frames], extra)


def _examples(tab: str) -> list[list[str]]:
    return {
        "Image": [
            ["a large red circle and a small blue star over a plain grey background"],
            ["a large yellow triangle over a textured green background"],
        ],
        "Video": [
            ["a large red circle moves right over a plain black background"],
            [
                "a small white star moves down and a large green square moves left over a plain blue background"
            ],
        ],
        "Long video": [
            ["a large yellow square moves right over a plain grey background"],
            ["a large purple circle moves bounce over a textured black background"],
        ],
        "Several subjects": [
            ["a large red star and a large blue circle over a plain grey background"],
            ["a large green triangle and a large yellow square over a plain black background"],
        ],
        "Trajectory": [
            ["a large red circle over a plain black background"],
            ["a large white square over a textured blue background"],
        ],
    }[tab]


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m attnpack.app", description="the attnpack web app")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    args = parser.parse_args(argv)
    demo = build_app()
    demo.queue(default_concurrency_limit=1).launch(
        server_name=args.host, server_port=args.port, show_error=True
    )
    return 0


__all__ = ["Session", "build_app", "friendly", "main", "run_tab", "workflow_for"]
