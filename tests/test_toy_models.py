"""The shipped toy models: they load offline through from_pretrained, meet the adherence their model cards
record, stand behind the toy presets, and every method's quality suite runs on them. A toy not shipped (the
video one is still owed) is checked to fail with a clear message, and its suites run on random weights."""

import json

import numpy as np
import pytest
from diffusers import DiffusionPipeline

from attnpack.cli import main
from attnpack.eval.toy import measure_adherence, quality_tables, toy_quality, write_quality
from attnpack.pipelines import PRESETS, generate, load_preset
from attnpack.pipelines.presets import ModelUnavailable
from attnpack.training.toy_models import (
    TOY_GEOMETRY,
    TOY_METHODS,
    build_toy_video,
    fit_defaults,
    load_toy,
    shipped_path,
    toy_shipped,
)

KINDS = tuple(kind for kind in ("image", "video") if toy_shipped(kind))
assert "image" in KINDS, "assets/toy-image is missing"
# Recomputed on another machine, a few detections near a threshold may flip: one object in 24 prompts
# moves a share by about 0.02.
TOLERANCE = 0.08


@pytest.fixture(scope="module")
def toys():
    pipes = {kind: load_toy(kind) for kind in KINDS}
    if "video" not in pipes:  # the suites' code paths on the toy video configuration, random weights
        pipes["video"] = fit_defaults(build_toy_video())
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    return pipes


@pytest.mark.parametrize("kind", KINDS)
def test_shipped_models_load_offline_through_from_pretrained(kind, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = shipped_path(kind)
    pipe = DiffusionPipeline.from_pretrained(str(folder))
    assert type(pipe).__name__ == ("FluxPipeline" if kind == "image" else "WanPipeline")
    for name in ("README.md", "recipe.json", "training-log.jsonl", "metrics.json"):
        assert (folder / name).is_file(), name
    log = [json.loads(line) for line in (folder / "training-log.jsonl").read_text().splitlines()]
    recipe = json.loads((folder / "recipe.json").read_text())
    assert log[-1] == {**log[-1], "stage": "denoiser", "step": recipe["steps"]}


def test_the_weights_stay_small():
    total = sum(p.stat().st_size for kind in KINDS for p in shipped_path(kind).rglob("*.safetensors"))
    assert total < 30e6, f"{total / 1e6:.1f} MB"


@pytest.mark.parametrize("kind", KINDS)
def test_shipped_models_meet_their_recorded_adherence(kind, toys):
    recorded = json.loads((shipped_path(kind) / "metrics.json").read_text())
    measured = measure_adherence(toys[kind], kind, recorded["count"], seed=recorded["seeds"][0])
    assert measured["call"] == recorded["call"]
    for key, value in recorded["adherence"].items():
        assert abs(measured["adherence"][key] - value) <= TOLERANCE, (key, measured["adherence"], value)
    assert measured["ground_truth"] == pytest.approx(recorded["ground_truth"])
    for key, value in recorded["vae_round_trip"].items():
        assert abs(measured["vae_round_trip"][key] - value) <= TOLERANCE, (
            key,
            measured["vae_round_trip"],
            value,
        )


def test_a_toy_not_shipped_says_how_to_train_it(tmp_path, monkeypatch):
    import attnpack.training.toy_models as toy_models

    monkeypatch.setattr(toy_models, "__file__", str(tmp_path / "attnpack" / "training" / "toy_models.py"))
    with pytest.raises(ModelUnavailable, match=r"preset 'toy-video': .* `attnpack train toy-video --out"):
        load_preset("toy-video", device="cpu")


def test_shipped_path_names_the_kinds():
    with pytest.raises(ValueError, match="kind='sound' is not a toy model; accepted: image, video"):
        shipped_path("sound")


def test_toy_presets_are_the_shipped_models(toys):
    assert {"toy-image", "toy-video"} <= set(PRESETS) and "tiny-flux" not in PRESETS
    preset = PRESETS["toy-image"]
    assert (
        preset.is_toy and not preset.is_tiny and preset.offline and "trained toy" in preset.describe()["note"]
    )
    assert set(preset.methods) == set(TOY_METHODS["image"])
    pipe = load_preset("toy-image", device="cpu")
    assert type(pipe).__name__ == "FluxPipeline" and pipe.default_sample_size * pipe.vae_scale_factor == 64
    result = generate("toy-image", "a large red circle over a plain grey background", pipe=toys["image"])
    assert np.asarray(result.frames[0]).shape == (64, 64, 3)


@pytest.mark.slow
def test_the_quality_suite_covers_every_method(toys, tmp_path, capsys, monkeypatch):
    for kind in ("image", "video"):  # the suite's code paths, not its figures: a few steps are enough
        monkeypatch.setitem(TOY_GEOMETRY[kind].call, "num_inference_steps", 4)
    result, outputs = toy_quality(toys["image"], toys["video"], prompts=2, subjects=1, videos=1, long_videos=1,
                                  trajectories=1)  # fmt: skip
    methods = {(r["model"], r["task"], r["method"]) for r in result["rows"]}
    for method in ("dense", "clear", "pooled_agent", "world pictures", "VAE round trip"):
        assert ("toy-image", "adherence", method) in methods
    for method in ("dense", "radial", "pooled_agent", "world videos", "VAE round trip"):
        assert ("toy-video", "adherence", method) in methods
    assert {("toy-image", "several subjects", m) for m in ("dense", "isolation")} <= methods
    assert {("toy-video", "trajectory", m) for m in ("dense", "trajectory")} <= methods
    long_rows = [r for r in result["rows"] if r["task"] == "long video"]
    assert {(r["method"], r["frames"]) for r in long_rows} == {
        (m, f) for m in ("world videos", "VAE round trip", "dense", "freenoise", "freelong") for f in (33, 65)
    }
    world_65 = next(r for r in long_rows if (r["method"], r["frames"]) == ("world videos", 65))
    assert world_65["measures"]["identity"] > 0.9  # the ceiling at 4x the trained length: the world's own
    for row in result["rows"]:
        assert all(np.isfinite(v) or k == "centroid_distance" for k, v in row["measures"].items()), row
    tables = quality_tables(result)
    assert tables.count("| toy-image |") == 5 and "| 65 (4x) | freelong |" in tables
    image_only = {**result, "rows": [r for r in result["rows"] if r["model"] == "toy-image"],
                  "not_measured": {"toy-video": "not shipped"}}  # fmt: skip
    tables = quality_tables(image_only)
    assert "Long videos" not in tables and tables.endswith("Not measured: toy-video (not shipped).")
    written = write_quality(result, outputs, tmp_path)
    assert [p.suffix for p in written] == [".json", ".md", ".png"] and all(p.stat().st_size for p in written)
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_quality(result, outputs, tmp_path)
    assert main(["eval", "--toy", "--out", str(tmp_path), "--count", "0", "1", "1", "1", "1"]) == 2
    assert "every count must be >= 1" in capsys.readouterr().err
