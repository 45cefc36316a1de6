"""The app's logic without a browser: messages instead of stack traces, settings validation, workflows."""

import pytest
import torch

from attnpack.app import Session, friendly, run_tab, workflow_for
from attnpack.pipelines import Cancelled, ModelUnavailable
from attnpack.workflow import validate


def test_failures_read_as_messages():
    assert friendly(torch.OutOfMemoryError("CUDA out of memory")).startswith("Out of GPU memory")
    assert friendly(ModelUnavailable("the model 'x/y' cannot be loaded")).startswith("Weights unavailable")
    assert friendly(OSError("Network is unreachable")).startswith("No network or file access")
    assert friendly(Cancelled("stop")) == "Cancelled."
    assert friendly(ValueError("radius=-1 is out of range")).startswith("Invalid settings")


def test_settings_are_checked_before_any_model_loads(monkeypatch):
    session = Session()
    monkeypatch.setattr(session, "pipe", lambda preset: pytest.fail("loaded a model for bad settings"))
    with pytest.raises(ValueError, match="not valid JSON"):
        run_tab(session, "Image", "toy-image", "clear", "{radius: 3", "a fox", 0, 2, False)
    with pytest.raises(ValueError, match="radius=-3"):
        run_tab(session, "Image", "toy-image", "clear", '{"radius": -3}', "a fox", 0, 2, False)


def test_real_presets_offline_say_which_model(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnavailable, match=r"black-forest-labs/FLUX\.1-dev"):
        run_tab(Session(), "Image", "flux.1-dev", "dense", "{}", "a fox", 0, 2, False)


def test_exported_workflows_validate():
    flow = workflow_for("Trajectory", "tiny-wan-t2v", "trajectory", {"rope_steps": 1}, "a ball", 0, 2, True, 9,
                        {"trajectory": [[0, 0.1, 0.5, 0.1, 0.5], [8, 0.2, 0.6, 0.5, 0.9]]})  # fmt: skip
    assert validate(flow) and flow["3"]["class_type"] == "attnpack.CompareWithDense"
