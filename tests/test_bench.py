"""`attnpack bench kernels` on a CPU: the smoke geometry exercises the whole benchmark and its files."""

import json

import pytest
import torch

from attnpack.bench import kernels
from attnpack.cli import main
from attnpack.methods.radial import PRESETS
from attnpack.patterns import clear_window, radial


def test_tiny_geometry_writes_json_and_plot(tmp_path):
    path = kernels.run(["tiny"], device="cpu", out=tmp_path, rep_ms=5)
    result = json.loads(path.read_text())
    assert path.name == "kernels-cpu.json" and path.with_suffix(".png").stat().st_size > 1000
    assert result["benchmark"] == "kernels" and result["device"]["type"] == "cpu"
    assert {"torch", "triton", "diffusers", "attnpack"} <= set(result["versions"])
    (record,) = result["geometries"]
    assert record["shape"] == {"batch": 1, "tokens": 656, "heads": 2, "head_dim": 64}
    rows = {row["implementation"]: row for row in record["rows"]}
    assert set(rows) == {
        "sdpa-math",
        "attnpack-dense",
        "attnpack-radial-official",
        "flex-radial-official",
        "attnpack-radial-spatial",
        "flex-radial-spatial",
    }
    assert all(row["ms"] > 0 for row in rows.values())
    assert rows["attnpack-radial-official"]["backend"] == "reference"
    assert rows["flex-radial-spatial"]["pattern"] == "radial-spatial"
    # the method's own pattern: radial with the Wan 2.1 preset, built as RadialAttention builds it
    preset = PRESETS["wan2.1"]
    for entry in record["patterns"]:
        assert entry["method"] == "radial"
        settings = entry["settings"]
        assert (settings["decay_factor"], settings["sink"]) == (preset["decay_factor"], preset["sink"])
        built = radial(5, (8, 16), decay_factor=0.2, sink=True, text_tokens=16, variant=settings["variant"],
                       block_size=16, blocks=(16, 16))  # fmt: skip
        assert entry["block_density"] == round(built.block_density, 5)
        assert entry["summary"]["ideal_speedup"] == round(1 / built.block_density, 3)
    assert [entry["name"] for entry in record["patterns"]] == ["radial-official", "radial-spatial"]
    summary = record["summary"]
    assert summary["best_sdpa"] == "sdpa-math"
    dense = {name: rows[name]["ms"] for name in ("sdpa-math", "attnpack-dense")}
    assert summary["best_dense"] == min(dense, key=dense.get)
    for entry in record["patterns"]:
        numbers, ms = entry["summary"], rows[f"attnpack-{entry['name']}"]["ms"]
        assert numbers["sparse_efficiency_vs"] == summary["best_dense"]
        assert numbers["sparse_efficiency"] == round(min(dense.values()) / ms * entry["block_density"], 3)
        assert numbers["speedup_vs_attnpack_dense"] == round(dense["attnpack-dense"] / ms, 3)


def test_image_smoke_geometry_times_clear_with_and_without_pooled_keys(tmp_path):
    path = kernels.run(["tiny-flux"], device="cpu", out=tmp_path, rep_ms=1)
    (record,) = json.loads(path.read_text())["geometries"]
    patterns = {entry["name"]: entry for entry in record["patterns"]}
    assert list(patterns) == ["clear-r4", "clear-r4-down4"]
    assert patterns["clear-r4"]["settings"] == {"radius": 4, "down_factor": None}
    assert patterns["clear-r4-down4"]["settings"] == {"radius": 4, "down_factor": 4}
    assert patterns["clear-r4"]["kv_tokens"] == 272 and patterns["clear-r4-down4"]["kv_tokens"] == 272 + 16
    pooled = clear_window((16, 16), 4, text_tokens=16, down_factor=4, blocks=(16, 16))
    assert patterns["clear-r4-down4"]["block_density"] == round(pooled.block_density, 5)
    rows = {row["implementation"]: row for row in record["rows"]}
    assert {"attnpack-clear-r4", "flex-clear-r4", "attnpack-clear-r4-down4", "flex-clear-r4-down4"} <= set(
        rows
    )
    assert all("ms" in row for row in rows.values())


def test_sparse_efficiency_is_over_the_best_dense_implementation_of_the_run():
    rows = [
        {"implementation": "sdpa-flash", "kind": "sdpa", "ms": 10.0},
        {"implementation": "sdpa-cudnn", "kind": "sdpa", "ms": 8.0},
        {"implementation": "flash-attn-3", "kind": "dense", "ms": 6.0},
        {"implementation": "attnpack-dense", "kind": "dense", "ms": 12.0},
        {"implementation": "flash-attn-3-missing", "kind": "dense", "skipped": "not installed"},
        {"implementation": "attnpack-clear-r16", "kind": "sparse", "pattern": "clear-r16", "ms": 1.5},
        {"implementation": "flex-clear-r16", "kind": "sparse", "pattern": "clear-r16", "ms": 3.0},
    ]
    summary = kernels.summarize(rows)
    assert summary["best_sdpa"] == "sdpa-cudnn"
    assert summary["best_dense"] == "flash-attn-3" and summary["best_dense_ms"] == 6.0
    assert summary["attnpack-dense_speedup_vs_best_dense"] == 0.5
    pattern = {"name": "clear-r16", "block_density": 0.2}
    numbers = kernels.summarize_pattern(rows, pattern, summary)
    assert numbers == {
        "ideal_speedup": 5.0,
        "speedup_vs_best_dense": 4.0,
        "sparse_efficiency": 0.8,  # 6 / 1.5 x 0.2, not 12 / 1.5 x 0.2 over attnpack's own dense kernel
        "sparse_efficiency_vs": "flash-attn-3",
        "speedup_vs_attnpack_dense": 8.0,
        "attnpack_vs_flex": 2.0,
    }


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
    assert "attnpack-radial-official" in out and "best dense: sdpa-math" in out and f"wrote {tmp_path}" in out


def test_radial_benchmark_on_the_smoke_models(tmp_path):
    from attnpack.bench import radial

    path = radial.run(["tiny", "tiny-hunyuan"], device="cpu", out=tmp_path, repeats=1)
    result = json.loads(path.read_text())
    assert path.name == "radial-cpu.json" and path.with_suffix(".png").exists()
    assert [m["model"] for m in result["models"]] == ["tiny", "tiny-hunyuan"]
    for record in result["models"]:
        assert set(record["seconds"]) == {"dense", "radial_all_sparse", "radial_sparse_step"}
        assert record["speedup_50_steps"] > 0
        assert record["dense_backend"] == {
            "picked": "sdpa-default",
            "reason": "on cpu: SDPA's default, nothing probed",
        }
    assert result["models"][1]["settings"]["sink"] is False  # the HunyuanVideo preset
    with pytest.raises(ValueError, match="Use --model tiny tiny-hunyuan"):
        radial.run(["wan2.1-14b-720p-81f"], device="cpu", out=tmp_path)


def test_clear_benchmark_on_the_smoke_resolution(tmp_path):
    from attnpack.bench import clear

    path = clear.run(["tiny"], device="cpu", out=tmp_path, rep_ms=5, repeats=1)
    result = json.loads(path.read_text())
    (record,) = result["resolutions"]
    rows = record["op"]["rows"]
    assert [(row["configuration"], row["implementation"]) for row in rows] == [
        ("dense", "sdpa-math"),
        *(
            (label, name)
            for label in ("r3", "r3-down4")
            for name in ("flex-raster (CLEAR's mask)", "flex-tiled", "attnpack-clear")
        ),
    ]
    assert all(row["ms"] > 0 for row in rows)
    for row in rows[1:]:  # every CLEAR row says how CLEAR ran: radius, pooled tokens, keys
        pooled = row["configuration"].endswith("down4")
        assert row["radius"] == 3 and row["down_factor"] == (4 if pooled else None)
        assert row["kv_tokens"] == 272 + (16 if pooled else 0)
    configurations = {c["configuration"]: c for c in record["configurations"]}
    for label, down in (("r3", None), ("r3-down4", 4)):
        entry = configurations[label]
        tiled = clear_window((16, 16), 3, text_tokens=16, down_factor=down, blocks=(16, 16))
        assert entry["down_factor"] == down and entry["element_density"] == round(tiled.element_density, 5)
        ours = next(
            r for r in rows if r["configuration"] == label and r["implementation"] == "attnpack-clear"
        )
        assert ours["block_density"] == round(tiled.block_density, 5)
        assert entry["op"]["attnpack-clear_speedup_vs_best_dense"] == round(rows[0]["ms"] / ours["ms"], 3)
        assert entry["step"]["clear_s"] > 0 and entry["step"]["speedup"] > 0
    assert record["op"]["summary"]["best_dense"] == "sdpa-math"
    assert record["step"]["dense_s"] > 0
    assert record["step"]["dense_backend"]["picked"] == "sdpa-default"  # on a CPU: SDPA's own choice
    assert path.with_suffix(".png").exists()
    with pytest.raises(ValueError, match="Use --resolution tiny"):
        clear.run(["flux-4096"], device="cpu", out=tmp_path)


@pytest.mark.parametrize(
    ("grid", "radius", "text", "down_factor"),
    [((16, 16), 3, 16, None), ((16, 16), 3, 16, 4), ((8, 12), 2.5, 5, 2), ((6, 10), 4, 0, None)],
)
def test_clear_mask_mod_is_clears_mask_token_for_token(grid, radius, text, down_factor):
    from torch.nn.attention.flex_attention import create_mask

    from attnpack.bench.clear import clear_mask_mod

    pattern = clear_window(grid, radius, text_tokens=text, down_factor=down_factor, blocks=(16, 16))
    expected = pattern.to_dense()[0]  # in token order: text, the image in raster order, pooled tokens
    mask_mod = clear_mask_mod(grid, radius, text, down_factor)
    got = create_mask(mask_mod, None, None, pattern.q_len, pattern.kv_len, device="cpu")[0, 0]
    assert got.shape == expected.shape and torch.equal(got, expected)


def test_clear_block_mask_keeps_the_blocks_of_the_raster_mask():
    from attnpack.bench.clear import block_mask_density, clear_block_mask
    from attnpack.patterns import block_counts

    grid, radius, text, down = (16, 16), 3, 16, 4
    mask = clear_block_mask(grid, radius, text, down, torch.device("cpu"), blocks=(32, 32))
    dense = clear_window(grid, radius, text_tokens=text, down_factor=down, blocks=(16, 16)).to_dense()
    assert mask.BLOCK_SIZE == (32, 32) and mask.shape[-2:] == dense.shape[-2:] == (272, 288)
    kept = block_counts(dense, 32, 32)[0] > 0
    assert torch.equal(mask.to_dense()[0, 0].bool(), kept)
    rows = torch.tensor([32] * 8 + [16])
    cols = torch.tensor([32] * 9)
    area = (kept * rows[:, None] * cols[None, :]).sum().item()
    assert block_mask_density(mask, 272, 288) == pytest.approx(area / (272 * 288))


def test_agent_benchmark_on_the_smoke_model(tmp_path):
    from attnpack.bench import agent

    path = agent.run(["tiny"], device="cpu", out=tmp_path, repeats=1)
    result = json.loads(path.read_text())
    assert path.name == "agent-cpu.json" and path.with_suffix(".png").exists()
    (record,) = result["models"]
    assert set(record["seconds"]) == {"dense", "stage1", "stage2"}
    assert record["peak_memory_gib"] == {"dense": None, "stage1": None, "stage2": None}  # CUDA only
    assert record["settings"]["max_downsample"] == 1 and record["speedup_50_steps"] > 0
    assert record["dense_backend"]["picked"] == "sdpa-default"
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
