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
from ..pipelines.generate import RUNNER_PICTURES
from ..pipelines.presets import TOY_NOTE
from ..pipelines.tiny import RANDOM_WEIGHTS_NOTE
from ..training.toy_models import toy_shipped

# The video tabs open on the toy video model where this checkout ships it, else on random-weight ones.
VIDEO_SHIPPED = toy_shipped("video")
VIDEO_DEFAULT = "toy-video" if VIDEO_SHIPPED else "tiny-wan-t2v"

# Where a tab opens; a tab not named here opens on the first preset that offers its methods.
OPENING_PRESETS = {
    "Image": "toy-image",
    "Video": VIDEO_DEFAULT,
    "Long video": "toy-video" if VIDEO_SHIPPED else "tiny-animatediff",
    "Several subjects": "toy-image",
    "Trajectory": VIDEO_DEFAULT,
}


def build_tabs() -> dict[str, dict]:
    """The tabs, from what the methods declare (`needs.tab`): "Image" and "Video" hold every method that runs
    through the pipeline's own call, by the preset's kind (dense last: it is the baseline); a method with a
    tab of its own gets it, shared with the methods that name the same tab."""
    tabs: dict[str, dict] = {
        "Image": {"kinds": ("image",), "methods": ()},
        "Video": {"kinds": ("video",), "methods": ()},
    }
    for name, cls in sorted(METHODS.items(), key=lambda item: item[0] == "dense"):
        offered = {p.kind for p in PRESETS.values() if name in p.methods}
        homes = (
            [t for t in ("Image", "Video") if offered & set(tabs[t]["kinds"])]
            if cls.needs.tab is None
            else [cls.needs.tab]
        )
        for tab in homes:
            spec = tabs.setdefault(tab, {"kinds": (), "methods": ()})
            spec["methods"] += (name,)
            if cls.needs.tab is not None:
                spec["kinds"] = tuple(sorted(set(spec["kinds"]) | offered))
    for tab, spec in tabs.items():
        offering = [
            n for n, p in PRESETS.items() if p.kind in spec["kinds"] and set(spec["methods"]) & set(p.methods)
        ]
        spec["default"] = OPENING_PRESETS.get(tab) if OPENING_PRESETS.get(tab) in offering else offering[0]
    return {tab: spec for tab, spec in tabs.items() if spec["methods"]}


TABS = build_tabs()
# What the subjects and keyframe tables open with.
SUBJECTS = [
    ["star", "a large red star over a plain grey background", 0.04, 0.2, 0.48, 0.8],
    ["circle", "a large blue circle over a plain grey background", 0.52, 0.2, 0.96, 0.8],
]
_LAST_FRAME = PRESETS[VIDEO_DEFAULT].call.get("num_frames", 9) - 1
TRAJECTORY = [[0, 0.34, 0.66, 0.02, 0.34], [_LAST_FRAME, 0.34, 0.66, 0.66, 0.98]]  # left to right


def tab_inputs(tab: str) -> list:
    """The inputs the tab's methods take in widgets of their own, each name once."""
    found = {given.name: given for m in TABS[tab]["methods"] for given in METHODS[m].needs.inputs}
    return list(found.values())


def tab_runs(tab: str, runner: str) -> bool:
    return any(METHODS[m].needs.runner == runner for m in TABS[tab]["methods"])


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
        if f.name in cls.needs.input_names:
            continue  # edited in widgets of their own
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

    keyframes = _keyframes(table)
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
    """The sparsity pattern the method used at the last run's grid (`preview_pattern`), or None."""
    from ..api import attach
    from ..patterns.pictures import block_map_image, mask_image

    grid = attach(session.pipe(preset)).grid if preset in session.pipes else None
    pattern = None if grid is None else METHODS[method](**settings).preview_pattern(tuple(grid))
    if pattern is None:
        return None
    # Token level where it stays small and the method has an element rule (CLEAR's disc), blocks beyond.
    if pattern.has_partial and pattern.q_len <= 8192:
        return mask_image(pattern, min_side=384)
    return block_map_image(pattern, side=384)


def run_tab(session: Session, tab: str, preset: str, method: str, settings_text: str, prompt: str, seed, steps,
            compare: bool, frames=None, progress=None, **widgets):  # fmt: skip
    """One generation for a tab: (output, dense output, status markdown, pattern picture, extra picture).
    `widgets`: the values of the method's own widgets by input name (`needs.inputs`: a subjects table, keyframe
    boxes, text); `table` stands for the method's table."""
    try:
        settings = json.loads(settings_text or "{}")
        if not isinstance(settings, dict):
            raise ValueError("settings must be a JSON object of name: value")
    except json.JSONDecodeError as error:
        raise ValueError(f"settings are not valid JSON: {error}") from error
    params = {**settings, **input_values(method, widgets)}
    METHODS[method].needs.check(method, params)
    METHODS[method](**params)  # validate before loading
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
    extra = next(iter(result.extra.values()), None)
    extra = None if extra is None else visible(np.asarray(extra))
    dense = show(result.dense_frames) if result.dense_frames is not None else None
    return show(result.frames), dense, status, pattern_picture(session, preset, method, params), extra


# What each kind of method input (`needs.inputs`) reads from its widget; an empty widget gives nothing.
def _subjects(rows) -> list:
    return [{"name": str(r[0]), "prompt": str(r[1]), "box": [float(v) for v in r[2:6]]} for r in _rows(rows)]


def _keyframes(rows) -> list:
    return [[int(r[0]), *(float(v) for v in r[1:5])] for r in _rows(rows)]


INPUT_READERS = {"subjects": _subjects, "keyframes": _keyframes, "text": lambda text: (text or "").strip()}
TABLE_KINDS = ("subjects", "keyframes")


def input_values(method: str, widgets: dict[str, Any]) -> dict:
    """The method's settings from its widgets' values (by input name; `table` for its table)."""
    values = {}
    for given in METHODS[method].needs.inputs:
        raw = widgets.get(given.name, widgets.get("table") if given.kind in TABLE_KINDS else None)
        value = INPUT_READERS[given.kind](raw)
        if value:
            values[given.name] = value
    return values


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
            widgets, keyframes, preview = {}, None, None
            for given in tab_inputs(tab):  # the methods' own inputs (`needs.inputs`), one widget each
                if given.kind == "subjects":
                    headers = ["name", "prompt", "x0", "y0", "x1", "y1"]
                    widgets[given.name] = gr.Dataframe(SUBJECTS, headers=headers, label=given.label,
                                                       datatype=["str"] * 2 + ["number"] * 4, interactive=True)  # fmt: skip
                elif given.kind == "keyframes":
                    headers = ["frame", "y1", "y2", "x1", "x2"]
                    widgets[given.name] = keyframes = gr.Dataframe(TRAJECTORY, headers=headers, label=given.label,
                                                                   datatype=["number"] * 5, interactive=True)  # fmt: skip
                    preview = gr.Button("Preview the boxes over the frames", elem_id=f"{key}-preview")
                else:
                    widgets[given.name] = gr.Textbox("", label=given.label)
            with gr.Row():
                seed = gr.Number(0, label="Seed", precision=0)
                steps = gr.Number(
                    PRESETS[preset0].call.get("num_inference_steps", 2), label="Steps", precision=0
                )
                frames = None
                if kind == "video":
                    trained = PRESETS[preset0].call.get("num_frames", 9)
                    # Long videos open at twice the trained length, in whole VAE time chunks (1 + 4k).
                    count = 2 * (trained - 1) + 1 if tab_runs(tab, "long_video") else trained
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
            pictures = [RUNNER_PICTURES[METHODS[m].needs.runner] for m in TABS[tab]["methods"]
                        if METHODS[m].needs.runner in RUNNER_PICTURES]  # fmt: skip
            extra = gr.Image(label=" / ".join(dict.fromkeys(pictures)) or "Extra", visible=bool(pictures),
                             elem_id=f"{key}-extra")  # fmt: skip

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
    named_components = ({"frames": frames} if frames is not None else {}) | widgets
    optional = list(named_components.values())

    def named_values(rest) -> dict:
        return dict(zip(named_components, rest, strict=True))

    def on_generate(*values, progress=gr.Progress()):  # noqa: B008 - Gradio injects progress this way
        base, named = values[: len(inputs)], named_values(values[len(inputs) :])
        try:
            return run_tab(session, tab, *base, progress=progress, **named)
        except Exception as error:  # every failure becomes a message in the UI, never a stack trace
            raise gr.Error(friendly(error)) from None

    event = go.click(
        on_generate, inputs + optional, [output, dense, status, pattern, extra], concurrency_limit=1
    )
    stop.click(lambda: session.cancel.set(), None, None, cancels=[event])

    def on_export(*values):
        base, named = values[: len(inputs)], named_values(values[len(inputs) :])
        p, m, s, text, sd, st, cmp = base
        try:
            params = json.loads(s or "{}")
        except json.JSONDecodeError as error:
            raise gr.Error(f"Invalid settings: settings are not valid JSON: {error}") from None
        flow = workflow_for(tab, p, m, params, text, sd, st, cmp, named.get("frames"), input_values(m, named))
        handle, path = tempfile.mkstemp(suffix=".json", prefix=f"attnpack-{m}-")
        with os.fdopen(handle, "w") as f:
            json.dump(flow, f, indent=2, default=str)
        return path

    export.click(on_export, inputs + optional, workflow_file)
    if preview is not None:

        def on_preview(rows, count):
            try:
                return plan_picture(rows, session.last_frames.get(tab), count)
            except Exception as error:
                raise gr.Error(friendly(error)) from None

        preview.click(on_preview, [keyframes, frames], extra)


def _examples(tab: str) -> list[list[str]]:
    """Prompts in the toy world's words; a tab without its own takes those of its kind."""
    examples = {
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
    }
    return examples.get(tab) or examples["Video" if "video" in TABS[tab]["kinds"] else "Image"]


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
