"""`attnpack bench kernels` on a CPU: the smoke geometry exercises the whole benchmark and its files."""

import json

import pytest

from attnpack.bench import kernels
from attnpack.cli import main


def test_tiny_geometry_writes_json_and_plot(tmp_path):
    path = kernels.run(["tiny"], device="cpu", out=tmp_path, rep_ms=5)
    result = json.loads(path.read_text())
    assert path.name == "kernels-cpu.json" and path.with_suffix(".png").stat().st_size > 1000
    assert result["benchmark"] == "kernels" and result["device"]["type"] == "cpu"
    assert {"torch", "triton", "diffusers", "attnpack"} <= set(result["versions"])
    (record,) = result["geometries"]
    assert record["shape"] == {"batch": 1, "tokens": 144, "heads": 2, "head_dim": 64}
    assert 0 < record["pattern"]["element_density"] <= record["pattern"]["block_density"] <= 1
    rows = {row["implementation"]: row for row in record["rows"]}
    assert {"sdpa-math", "attnpack-dense", "attnpack-sparse", "flex-sparse"} <= set(rows)
    assert rows["attnpack-sparse"]["backend"] == "reference" and rows["attnpack-sparse"]["ms"] > 0
    assert record["summary"]["best_sdpa"] == "sdpa-math"
    assert "sparse_efficiency" in record["summary"]


def test_refuses_to_overwrite(tmp_path):
    kernels.run(["tiny"], device="cpu", out=tmp_path, rep_ms=1)
    before = (tmp_path / "kernels-cpu.json").read_text()
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        kernels.run(["tiny"], device="cpu", out=tmp_path, rep_ms=1)
    assert (tmp_path / "kernels-cpu.json").read_text() == before
    kernels.run(["tiny"], device="cpu", out=tmp_path, rep_ms=1, overwrite=True)


def test_bad_arguments(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"geometry 'wan-9000' is not known; accepted: wan2.1-1.3b-480p-81f"):
        kernels.run(["wan-9000"], device="cpu", out=tmp_path)
    with pytest.raises(ValueError, match=r"dtype='float32' is not accepted; choose one of bfloat16, float16"):
        kernels.run(["tiny"], device="cpu", dtype="float32", out=tmp_path)
    with pytest.raises(ValueError, match="on a CUDA GPU; this machine runs on cpu"):
        kernels.run(["flux-1024"], device="cpu", out=tmp_path)
    assert (
        main(["bench", "kernels", "--geometry", "flux-1024", "--device", "cpu", "--out", str(tmp_path)]) == 2
    )
    assert "Use --geometry tiny" in capsys.readouterr().err


def test_cli_prints_a_table(tmp_path, capsys):
    assert (
        main(
            [
                "bench",
                "kernels",
                "--geometry",
                "tiny",
                "--device",
                "cpu",
                "--out",
                str(tmp_path),
                "--rep-ms",
                "1",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "attnpack-sparse" in out and f"wrote {tmp_path}" in out


def test_radial_benchmark_on_the_smoke_models(tmp_path):
    from attnpack.bench import radial

    path = radial.run(["tiny", "tiny-hunyuan"], device="cpu", out=tmp_path, repeats=1)
    result = json.loads(path.read_text())
    assert path.name == "radial-cpu.json" and path.with_suffix(".png").exists()
    assert [m["model"] for m in result["models"]] == ["tiny", "tiny-hunyuan"]
    for record in result["models"]:
        assert set(record["seconds"]) == {"dense", "radial_all_sparse", "radial_sparse_step"}
        assert record["speedup_50_steps"] > 0
    assert result["models"][1]["settings"]["sink"] is False  # the HunyuanVideo preset
    with pytest.raises(ValueError, match="Use --model tiny tiny-hunyuan"):
        radial.run(["wan2.1-14b-720p-81f"], device="cpu", out=tmp_path)


def test_clear_benchmark_on_the_smoke_resolution(tmp_path):
    from attnpack.bench import clear

    path = clear.run(["tiny"], device="cpu", out=tmp_path, rep_ms=5, repeats=1)
    result = json.loads(path.read_text())
    (record,) = result["resolutions"]
    rows = {row["implementation"]: row for row in record["op"]["rows"]}
    assert {"sdpa-math", "flex-raster (CLEAR's mask)", "flex-tiled", "attnpack-clear"} <= set(rows)
    needed = record["op"]["element_density"]
    assert 0 < needed <= rows["attnpack-clear"]["block_density"] <= 1
    assert needed <= rows["flex-raster (CLEAR's mask)"]["block_density"] <= 1
    assert record["step"]["dense_s"] > 0 and record["step"]["clear_s"] > 0
    assert path.with_suffix(".png").exists()
    with pytest.raises(ValueError, match="Use --resolution tiny"):
        clear.run(["flux-4096"], device="cpu", out=tmp_path)


def test_agent_benchmark_on_the_smoke_model(tmp_path):
    from attnpack.bench import agent

    path = agent.run(["tiny"], device="cpu", out=tmp_path, repeats=1)
    result = json.loads(path.read_text())
    assert path.name == "agent-cpu.json" and path.with_suffix(".png").exists()
    (record,) = result["models"]
    assert set(record["seconds"]) == {"dense", "stage1", "stage2"}
    assert record["peak_memory_gib"] == {"dense": None, "stage1": None, "stage2": None}  # CUDA only
    assert record["settings"]["max_downsample"] == 1 and record["speedup_50_steps"] > 0
    with pytest.raises(ValueError, match="Use --model tiny"):
        agent.run(["sdxl-1024"], device="cpu", out=tmp_path)


@pytest.mark.parametrize(
    "suite, flag, extra",
    [
        ("radial", "--model", ["--repeats", "1"]),
        ("clear", "--resolution", ["--no-steps"]),
        ("agent", "--model", ["--repeats", "1"]),
    ],
)
def test_every_suite_runs_from_the_command_line(suite, flag, extra, tmp_path, capsys):
    name = "tiny"
    argv = ["bench", suite, flag, name, "--device", "cpu", "--out", str(tmp_path), *extra]
    assert main(argv) == 0
    assert f"wrote {tmp_path / f'{suite}-cpu.json'}" in capsys.readouterr().out
    assert main(argv) == 2  # the result is there: not overwritten
    assert "pass --overwrite" in capsys.readouterr().err


def test_temporal_benchmark_on_the_smoke_geometry(tmp_path):
    from attnpack.bench import temporal

    path = temporal.run(["tiny"], device="cpu", out=tmp_path, rep_ms=1)
    (record,) = json.loads(path.read_text())["geometries"]
    rows = {row["implementation"]: row for row in record["rows"]}
    assert all(row["ms"] > 0 for row in rows.values()) and len(rows) == 6
    assert set(record["summary"]) == {
        "freelong: attnpack one pass vs two sdpa calls",
        "freelong: attnpack one pass + positions vs two sdpa calls",
        "freenoise fused vs reference",
    }
    with pytest.raises(ValueError, match="Use --geometry tiny"):
        temporal.run(["animatediff-512-64f-level0"], device="cpu", out=tmp_path)
