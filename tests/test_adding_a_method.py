"""A tenth method, written as a user would (README "Adding a method"): one class, one registry call, and
`attnpack.apply`, generations, the CLI, the workflow runner and the app offer it with no edit of theirs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
from PIL import Image

import attnpack
from attnpack.families.base import AttnCall
from attnpack.kernels import block_sparse_attention
from attnpack.layout import Role
from attnpack.methods import METHODS, AttentionMethod, check_number, register_method
from attnpack.methods.base import dense
from attnpack.patterns.frame_band import frame_band


@dataclass(eq=False, repr=False)
class FrameBandAttention(AttentionMethod):
    """Each video token attends the tokens of the frames within `radius` frames of its own."""

    radius: int = 2

    name: ClassVar[str] = "frame_band"
    families: ClassVar[tuple[str, ...]] = ("wan",)
    roles: ClassVar[frozenset[Role]] = frozenset({Role.SELF})
    needs_context: ClassVar[bool] = True  # the latent grid comes from the attached pipeline

    def __post_init__(self):
        check_number("FrameBandAttention", "radius", self.radius, low=0, integer=True)

    def preview_pattern(self, grid):
        return frame_band(tuple(grid), self.radius) if len(grid) == 3 else None

    def attend(self, call: AttnCall):
        grid = call.layout.grid
        if grid is None or len(grid) != 3:
            return dense(call)
        pattern = frame_band(tuple(grid), self.radius, device=call.query.device)
        return block_sparse_attention(call.query, call.key, call.value, pattern, scale=call.scale)


PRESET = "tiny-wan-t2v"
WIDE = {"radius": 64}  # covers every frame: must reproduce dense
CALL = {"num_inference_steps": 2}


@pytest.fixture
def registered(monkeypatch):
    """The method registered and offered by the tiny Wan preset, both undone after the test."""
    from attnpack.pipelines import PRESETS

    monkeypatch.setitem(PRESETS[PRESET].methods, "frame_band", {"radius": 1})
    assert register_method(FrameBandAttention) is FrameBandAttention
    yield FrameBandAttention
    METHODS.pop("frame_band", None)


def test_register_method_checks_what_it_is_given():
    with pytest.raises(TypeError, match="AttentionMethod subclass"):
        register_method(dict)

    @dataclass(eq=False, repr=False)
    class Taken(AttentionMethod):
        name: ClassVar[str] = "radial"

    with pytest.raises(ValueError, match="'radial' is taken by RadialAttention"):
        register_method(Taken)

    @dataclass(eq=False, repr=False)
    class BadName(AttentionMethod):
        name: ClassVar[str] = "Frame Band"

    with pytest.raises(ValueError, match="lower-case identifier"):
        register_method(BadName)


def test_generation_and_apply_with_a_registered_method(registered):
    from attnpack.pipelines import generate, load_preset

    pipe = load_preset(PRESET)
    wide = generate(PRESET, "a ball", method="frame_band", params=WIDE, pipe=pipe, **CALL)
    stock = generate(PRESET, "a ball", method="dense", pipe=pipe, **CALL)
    assert np.array_equal(np.stack(wide.frames), np.stack(stock.frames))  # no sparsity: dense exactly
    narrow = generate(PRESET, "a ball", method="frame_band", params={"radius": 0}, pipe=pipe, **CALL)
    assert not np.array_equal(np.stack(narrow.frames), np.stack(stock.frames))
    assert narrow.config["method"] == "frame_band" and narrow.config["params"] == {"radius": 0}
    with attnpack.apply(pipe, "frame_band", radius=1) as handle:
        assert handle.method.radius == 1


def test_the_cli_offers_it(registered, tmp_path, capsys):
    from attnpack.cli import main

    out = tmp_path / "band.mp4"
    assert main(["generate", "--preset", PRESET, "--method", "frame_band", "--param", "radius=1",
                 "--prompt", "a ball", "--steps", "1", "--out", str(out)]) == 0  # fmt: skip
    assert out.exists() and json.loads(out.with_suffix(".json").read_text())["method"] == "frame_band"
    assert main(["generate", "--preset", PRESET, "--method", "frame_band", "--param", "radius=-1",
                 "--prompt", "a ball", "--out", str(tmp_path / "bad.mp4")]) == 2  # fmt: skip
    assert "radius=-1" in capsys.readouterr().err
    assert main(["info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["methods"]["frame_band"]["families"] == ["wan"]


def test_the_workflow_runner_offers_it(registered, tmp_path):
    from attnpack import workflow

    assert "attnpack.ApplyFrameBand" in workflow.NODES
    flow = {
        "1": {"class_type": "attnpack.LoadPipeline", "inputs": {"preset": PRESET}},
        "2": {"class_type": "attnpack.ApplyFrameBand", "inputs": {"pipeline": ["1", 0], "radius": 1}},
        "3": {"class_type": "attnpack.GenerateVideo", "inputs": {"pipeline": ["2", 0], "prompt": "a ball",
                                                                 "steps": 1}},
        "4": {"class_type": "attnpack.SaveVideo", "inputs": {"result": ["3", 0], "filename": "band.mp4"}},
    }  # fmt: skip
    workflow.run(flow, output_dir=tmp_path)
    assert json.loads((tmp_path / "band.json").read_text())["methods"] == ["frame_band"]
    with pytest.raises(workflow.WorkflowError, match="radius"):
        bad = {**flow, "2": {**flow["2"], "inputs": {"pipeline": ["1", 0], "radius": "wide"}}}
        workflow.validate(bad)
    assert any(
        node["properties"]["class_type"]["const"] == "attnpack.ApplyFrameBand"
        for node in workflow.schema()["additionalProperties"]["oneOf"]
    )


def test_the_app_offers_it(registered, monkeypatch):
    import attnpack.app as app

    monkeypatch.setattr(app, "TABS", app.build_tabs())
    assert "frame_band" in app.TABS["Video"]["methods"] and "frame_band" not in app.TABS["Image"]["methods"]
    assert "frame_band" in app.methods_for("Video", PRESET)
    assert json.loads(app.default_settings(PRESET, "frame_band")) == {"radius": 1}
    assert "FrameBandAttention" in app.method_help("frame_band")
    session = app.Session()
    output, dense_output, status, pattern, extra = app.run_tab(
        session, "Video", PRESET, "frame_band", '{"radius": 0}', "a ball", 0, 1, False, 9
    )
    assert status.startswith("**frame_band**") and output.endswith(".webm") and dense_output is extra is None
    assert isinstance(pattern, Image.Image) and min(pattern.size) >= 256  # the method's own pattern
    app.build_app(session)  # the tab's widgets build from the declarations
