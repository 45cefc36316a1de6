"""Workflows: every example runs on its offline preset, matches the schema, and bad workflows are refused
before anything runs, with the node id and the input named."""

import json
from pathlib import Path

import jsonschema
import pytest

from attnpack import workflow
from attnpack.cli import main
from attnpack.workflow import WorkflowError

EXAMPLES = sorted(Path(__file__).parent.parent.glob("workflows/*.json"))
EXAMPLES = [p for p in EXAMPLES if p.name != "schema.json"]
PIPELINES: dict = {}  # shared by the examples: each tiny preset is built once


def test_the_schema_file_is_current():
    committed = json.loads((Path(__file__).parent.parent / "workflows" / "schema.json").read_text())
    assert committed == workflow.schema(), "run: attnpack workflow-schema --out workflows/schema.json"


def test_there_is_an_example_per_method_and_a_combined_one():
    names = {p.stem for p in EXAMPLES}
    assert {
        "radial",
        "clear",
        "agent",
        "pooled_agent",
        "freenoise",
        "freelong",
        "isolation",
        "trajectory",
    } <= names
    assert "radial_trajectory" in names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_examples_validate_and_run(path, tmp_path):
    api = workflow.load(path)
    jsonschema.validate(api, workflow.schema())
    results = workflow.run(path, output_dir=tmp_path, pipelines=PIPELINES)
    written = list(tmp_path.iterdir())
    assert written, "the workflow saved nothing"
    for report in (out[0] for out in results.values() if out and isinstance(out[0], dict)):
        assert report["seconds"] > 0


def base():
    return {
        "1": {"class_type": "attnpack.LoadPipeline", "inputs": {"preset": "toy-image"}},
        "2": {"class_type": "attnpack.ApplyClear", "inputs": {"pipeline": ["1", 0], "radius": 3}},
        "3": {"class_type": "attnpack.GenerateImage", "inputs": {"pipeline": ["2", 0], "prompt": "a fox"}},
        "4": {"class_type": "attnpack.SaveImage", "inputs": {"result": ["3", 0], "filename": "fox.png"}},
    }


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda w: w["2"].update(class_type="attnpack.ApplyMagic"),
            "node 2: class_type 'attnpack.ApplyMagic'",
        ),
        (lambda w: w["3"]["inputs"].pop("prompt"), "node 3 .*missing input 'prompt'"),
        (lambda w: w["2"]["inputs"].update(diameter=3), "node 2 .*unknown input 'diameter'"),
        (lambda w: w["3"]["inputs"].update(pipeline=["9", 0]), "node 3: input 'pipeline' links to node '9'"),
        (
            lambda w: w["3"]["inputs"].update(pipeline=["2", 1]),
            "node 3: input 'pipeline' links to output 1 of node 2",
        ),
        (
            lambda w: w["4"]["inputs"].update(result=["2", 0]),
            "node 4: input 'result' wants RESULT, node 2 gives PIPELINE",
        ),
        (lambda w: w["2"]["inputs"].update(radius="wide"), "node 2: input 'radius' wants FLOAT"),
        (lambda w: w["1"]["inputs"].update(preset=3), "node 1: input 'preset' wants STRING"),
        (lambda w: w["2"]["inputs"].update(pipeline=["3", 0]), "wants PIPELINE, node 3 gives RESULT"),
    ],
)
def test_bad_workflows_are_refused_before_running(change, message, tmp_path):
    broken = base()
    change(broken)
    with pytest.raises(WorkflowError, match=message):
        workflow.run(broken, output_dir=tmp_path)
    assert not list(tmp_path.iterdir())


def test_cycles_are_refused():
    w = base()
    w["5"] = {"class_type": "attnpack.ApplyClear", "inputs": {"pipeline": ["6", 0]}}
    w["6"] = {"class_type": "attnpack.ApplyClear", "inputs": {"pipeline": ["5", 0]}}
    with pytest.raises(WorkflowError, match="cycle"):
        workflow.validate(w)


def test_ui_formats_become_api_format():
    api = workflow.load(Path(__file__).parent.parent / "workflows" / "freelong.json")
    assert api["2"] == {
        "class_type": "attnpack.ApplyFreelong",
        "inputs": {"pipeline": ["1", 0], "local_window": 5, "spatial_cutoff": 0.25, "temporal_cutoff": 0.25,
                   "skip_highest_resolution": False, "band_windows": []},
    }  # fmt: skip
    api = workflow.load(Path(__file__).parent.parent / "workflows" / "trajectory.json")
    assert api["3"]["inputs"]["pipeline"] == ["2", 0] and api["2"]["inputs"]["rope_steps"] == 5


def test_cli_run(tmp_path, capsys):
    path = Path(__file__).parent.parent / "workflows" / "clear.json"
    assert main(["run", str(path), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "psnr_vs_dense" in out and (tmp_path / "clear.png").exists()
    assert main(["run", str(path), "--out", str(tmp_path)]) == 2  # clear.png exists: not overwritten
    assert "pass --overwrite" in capsys.readouterr().err
