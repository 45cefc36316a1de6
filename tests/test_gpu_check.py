"""tools/gpu_check.py (`make gpu-check`): stage limits, stopping, the summary, never overwriting, the wheel
choice and the attnpack link tree; the whole CPU rehearsal is the slow test at the end."""

import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


gc = _load()


def make_run(tmp_path: Path, **overrides):
    fields = dict(
        device="cpu",
        python=sys.executable,
        out_dir=tmp_path / "results",
        log_dir=tmp_path / "logs",
        site_dir=tmp_path / "site",
        wheels_dir=tmp_path / "wheels",
    )
    run = gc.Run(**(fields | overrides))
    for folder in (run.out_dir, run.log_dir):
        folder.mkdir(parents=True, exist_ok=True)
    return run


def python_stage(name: str, code: str, budget_s: float):
    """A stage that runs `code` in a fresh Python, as the real stages run their commands."""

    def action(run, limit):
        fields = run.command(name, [sys.executable, "-c", code], limit)
        if fields["timed_out"]:
            raise gc.StageFailed("stopped", fields)
        if fields["returncode"] != 0:
            raise gc.StageFailed(f"exit {fields['returncode']}", fields)
        return fields

    return gc.Stage(name, f"test stage {name}", action, budget_s)


def is_gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")  # a zombie is dead; only its parent's wait is missing


# ---- the plan


@pytest.mark.parametrize("device", gc.DEVICES)
def test_the_limits_fit_in_eight_minutes(device):
    stages = gc.plan(device)
    assert [s.name for s in stages] == list(gc.STAGE_NAMES)
    own = gc.limits(stages, gc.DEFAULT_BUDGET_S)
    assert sum(own) <= gc.DEFAULT_BUDGET_S - gc.SUMMARY_RESERVE_S + 1e-6
    assert gc.DEFAULT_BUDGET_S + 15 <= 8 * 60  # make, the interpreter and the last kill grace fit too
    small = gc.limits(stages, 120)
    assert sum(small) == pytest.approx(120 - gc.SUMMARY_RESERVE_S)
    assert [a / b for a, b in zip(small, own, strict=True)] == pytest.approx([small[0] / own[0]] * len(own))


REGISTRIES = {"kernels": "GEOMETRIES", "clear": "RESOLUTIONS", "agent": "MODELS", "radial": "MODELS",
              "patterns": "ROWS"}  # fmt: skip
SMOKES = {
    "kernels": ("tiny",),
    "clear": "SMOKE",
    "agent": "SMOKE",
    "radial": "SMOKE_MODELS",
    "patterns": "SMOKE",
}
NAME_FLAGS = ("--geometry", "--resolution", "--model")


def names_in(args: list[str]) -> list[str]:
    """The geometry / model / row names in a benchmark's arguments."""
    names, taking = [], True  # the patterns suite takes its rows first, without a flag
    for arg in args:
        if arg.startswith("--"):
            taking = arg in NAME_FLAGS
        elif taking:
            names.append(arg)
    return names


@pytest.mark.parametrize("stage", list(gc.BENCHMARKS))
def test_every_headline_name_is_known_to_its_suite(stage):
    """The benchmarks change under the check; a renamed geometry must fail here, not on the GPU."""
    benchmark = gc.BENCHMARKS[stage]
    suite = importlib.import_module(f"attnpack.bench.{benchmark.suite}")
    known = getattr(suite, REGISTRIES[benchmark.suite])
    smoke = SMOKES[benchmark.suite]
    smoke = smoke if isinstance(smoke, tuple) else getattr(suite, smoke)
    cuda, cpu = names_in(benchmark.args["cuda"]), names_in(benchmark.args["cpu"])
    assert cuda and cpu
    assert all(name in known and name not in smoke for name in cuda), cuda
    assert all(name in smoke for name in cpu), cpu
    assert {a for a in benchmark.args["cuda"] if a.startswith("--")} == {
        a for a in benchmark.args["cpu"] if a.startswith("--")
    }  # the rehearsal passes the same options


# ---- running stages


def test_stages_stop_at_their_limits_and_the_rest_still_run(tmp_path):
    run = make_run(tmp_path)
    pid_file = tmp_path / "grandchild.pid"
    leave_child = (
        "import subprocess, sys; "
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))"
    )
    stages = [
        python_stage("hangs", "import time; time.sleep(60)", 3),
        python_stage(
            "ignores-sigint",
            "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
            "print('started', flush=True); time.sleep(60)",
            3,
        ),
        python_stage("fails", "import sys; print('going wrong'); sys.exit(3)", 5),
        python_stage("leaves-a-child", leave_child, 5),
        gc.Stage("buggy", "a stage whose own code raises", lambda run, limit: {}["missing"], 5),
        python_stage("writes", f"open({str(run.out_dir / 'made.json')!r}, 'w').write('{{}}')", 5),
    ]
    budget = gc.SUMMARY_RESERVE_S + sum(s.budget_s for s in stages)
    began = time.monotonic()
    summary = gc.execute(run, stages, budget)
    assert time.monotonic() - began < 3 + 3 + 5  # both hanging stages stopped at their own 3 s
    status = {r["name"]: r["status"] for r in summary["stages"]}
    assert status == {"hangs": "timeout", "ignores-sigint": "timeout", "fails": "failed",
                      "leaves-a-child": "passed", "buggy": "error", "writes": "passed"}  # fmt: skip
    records = {r["name"]: r for r in summary["stages"]}
    for name in ("hangs", "ignores-sigint"):  # SIGINT, and SIGKILL for the one that ignores it, in time
        assert records[name]["seconds"] <= records[name]["limit_s"] + 0.5
    assert "KeyError" in records["buggy"]["reason"]
    assert records["writes"]["files"] == [gc.relative(run.out_dir / "made.json")]
    assert "going wrong" in gc.repo_path(records["fails"]["log"]).read_text()
    assert not summary["ok"]
    deadline = time.monotonic() + 5
    while not is_gone(int(pid_file.read_text())) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert is_gone(int(pid_file.read_text())), "the stage's leftover process still runs"


def test_time_left_unused_goes_to_later_stages_and_none_is_skipped_early(tmp_path):
    run = make_run(tmp_path)
    stages = [python_stage("quick", "pass", 20), python_stage("next", "pass", 10)]
    summary = gc.execute(run, stages, gc.SUMMARY_RESERVE_S + 30)
    first, second = summary["stages"]
    assert first["limit_s"] == pytest.approx(20, abs=0.5)
    assert second["limit_s"] > 10 + 20 - first["seconds"] - 1  # its own 10 s and what `quick` left
    assert summary["ok"]


def test_the_summary_lists_every_stage_and_nothing_existing_is_replaced(tmp_path, monkeypatch, capsys):
    results, logs, out = tmp_path / "results", tmp_path / "logs", tmp_path / "out"
    results.mkdir()
    taken = {
        results / "gpu-check-cpu.json": "committed summary",
        results / "writes-cpu.png": "committed plot",
    }
    for path, text in taken.items():
        path.write_text(text)

    def writer(run, limit):  # what a benchmark stage does: a JSON + PNG pair, never over a taken name
        path = run.free_path(run.out_dir / "writes-cpu.json", companions=(".png",))
        path.write_text("{}")
        path.with_suffix(".png").write_text("png")
        return {"written": path.name}

    stages = [
        gc.Stage("writes", "writes a result pair", writer, 5),
        python_stage("fails", "raise SystemExit(1)", 5),
        python_stage("passes", "pass", 5),
    ]
    monkeypatch.setattr(gc, "plan", lambda device, names: stages)
    monkeypatch.setenv("OUT", str(out))
    argv = [
        "--device",
        "cpu",
        "--out-dir",
        str(results),
        "--log-dir",
        str(logs),
        "--site-dir",
        str(tmp_path / "s"),
    ]
    assert gc.main(argv) == 1  # one stage failed
    for path, text in taken.items():
        assert path.read_text() == text
    summaries = [p for p in results.glob("gpu-check-cpu-*.json")]
    assert len(summaries) == 1
    summary = json.loads(summaries[0].read_text())
    assert [r["name"] for r in summary["stages"]] == ["writes", "fails", "passes"]
    for record in summary["stages"]:
        assert record["status"] in ("passed", "failed") and record["seconds"] >= 0 and record["limit_s"] > 0
        assert isinstance(record["files"], list)
    written = summary["stages"][0]["written"]
    assert written.startswith("writes-cpu-") and (results / written).exists()
    assert summary["tarball"] and summary["out_copies"]
    copied = sorted(p.name for p in out.iterdir())
    assert 0 < len(copied) <= gc.OUT_FILE_COUNT
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", name) for name in copied)
    assert json.loads((out / summaries[0].name).read_text())["out_copies"]  # $OUT holds the final summary
    with tarfile.open(gc.repo_path(summary["tarball"])) as archive:
        assert any(name.endswith(summaries[0].name) for name in archive.getnames())
    assert "NOT every stage passed" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--device", "tpu"], ["--device", "tpu", "cuda", "cpu"]),
        (["--budget-s", "5"], ["--budget-s 5", "at least"]),
        (["--budget-s", "soon"], ["--budget-s", "soon", "not a number"]),
        (["--stages", "kernels-dense", "warp-drive"], ["--stages warp-drive", "accepted", "radial-step"]),
        (["--install", "some"], ["--install", "some", "missing"]),
    ],
)
def test_bad_arguments_name_the_parameter_and_what_is_accepted(argv, words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gc.parse_args(argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert all(word in error for word in words), error


def test_pytest_counts_from_a_log_when_the_run_was_stopped(tmp_path):
    log = tmp_path / "pytest.log"
    log.write_text(
        "tests/test_a.py::test_one PASSED [ 25%]\ntests/test_a.py::test_two[x] FAILED [ 50%]\n"
        "tests/test_b.py::test_three SKIPPED (needs a CUDA GPU) [ 75%]\ntests/test_b.py::test_four ERROR\n"
    )
    counts = gc.pytest_counts(tmp_path / "absent.xml", log)
    assert (counts["tests"], counts["passed"], counts["failed"], counts["skipped"], counts["errors"]) == (
        4,
        1,
        1,
        1,
        1,
    )


def test_only_modules_with_gpu_tests_are_collected():
    files = gc.gpu_test_files()
    assert "tests/test_block_sparse_kernel.py" in files
    assert "tests/test_app_browser.py" not in files and "tests/test_gpu_check.py" not in files


# ---- install


def make_wheel(folder: Path, name: str, version: str, requires=(), module: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    info = f"{name.replace('-', '_')}-{version}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {line}\n" for line in requires
    )
    files = {
        f"{info}/METADATA": metadata,
        f"{info}/WHEEL": "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    if module:
        files[f"{module}.py"] = "VALUE = 42\n"
    files[f"{info}/RECORD"] = "".join(f"{n},,\n" for n in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as archive:
        for member, text in files.items():
            archive.writestr(member, text)
    return path


def test_only_missing_or_unacceptable_packages_are_chosen(tmp_path):
    wheels = [
        make_wheel(
            tmp_path,
            "attnpack-check-absent",
            "1.0",
            requires=["packaging<2", 'pytest>=999; python_version < "3"'],
        ),
        make_wheel(tmp_path, "pytest", "0.0.1"),  # present in this environment: kept
        make_wheel(tmp_path, "packaging", "1.0"),  # present but too new for the absent one: chosen
    ]
    chosen, reasons, warnings = gc.choose_wheels([gc.Wheel.read(p) for p in wheels], "missing")
    assert [w.name for w in chosen] == ["attnpack-check-absent", "packaging"]
    assert reasons[0] == "missing" and "needs packaging<2" in reasons[1]
    assert any(w.startswith("pytest needs packaging") for w in warnings), warnings  # it is shadowed now
    everything, _, _ = gc.choose_wheels([gc.Wheel.read(p) for p in wheels], "all")
    assert len(everything) == 3


def test_two_wheels_of_one_package_are_refused(tmp_path):
    wheels = [
        gc.Wheel.read(make_wheel(tmp_path / d, "attnpack-check-twice", v))
        for d, v in (("a", "1.0"), ("b", "2.0"))
    ]
    with pytest.raises(gc.StageFailed, match="two wheels of attnpack-check-twice"):
        gc.choose_wheels(wheels, "missing")


def test_install_puts_the_wheels_and_a_linked_attnpack_first_on_the_path(tmp_path):
    run = make_run(tmp_path)
    make_wheel(run.wheels_dir, "attnpack-check-module", "1.0", module="attnpack_check_module")
    record = gc.install_stage(run, 60)
    assert record["installed"] == ["attnpack-check-module==1.0 (missing)"] and record["returncode"] == 0
    code = ("import attnpack, attnpack.kernels, attnpack_check_module, importlib.metadata as m; "
            "print(attnpack.__file__, attnpack.kernels.__file__, m.version('attnpack'))")  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=run.env(), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    package, kernels, version = result.stdout.split()
    assert package == str(run.site_dir / "attnpack" / "__init__.py")
    assert Path(kernels).resolve() == REPO / "kernels" / "__init__.py"
    assert version == gc.pyproject_version()


def test_the_link_tree_has_every_package_pyproject_installs(tmp_path):
    tomllib = pytest.importorskip("tomllib")
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = {k.removeprefix("attnpack."): v for k, v in setuptools["package-dir"].items() if k != "attnpack"}
    assert mapped == gc.PACKAGE_DIRS
    package = gc.link_attnpack(tmp_path)
    for name in setuptools["packages"]:
        assert (tmp_path / name.replace(".", "/")).is_dir(), name
    assert not (tmp_path / "kernels").exists()  # never a top-level `kernels`
    with pytest.raises(gc.StageFailed, match="exists"):
        gc.link_attnpack(tmp_path)
    assert package == tmp_path / "attnpack"


def test_a_wheel_unpacks_without_pip(tmp_path):
    wheel = make_wheel(tmp_path / "w", "attnpack-check-unzip", "1.0", module="attnpack_check_unzip")
    gc.extract_wheel(wheel, tmp_path / "site")
    assert (tmp_path / "site" / "attnpack_check_unzip.py").read_text() == "VALUE = 42\n"


# ---- the whole rehearsal


@pytest.mark.slow
def test_the_cpu_rehearsal_runs_every_stage(tmp_path):
    """`make gpu-check DEVICE=cpu`: every stage at the smoke sizes, about 2.5 minutes on a 2-core CPU."""
    committed = {p: p.stat().st_mtime_ns for p in (REPO / "benchmarks" / "results").iterdir()}
    env = dict(os.environ, OUT=str(tmp_path / "out"))
    argv = [sys.executable, str(SCRIPT), "--device", "cpu", "--log-dir", str(tmp_path / "logs"),
            "--site-dir", str(tmp_path / "site")]  # fmt: skip
    result = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "logs" / "results" / "gpu-check-cpu.json").read_text())
    assert [r["name"] for r in summary["stages"]] == list(gc.STAGE_NAMES)
    assert all(r["status"] == "passed" for r in summary["stages"]), summary["stages"]
    assert summary["pytest"]["tests"] > 0 and summary["wall_s"] < gc.DEFAULT_BUDGET_S
    for name in gc.BENCHMARKS:
        files = {Path(f).name for f in next(r for r in summary["stages"] if r["name"] == name)["files"]}
        assert files == {f"{name}-cpu.json", f"{name}-cpu.png"}
    assert 0 < len(list((tmp_path / "out").iterdir())) <= gc.OUT_FILE_COUNT
    assert {p: p.stat().st_mtime_ns for p in (REPO / "benchmarks" / "results").iterdir()} == committed
