"""`attnpack bench patterns` on a CPU: the smoke rows exercise every kind of row, the files and the CLI."""

import json

import pytest

from attnpack.bench import patterns
from attnpack.cli import main


def check_rows(result: dict, names) -> None:
    assert [row["name"] for row in result["rows"]] == list(names)
    for row in result["rows"]:
        assert "error" not in row and "skipped" not in row, row
        assert row["first_s"] > 0 and row["cached_s"] >= 0 and row["peak_mb"] is not None
        assert row["memory_method"] and row["passed"] in (True, False)
        assert set(row["pass"]) == set(row["goals"])
        if row["kind"] in patterns.TEMPORAL_KINDS:
            assert row["dense_io_mb"] > 0 and row["memory_vs_dense_io"] > 0
            assert set(row["goals"]) == {"memory_vs_dense_io"}
            continue
        assert 0 < row["element_density"] <= row["block_density"] <= 1
        assert row["block_to_element"] == pytest.approx(
            row["block_density"] / row["element_density"], rel=1e-3
        )
        blocks = row["blocks"]
        assert 0 < blocks["full"] + blocks["partial"] <= blocks["of"]
        assert row["tokens"]["q"] > 0 and row["tokens"]["kv"] > 0 and row["element_density_s"] >= 0
        assert row["cached_same_object"] is True  # the second build is the cache's pattern
        assert {"first_build_s", "peak_mb", "host_us"} <= set(row["goals"]) and row["host_us"] > 0
        assert ("block_to_element" in row["goals"]) == patterns.ROWS[row["name"]].ratio_goal


def test_smoke_rows_write_json_and_plot(tmp_path):
    path = patterns.run(["tiny"], device="cpu", out=tmp_path, time_limit=0)
    assert path == tmp_path / "patterns-cpu.json" and path.with_suffix(".png").stat().st_size > 1000
    result = json.loads(path.read_text())
    assert result["benchmark"] == "patterns" and result["device"]["type"] == "cpu"
    assert {"torch", "triton", "diffusers", "attnpack"} <= set(result["versions"])
    assert result["goals"]["first_build_s"] == 1.0 and result["goals"]["peak_mb"] == 200
    assert set(patterns.SMOKE) == {row["name"] for row in result["rows"]}
    kinds = {row["kind"] for row in result["rows"]}
    assert kinds == set(patterns.PATTERN_KINDS) | set(patterns.TEMPORAL_KINDS)
    check_rows(result, patterns.SMOKE)
    stand_in = {row["name"]: row.get("note", "") for row in result["rows"]}
    assert (
        "stand-in" in stand_in["tiny-freelong-wan"]
        and "stand-in" not in stand_in["tiny-freelong-animatediff"]
    )
    assert "| tiny-radial-spatial |" in "\n".join(patterns.table(result))


def test_refuses_to_overwrite(tmp_path):
    patterns.run(["tiny-clear"], device="cpu", out=tmp_path, time_limit=0)
    before = (tmp_path / "patterns-cpu.json").read_text()
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        patterns.run(["tiny-clear"], device="cpu", out=tmp_path, time_limit=0)
    assert (tmp_path / "patterns-cpu.json").read_text() == before
    patterns.run(["tiny-clear"], device="cpu", out=tmp_path, time_limit=0, overwrite=True)


def test_cli_prints_a_table_and_keeps_results(tmp_path, capsys):
    argv = ["bench", "patterns", "tiny-clear", "tiny-trajectory-*", "tiny-freenoise-animatediff",
            "--device", "cpu", "--out", str(tmp_path), "--time-limit", "0"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| tiny-trajectory-cross |" in out and "goals: first build < 1.0 s" in out
    assert f"wrote {tmp_path / 'patterns-cpu.json'}" in out
    result = json.loads((tmp_path / "patterns-cpu.json").read_text())
    check_rows(
        result, ["tiny-clear", "tiny-trajectory-self", "tiny-trajectory-cross", "tiny-freenoise-animatediff"]
    )
    assert main(argv) == 2  # the result is there: not overwritten
    assert "pass --overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0


def test_bad_arguments(tmp_path, capsys):
    with pytest.raises(ValueError, match="row 'wan-9000' is not known"):
        patterns.run(["wan-9000"], device="cpu", out=tmp_path)
    with pytest.raises(ValueError, match="time_limit=-1"):
        patterns.run(["tiny-clear"], device="cpu", out=tmp_path, time_limit=-1)
    assert main(["bench", "patterns", "nothing-like-this", "--device", "cpu", "--out", str(tmp_path)]) == 2
    assert "is not known" in capsys.readouterr().err
    assert patterns.select(["clear-r16-flux-1024", "clear-*-4096*"]) == [
        "clear-r16-flux-1024", "clear-r16-flux-4096", "clear-r16-flux-4096-down4"
    ]  # fmt: skip
    assert set(patterns.select(["tiny"])) == set(patterns.SMOKE)


@pytest.mark.slow
def test_rows_in_their_own_processes_under_a_time_limit(tmp_path):
    """The default way: one process per row; a row past the limit is recorded as skipped, with what it had
    measured by then. (The process server imports attnpack once, ~10 s; a second run reuses it.)"""
    names = ["tiny-clear", "tiny-freelong-wan"]
    path = patterns.run(names, device="cpu", out=tmp_path / "a.json", time_limit=60)
    check_rows(json.loads(path.read_text()), names)
    path = patterns.run(["clear-r16-flux-4096-down4"], device="cpu", out=tmp_path / "b.json", time_limit=0.05)
    (slow,) = json.loads(path.read_text())["rows"]
    assert slow["skipped"] == "over the 0.05 s limit" and slow["row_wall_s"] < 5
    assert "first_s" not in slow and slow["passed"] is False and slow["pass"]["first_build_s"] is False
