"""`attnpack info`: versions, device, kernel backends, methods and their families."""

import json
import subprocess
import sys

from attnpack.cli import main


def test_info_text(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for expected in ("attnpack 0.1.0", "torch", "diffusers", "device:", "kernel backends:", "sdpa", "triton"):
        assert expected in out
    assert "dense         DenseAttention" in out and "pooled_agent  PooledAgentAttention" in out
    assert "families: unet, flux, sd3, wan, cogvideox, hunyuan_video" in out
    assert "FLUX.1 (FluxTransformer2DModel)" in out


def test_info_json(capsys):
    assert main(["info", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["methods"]["dense"]["families"] == [
        "unet",
        "flux",
        "sd3",
        "wan",
        "cogvideox",
        "hunyuan_video",
    ]
    assert report["versions"]["diffusers"]
    assert report["device"]["type"] in ("cpu", "cuda")
    assert {backend["name"] for backend in report["backends"]} >= {"sdpa", "triton"}


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "info" in capsys.readouterr().out


def test_module_entry_point(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "attnpack.cli", "info"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "kernel backends:" in result.stdout


def test_pattern_radial_prints_densities_and_draws(tmp_path, capsys):
    png = tmp_path / "radial.png"
    assert (
        main(
            [
                "pattern",
                "radial",
                "--frames",
                "18",
                "--frame-shape",
                "48",
                "80",
                "--decay-factor",
                "0.2",
                "--png",
                str(png),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "69,120 tokens" in out and "block density   0.2871" in out
    from PIL import Image

    with Image.open(png) as image:
        assert image.size == (1024, 1024)
    # never over a file without --overwrite
    assert main(["pattern", "radial", "--frames", "4", "--frame-shape", "8", "8", "--png", str(png)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert main(["pattern", "radial", "--frames", "4", "--frame-shape", "8", "8", "--variant", "raster"]) == 2
    assert "variant='raster'" in capsys.readouterr().err


def test_distill_clear_command(tmp_path, capsys):
    from PIL import Image

    Image.new("RGB", (32, 32), (90, 120, 200)).save(tmp_path / "one.png")
    out = tmp_path / "weights.safetensors"
    arguments = ["distill", "clear", "--model", "tiny-flux", "--images", str(tmp_path), "--out", str(out)]
    assert main([*arguments, "--steps", "2", "--resolution", "32", "--radius", "2"]) == 0
    assert "loss" in capsys.readouterr().out and out.exists()
    assert main([*arguments, "--steps", "2"]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert (
        main(["distill", "clear", "--model", "nobody/no-such-flux", "--images", str(tmp_path), "--out", "x"])
        == 2
    )
    assert "could not load the FLUX pipeline 'nobody/no-such-flux'" in capsys.readouterr().err
