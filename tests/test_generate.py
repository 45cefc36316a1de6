"""Presets and `attnpack generate`: files with the config embedded, dense comparison, no overwriting."""

import json

import numpy as np
import pytest
from PIL import Image

from attnpack.cli import main, parse_params
from attnpack.pipelines import PRESETS, generate, get_preset, load_preset, save
from attnpack.pipelines.presets import ModelUnavailable


def test_presets_cover_the_real_models_the_toys_and_a_tiny_one_per_family():
    for name in ("wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan2.2", "hunyuanvideo", "cogvideox-5b", "flux.1-dev",
                 "sdxl", "sd1.5", "animatediff", "playground-v2.5"):  # fmt: skip
        preset = get_preset(name)
        assert preset.model and preset.call["num_inference_steps"] > 0 and preset.offload
    assert get_preset("flux.1-dev").settings("clear")["weights"] == "Huage001/CLEAR"
    tiny = [p for p in PRESETS.values() if p.is_tiny]
    assert {p.family for p in tiny} == {"unet", "sd3", "wan", "cogvideox", "hunyuan_video"}
    assert all("random-weight" in p.describe()["note"] for p in tiny)
    toys = [p for p in PRESETS.values() if p.is_toy]
    assert {(p.name, p.family) for p in toys} == {("toy-image", "flux"), ("toy-video", "wan")}
    assert all(p.describe()["offline"] for p in tiny + toys) and not get_preset("sdxl").describe()["offline"]
    with pytest.raises(ValueError, match="preset='sd9' is not known"):
        get_preset("sd9")


def test_real_presets_offline_name_the_model(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        ModelUnavailable, match="'stable-diffusion-v1-5/stable-diffusion-v1-5' cannot be loaded"
    ):
        load_preset("sd1.5", device="cpu")


def test_generate_image_with_comparison(tmp_path):
    result = generate("toy-image", "a red circle", method="clear", params={"radius": 3}, compare_dense=True)
    assert result.kind == "image" and len(result.frames) == 1 and result.dense_frames is not None
    assert result.config["params"]["radius"] == 3 and result.config["speedup"] > 0
    (path,) = save(result, tmp_path / "fox.png")
    image = Image.open(path)
    config = json.loads(image.text["attnpack"])
    assert config["method"] == "clear" and config["preset"] == "toy-image"
    assert image.width == 2 * result.frames[0].shape[1]  # dense and clear side by side
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        save(result, path)


def test_generate_video_writes_mp4_and_sidecar(tmp_path):
    import cv2

    result = generate("tiny-wan-t2v", "a red circle moves right", method="radial")
    written = save(result, tmp_path / "fox.mp4")
    assert [p.suffix for p in written] == [".mp4", ".json"]
    capture = cv2.VideoCapture(str(written[0]))
    assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == len(result.frames)
    assert json.loads(written[1].read_text())["method"] == "radial"


@pytest.mark.parametrize(
    "preset, method, params",
    [
        (
            "tiny-sdxl",
            "isolation",
            {"subjects": [{"name": "fox", "prompt": "a fox", "box": [0.1, 0.1, 0.5, 0.9]}]},
        ),
        ("tiny-wan-t2v", "trajectory", {"trajectory": [[0, 0.1, 0.5, 0.1, 0.5], [8, 0.4, 0.9, 0.5, 0.9]]}),
        ("tiny-animatediff", "freenoise", {}),
        (
            "toy-image",
            "isolation",
            {"subjects": [{"name": "star", "prompt": "a red star", "box": [0.1, 0.1, 0.5, 0.9]}]},
        ),
    ],
)
def test_methods_with_their_own_pipelines(preset, method, params):
    result = generate(preset, "a red fox", method=method, params=params)
    assert result.frames and all(np.isfinite(f).all() for f in result.frames)


def test_bad_requests():
    with pytest.raises(ValueError, match="method='radial' is not offered for preset 'toy-image'"):
        generate("toy-image", "a fox", method="radial")
    with pytest.raises(ValueError, match="needs subjects"):
        generate("tiny-sdxl", "a fox", method="isolation")
    with pytest.raises(ValueError, match="must be KEY=VALUE"):
        parse_params(["radius"])
    assert parse_params(["radius=3", "weights=a/b", "trajectory=[[0, 0.1]]"]) == {
        "radius": 3, "weights": "a/b", "trajectory": [[0, 0.1]]
    }  # fmt: skip


def test_cli_generate(tmp_path, capsys):
    out = tmp_path / "fox.png"
    argv = ["generate", "--preset", "toy-image", "--method", "clear", "--param", "radius=3", "--prompt", "a star",
            "--out", str(out), "--compare-dense"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "dense" in printed and f"wrote {out}" in printed
    before = out.read_bytes()
    assert main(argv) == 2 and "pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == before  # nothing the user made is lost
    assert main([*argv, "--overwrite"]) == 0
    assert main(["generate", "--preset", "nope", "--prompt", "x", "--out", str(tmp_path / "x.png")]) == 2
    assert "preset='nope' is not known" in capsys.readouterr().err
    assert main(["presets", "--json"]) == 0
    assert "toy-image" in json.loads(capsys.readouterr().out)
