"""`make gpu-check`: everything a borrowed CUDA machine should run, in one command, in under 8 minutes.

On a bare machine (Python with torch, triton and transformers; no diffusers, no network) it:

1. installs what is missing from the wheels in `.whl/` (`make gpu-wheels` fetches them) into a fresh
   folder on PYTHONPATH, and makes attnpack importable from this checkout;
2. checks the imports and the device;
3. runs `pytest -m gpu`, keeping its log and JUnit XML;
4. runs the benchmarks at their headline geometries only, each writing JSON + PNG named after the device;
5. writes a summary, `gpu-check-<device>.json` (every stage's status, seconds, files, pytest counts), and
   copies the results to $OUT when it is set (the device tool brings back only what lies there).

Every stage runs in its own process group under its own time limit: a stage that fails or hangs is
stopped and the next one starts, and the limits add up to less than --budget-s, so the whole run ends in
time whatever happens. Time a stage does not use goes to the later ones. Nothing existing is replaced:
a result name that is taken gets the run's time stamp.

`--device cpu` rehearses the same run at the smoke geometries (the benchmarks' `tiny` sizes), writing into
an ignored folder, never into benchmarks/results.

Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import email.parser
import functools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ElementTree
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEVICES = ("cuda", "cpu")
DEFAULT_BUDGET_S = 460.0  # 8 minutes less the time make and the interpreter take to start
SUMMARY_RESERVE_S = 10.0  # kept back from the stages for the summary, the tarball and the copies to $OUT
MIN_STAGE_S = 5.0  # --budget-s must allow this much per stage
KILL_GRACE_S = 5.0  # after SIGINT (pytest still writes its JUnit XML), before SIGKILL
OUT_FILE_LIMIT = 16 * 2**20  # what the device tool brings back from $OUT: 8 files of at most 16 MiB
OUT_FILE_COUNT = 8
INSTALL_MODES = ("missing", "all", "none")

# pyproject.toml's [tool.setuptools.package-dir]: folders installed inside the attnpack package that attnpack/
# does not link itself (kernels/, pipelines/ and app/ are links there). The link tree (link_attnpack) rebuilds
# that layout on a machine where attnpack is not installed, without putting the checkout itself on sys.path
# (its `kernels/` would shadow Hugging Face's `kernels` package).
PACKAGE_DIRS = {"assets": "assets"}

# What the probe imports and reports; torch, diffusers and attnpack (with its kernels) are needed by every
# later stage, the rest by some.
PROBE = r"""
import json, sys
report = {"python": sys.version.split()[0], "versions": {}, "missing": []}
for name in ("torch", "diffusers", "attnpack", "attnpack.kernels", "triton", "transformers", "numpy",
             "PIL", "matplotlib", "pytest", "xdist", "safetensors", "tokenizers", "huggingface_hub"):
    try:
        module = __import__(name, fromlist=["_"])
        report["versions"][name] = str(getattr(module, "__version__", "")) or None
        if name == "attnpack":
            report["attnpack_file"] = module.__file__
    except Exception as error:
        report["missing"].append(f"{name}: {type(error).__name__}: {str(error)[:200]}")
try:
    import torch
    from attnpack.environment import device_info, device_slug
    device = sys.argv[1]
    report["cuda_available"] = torch.cuda.is_available()
    if device != "cuda" or torch.cuda.is_available():
        report["device"] = device_info(device)
        report["slug"] = device_slug(report["device"])
except Exception as error:
    report["missing"].append(f"device: {type(error).__name__}: {str(error)[:200]}")
print("PROBE " + json.dumps(report))
"""


def bench_args(suite: str, *args: str) -> list[str]:
    return ["-m", "attnpack.cli", "bench", suite, *args]


@dataclass(frozen=True)
class Benchmark:
    """A headline benchmark: the same suite on both devices, real geometries on CUDA, smoke ones on a CPU."""

    description: str
    suite: str
    args: dict[str, list[str]]  # per device, before --device and --out


# The headline geometries. Token counts: FLUX 2048² = 512 text + 128² = 16,896; Wan 1.3B 480p = 32,760;
# Wan 14B 720p = 75,600; FLUX 4096² = 66,048.
BENCHMARKS = {
    "kernels-dense": Benchmark(
        "dense kernel against the best SDPA backend, d128 at 16.9k (FLUX 2048²) and 32.8k (Wan 1.3B 480p) "
        "tokens",
        "kernels",
        {"cuda": ["--geometry", "flux-2048", "wan2.1-1.3b-480p-81f"], "cpu": ["--geometry", "tiny"]},
    ),
    "kernels-sparse": Benchmark(
        "block-sparse kernel against FlexAttention on the same block mask, Wan 14B 720p (75.6k tokens, "
        "radial official and spatial with the Wan 2.1 preset)",
        "kernels",
        {"cuda": ["--geometry", "wan2.1-14b-720p-81f"], "cpu": ["--geometry", "tiny"]},
    ),
    "clear-op": Benchmark(
        "CLEAR r16 at FLUX 4096² (66k tokens): attnpack against FlexAttention on the same tiled mask and on "
        "CLEAR's raster mask, the op only",
        "clear",
        {"cuda": ["--resolution", "flux-4096", "--no-steps"], "cpu": ["--resolution", "tiny", "--no-steps"]},
    ),
    "agent-step": Benchmark(
        "AgentSD: one full-size SD 1.5 UNet step at 512², dense against stages 1 and 2",
        "agent",
        {"cuda": ["--model", "sd1.5-512", "--repeats", "3"], "cpu": ["--model", "tiny", "--repeats", "1"]},
    ),
    "patterns": Benchmark(
        "pattern builds at real size on the device: radial Wan 14B 720p, CLEAR FLUX 4096², isolation SDXL",
        "patterns",
        {
            "cuda": [
                "radial-official-wan2.1-14b-720p-81f",
                "clear-r16-flux-4096",
                "isolation-sdxl-1024-64x64",
                "--time-limit",
                "20",
            ],
            "cpu": ["tiny-radial-official", "tiny-clear", "--time-limit", "20"],
        },
    ),
    "clear-step": Benchmark(
        "CLEAR: one full-size FLUX transformer step at 2048², dense against CLEAR (and the op at 2048²)",
        "clear",
        {
            "cuda": ["--resolution", "flux-2048", "--repeats", "1"],
            "cpu": ["--resolution", "tiny", "--repeats", "1"],
        },
    ),
    "radial-step": Benchmark(
        "radial: one full-size Wan 2.1 14B transformer step at 720p 81 frames, dense against radial",
        "radial",
        {
            "cuda": ["--model", "wan2.1-14b-720p-81f", "--repeats", "1"],
            "cpu": ["--model", "tiny", "--repeats", "1"],
        },
    ),
}

# Each stage's own time limit in seconds, per device; scaled down together when --budget-s is smaller.
# CUDA: guesses for a fresh H100 / H200 (cold Triton and Inductor caches); the summary records the real
# seconds to tune them by. The slow steps come last, where unused time from earlier stages adds up.
STAGE_BUDGETS = {
    "install": {"cuda": 20, "cpu": 20},
    "probe": {"cuda": 25, "cpu": 30},
    "pytest": {"cuda": 85, "cpu": 60},
    "kernels-dense": {"cuda": 50, "cpu": 45},
    "kernels-sparse": {"cuda": 40, "cpu": 45},
    "clear-op": {"cuda": 40, "cpu": 45},
    "agent-step": {"cuda": 30, "cpu": 50},
    "patterns": {"cuda": 35, "cpu": 50},
    "clear-step": {"cuda": 40, "cpu": 45},
    "radial-step": {"cuda": 85, "cpu": 45},
}
STAGE_NAMES = tuple(STAGE_BUDGETS)


def utc_stamp() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def free_path(path: Path, stamp: str, companions: tuple[str, ...] = ()) -> Path:
    """`path`, or, when it (or a companion suffix of it, like the PNG beside a JSON) exists, the same name
    with the run's time stamp: a check never replaces a file."""
    for n in range(100):
        tail = "" if n == 0 else f"-{stamp}" if n == 1 else f"-{stamp}-{n}"
        candidate = path.with_name(f"{path.stem}{tail}{path.suffix}")
        if not any(candidate.with_suffix(s).exists() for s in (candidate.suffix, *companions)):
            return candidate
    raise FileExistsError(f"{path}: every time-stamped variant exists too")


class StageFailed(Exception):
    """A stage's own failure, with the reason the summary shows."""


@dataclass
class Run:
    """One gpu-check run: where it reads and writes, and what the stages found out."""

    device: str
    python: str
    out_dir: Path
    log_dir: Path
    site_dir: Path
    wheels_dir: Path
    install: str = "missing"
    stamp: str = field(default_factory=utc_stamp)
    slug: str | None = None
    device_info: dict[str, Any] | None = None
    probed: dict[str, Any] = field(default_factory=dict)  # the probe's report
    written: list[Path] = field(default_factory=list)

    @property
    def name(self) -> str:
        """The device's file-name form: the probe's device slug, else the requested device."""
        return self.slug or self.device

    def env(self) -> dict[str, str]:
        """The stages' environment: the installed wheels first on the path, nothing from the Hub."""
        env = dict(os.environ)
        paths = [str(self.site_dir), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
        env.update(
            PYTHONPATH=os.pathsep.join(dict.fromkeys(paths)),
            HF_HUB_OFFLINE="1",
            MPLBACKEND="Agg",
            PYTHONUNBUFFERED="1",  # a stopped stage's log still has everything it printed
            # No checkout on sys.path for `python -m` / `-c` in it: its attnpack/ lacks assets/ (pyproject's
            # package-dir puts it there on install) and its top-level kernels/ would shadow Hugging Face's.
            PYTHONSAFEPATH="1",
            TQDM_DISABLE="1",  # progress bars would fill the logs
        )
        return env

    def free_path(self, path: Path, companions: tuple[str, ...] = ()) -> Path:
        return free_path(path, self.stamp, companions)

    def command(self, name: str, argv: list[str], limit_s: float) -> dict[str, Any]:
        """Run `argv` in its own process group with its output in the stage's log; stop it at `limit_s`
        (SIGINT, then SIGKILL after a grace). Returns the record fields: returncode, timed_out, log."""
        log_path = self.free_path(self.log_dir / f"{name}-{self.name}.log")
        grace = min(KILL_GRACE_S, limit_s / 4)
        with open(log_path, "wb") as log:
            # The probe's code would fill the header: long arguments are shown by their length.
            shown = [arg if len(arg) < 300 else f"<{len(arg)} characters>" for arg in argv]
            log.write(f"$ {shlex.join(shown)}\n# limit {limit_s:.0f} s\n".encode())
            log.flush()
            process = subprocess.Popen(
                argv, cwd=REPO, env=self.env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
            timed_out = False
            try:
                returncode = process.wait(timeout=max(0.1, limit_s - grace))
            except subprocess.TimeoutExpired:
                timed_out = True
                returncode = stop(process, grace)
            except BaseException:  # interrupted from outside: leave nothing running
                stop(process, grace)
                raise
            finally:
                # Whatever the stage started and left behind (the patterns benchmark's row processes).
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signal.SIGKILL)
        self.written.append(log_path)
        return {"returncode": returncode, "timed_out": timed_out, "log": relative(log_path)}


def stop(process: subprocess.Popen, grace: float) -> int:
    """SIGINT to the process group, SIGKILL after `grace` seconds; returns the exit status."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGINT)
    try:
        return process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        return process.wait()


def repo_path(text: str) -> Path:
    """A path the summary holds (relative to the checkout when inside it) as a Path."""
    return Path(text) if Path(text).is_absolute() else REPO / text


def relative(path: Path) -> str:
    path = Path(path).absolute()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def files_in(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()} if folder.exists() else set()


# ---- install


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class Wheel:
    path: Path
    name: str  # canonical distribution name
    version: str
    requires: tuple[str, ...]  # Requires-Dist lines

    @classmethod
    def read(cls, path: Path) -> Wheel:
        parts = path.name[: -len(".whl")].split("-")
        if len(parts) < 5:
            raise StageFailed(f"{path.name} is not a wheel file name (name-version-python-abi-platform.whl)")
        with zipfile.ZipFile(path) as archive:
            metadata = next((n for n in archive.namelist() if n.endswith(".dist-info/METADATA")), None)
            if metadata is None:
                raise StageFailed(f"{path.name} has no .dist-info/METADATA")
            headers = email.parser.Parser().parsestr(archive.read(metadata).decode("utf-8", "replace"))
        return cls(path, canonical(parts[0]), parts[1], tuple(headers.get_all("Requires-Dist") or ()))


def installed_version(name: str) -> str | None:
    import importlib.metadata

    for spelling in dict.fromkeys((name, name.replace("-", "_"))):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(spelling)
    return None


def requirement_class(wheels: list[Wheel]):
    """packaging's Requirement: the interpreter's, pip's copy, or the one among the wheels; None if none."""
    with contextlib.suppress(ImportError):
        from packaging.requirements import Requirement

        return Requirement
    with contextlib.suppress(ImportError):
        from pip._vendor.packaging.requirements import Requirement

        return Requirement
    for wheel in wheels:
        if wheel.name == "packaging":
            sys.path.append(str(wheel.path))  # a pure-python wheel imports straight from its zip
            with contextlib.suppress(ImportError):
                from packaging.requirements import Requirement

                return Requirement
    return None


def choose_wheels(wheels: list[Wheel], mode: str) -> tuple[list[Wheel], list[str], list[str]]:
    """Which wheels to install: all of them, or (`missing`) those whose distribution is absent or too old or
    new for another chosen wheel. Keeping what the machine has keeps its transformers' own pins intact.
    Returns (chosen, one reason per chosen, warnings)."""
    by_name: dict[str, Wheel] = {}
    for wheel in wheels:
        if wheel.name in by_name:
            raise StageFailed(
                f"two wheels of {wheel.name} in {wheel.path.parent}: {by_name[wheel.name].path.name} and "
                f"{wheel.path.name}; keep one (make gpu-wheels fetches the list afresh)"
            )
        by_name[wheel.name] = wheel
    if mode == "all":
        return list(by_name.values()), ["--install all"] * len(by_name), []
    present = {name: installed_version(name) for name in by_name}
    chosen = {name: "missing" for name, version in present.items() if version is None}
    warnings: list[str] = []
    requirement = requirement_class(wheels)
    if requirement is None:
        warnings.append("no packaging module: installed versions were not checked against the wheels' needs")
        return [by_name[n] for n in chosen], list(chosen.values()), warnings
    changed = True
    while changed:  # a wheel chosen for a too-old package may itself need a newer one
        changed = False
        for needer in [by_name[n] for n in chosen]:
            for line in needer.requires:
                with contextlib.suppress(Exception):  # an unparsable line: pip would not use it either
                    need = requirement(line)
                    if need.marker is not None and not need.marker.evaluate({"extra": ""}):
                        continue
                    name = canonical(need.name)
                    if name in chosen or name not in by_name or present[name] is None:
                        continue
                    if need.specifier.contains(present[name], prereleases=True):
                        continue
                    if need.specifier.contains(by_name[name].version, prereleases=True):
                        chosen[name] = (
                            f"{present[name]} present; {needer.name} needs {need.name}{need.specifier}"
                        )
                        changed = True
                    else:
                        warnings.append(
                            f"{needer.name} needs {need.name}{need.specifier}: neither the installed "
                            f"{present[name]} nor the wheel's {by_name[name].version}"
                        )
    warnings += shadowed(by_name, chosen, present, requirement)
    return [by_name[n] for n in chosen], list(chosen.values()), list(dict.fromkeys(warnings))


def shadowed(by_name: dict[str, Wheel], chosen: dict[str, str], present: dict, requirement) -> list[str]:
    """Installed packages that pin a version the wheels replace (they come first on the path)."""
    import importlib.metadata

    replaced = {name for name in chosen if present[name] is not None}
    warnings = []
    for dist in importlib.metadata.distributions() if replaced else ():
        for line in dist.requires or ():
            with contextlib.suppress(Exception):
                need = requirement(line)
                name = canonical(need.name)
                if (
                    name in replaced
                    and need.marker is None
                    and not need.specifier.contains(by_name[name].version)
                ):
                    warnings.append(
                        f"{dist.metadata['Name']} needs {need.name}{need.specifier}; the wheel's "
                        f"{by_name[name].version} comes first on the path"
                    )
    return warnings


def extract_wheel(wheel: Path, site: Path) -> None:
    """pip's --target by hand, for a Python without pip: a wheel's files go to the folder as they are, its
    .data/purelib and .data/platlib into it too (scripts and headers are not needed here)."""
    with zipfile.ZipFile(wheel) as archive:
        for member in archive.namelist():
            parts = member.split("/")
            if parts[0].endswith(".data"):
                if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                    continue
                parts = parts[2:]
            target = site.joinpath(*parts)
            if not target.resolve().is_relative_to(site.resolve()):
                raise StageFailed(f"{wheel.name}: {member} would land outside {site}")
            if member.endswith("/"):
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.read(member))


def pyproject_version() -> str:
    match = re.search(r'^version\s*=\s*"([^"]+)"', (REPO / "pyproject.toml").read_text(), re.MULTILINE)
    return match.group(1) if match else "0.0.0"


def link_attnpack(site: Path) -> Path:
    """attnpack as installed, made of links into this checkout: site/attnpack holds a link to each entry of
    attnpack/ (kernels/, pipelines/ and app/ among them) and to the package-dir folders (assets/), plus a dist-info so
    `importlib.metadata.version("attnpack")` answers. Edits to the checkout are live, as with `pip -e`."""
    package = site / "attnpack"
    if package.exists() or package.is_symlink():
        raise StageFailed(f"{package} exists; the check links attnpack into a fresh --site-dir only")
    package.mkdir(parents=True)
    for entry in (REPO / "attnpack").iterdir():
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry)
    for inside, folder in PACKAGE_DIRS.items():
        (package / inside).symlink_to(REPO / folder)
    info = site / f"attnpack-{pyproject_version()}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: attnpack\nVersion: {pyproject_version()}\n")
    return package


def has_pip(python: str, timeout: float) -> bool:
    try:
        return (
            subprocess.run(
                [python, "-m", "pip", "--version"], capture_output=True, timeout=timeout
            ).returncode
            == 0
        )
    except subprocess.TimeoutExpired:
        return False


def install_stage(run: Run, limit_s: float) -> dict[str, Any]:
    """The chosen wheels into the site folder (pip --target, or unzipped without pip), then attnpack."""
    deadline = time.monotonic() + limit_s
    record: dict[str, Any] = {"site_dir": str(run.site_dir), "mode": run.install}
    run.site_dir.mkdir(parents=True, exist_ok=True)
    if run.install != "none":
        wheel_files = sorted(run.wheels_dir.glob("*.whl"))
        chosen, reasons, warnings = choose_wheels([Wheel.read(p) for p in wheel_files], run.install)
        record |= {
            "wheels_dir": relative(run.wheels_dir),
            "wheels": len(wheel_files),
            "installed": [f"{w.name}=={w.version} ({why})" for w, why in zip(chosen, reasons, strict=True)],
            "warnings": warnings,
        }
        if not wheel_files:
            record["note"] = f"no wheels in {relative(run.wheels_dir)} (make gpu-wheels fetches them)"
        if chosen:
            pip = [run.python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                   "--no-cache-dir", "--upgrade", "--target", str(run.site_dir)]  # fmt: skip
            if has_pip(run.python, max(1.0, deadline - time.monotonic())):
                fields = run.command(
                    "install", pip + [str(w.path) for w in chosen], deadline - time.monotonic()
                )
                record |= fields | {"installer": "pip"}
                if fields["timed_out"] or fields["returncode"] != 0:
                    raise StageFailed(f"pip install into {run.site_dir} failed; see {fields['log']}", record)
            else:
                for wheel in chosen:
                    extract_wheel(wheel.path, run.site_dir)
                record["installer"] = "unzip (this Python has no pip)"
    # Always the checkout, through links in the folder that comes first on the path: an attnpack installed
    # on the machine (another version, or none) never stands in for the code under test.
    record["attnpack"] = f"linked: {link_attnpack(run.site_dir)} -> {REPO}"
    if sys.version_info < (3, 11):
        record["warnings"] = [*record.get("warnings", []), "Python < 3.11 ignores PYTHONSAFEPATH: the "
                              "checkout's attnpack/ (without kernels/) comes first on sys.path"]  # fmt: skip
    return record


# ---- probe, pytest, benchmarks


def probe_stage(run: Run, limit_s: float) -> dict[str, Any]:
    fields = run.command("probe", [run.python, "-c", PROBE, run.device], limit_s)
    log = repo_path(fields["log"]).read_text(errors="replace")
    line = next((ln for ln in reversed(log.splitlines()) if ln.startswith("PROBE ")), None)
    if line is None:
        raise StageFailed(
            f"the probe printed no report (timed out: {fields['timed_out']}); see {fields['log']}", fields
        )
    report = json.loads(line.removeprefix("PROBE "))
    run.device_info, run.slug, run.probed = report.get("device"), report.get("slug"), report
    fields |= report
    if run.device == "cuda" and not report.get("cuda_available"):
        raise StageFailed("torch sees no CUDA device", fields)
    needed = [
        m
        for m in report["missing"]
        if m.split(":")[0] in ("torch", "diffusers", "attnpack", "attnpack.kernels")
    ]
    if needed or fields["returncode"] != 0:
        raise StageFailed(f"cannot import: {'; '.join(needed) or 'see the log'}", fields)
    return fields


def gpu_test_files() -> list[str]:
    """The test modules with `gpu` tests. Only those are collected: the others import what the GPU machine
    does not need (gradio, playwright, jsonschema) and would fail collection."""
    return [
        str(path.relative_to(REPO))
        for path in sorted((REPO / "tests").glob("test_*.py"))
        if "mark.gpu" in path.read_text(errors="replace")
    ]


def pytest_counts(junit: Path, log: Path) -> dict[str, int]:
    """tests / passed / failed / errors / skipped: from the JUnit XML, else from the -v log of a run that
    was stopped before it wrote one."""
    if junit.exists():
        with contextlib.suppress(ElementTree.ParseError):
            root = ElementTree.parse(junit).getroot()
            suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
            counts = {
                k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")
            }
            return {
                "tests": counts["tests"],
                "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
                "failed": counts["failures"],
                "errors": counts["errors"],
                "skipped": counts["skipped"],
                "source": "junit",
            }
    text = log.read_text(errors="replace") if log.exists() else ""
    text = text.split("short test summary info")[0]  # its lines repeat the failures
    # A line per test: "tests/t.py::name PASSED [ 5%]"; with pytest-xdist "[gw0] [ 5%] PASSED tests/t.py::name"
    lines = [line for line in text.splitlines() if "::" in line]
    found = {
        k: sum(bool(re.search(rf"\b{k.upper()}\b", line)) for line in lines)
        for k in ("passed", "failed", "error", "skipped")
    }
    return {
        "tests": sum(found.values()),
        "passed": found["passed"],
        "failed": found["failed"],
        "errors": found["error"],
        "skipped": found["skipped"],
        "source": "log (no JUnit XML)",
    }


def pytest_stage(run: Run, limit_s: float) -> dict[str, Any]:
    junit = run.free_path(run.log_dir / f"pytest-{run.name}.xml")
    files = gpu_test_files()
    # -v: one line per test, so a run stopped before it writes the XML can still be counted. With pytest-xdist
    # (the H200 image has it) four processes build the Triton kernels side by side: building is most of the time.
    parallel = ["-n", "4"] if run.device == "cuda" and "xdist" in run.probed.get("versions", {}) else []
    argv = [
        run.python,
        "-m",
        "pytest",
        *["-m", "gpu", "-v", "-p", "no:cacheprovider"],
        f"--junitxml={junit}",
        *parallel,
        *files,
    ]
    fields = run.command("pytest", argv, limit_s)
    log = repo_path(fields["log"])
    if junit.exists():
        run.written.append(junit)
        fields["junit"] = relative(junit)
    fields["pytest"] = pytest_counts(junit, log)
    fields["test_files"] = files
    if fields["timed_out"]:
        raise StageFailed(f"stopped at its {limit_s:.0f} s limit", fields)
    if fields["returncode"] != 0:
        counts = fields["pytest"]
        raise StageFailed(
            f"pytest exit {fields['returncode']}: {counts['failed']} failed, {counts['errors']} errors",
            fields,
        )
    return fields


def bench_stage(name: str, benchmark: Benchmark, run: Run, limit_s: float) -> dict[str, Any]:
    out = run.free_path(run.out_dir / f"{name}-{run.name}.json", companions=(".png",))
    argv = [
        run.python,
        *bench_args(benchmark.suite, *benchmark.args[run.device], "--device", run.device, "--out", str(out)),
    ]
    fields = run.command(name, argv, limit_s)
    if fields["timed_out"]:
        raise StageFailed(f"stopped at its {limit_s:.0f} s limit", fields)
    if fields["returncode"] != 0:
        raise StageFailed(f"exit {fields['returncode']}", fields)
    if not out.exists():
        raise StageFailed(f"exited 0 without writing {relative(out)}", fields)
    return fields


@dataclass(frozen=True)
class Stage:
    name: str
    description: str
    action: Callable[[Run, float], dict[str, Any]]  # (run, time limit) -> the summary's fields
    budget_s: float


def plan(device: str, names: tuple[str, ...] = STAGE_NAMES) -> list[Stage]:
    """The stages `names`, in the run's order, with their unscaled budgets for `device`."""
    actions: dict[str, tuple[str, Callable]] = {
        "install": ("install the missing wheels from .whl/; link attnpack to this checkout", install_stage),
        "probe": ("imports, versions and the device", probe_stage),
        "pytest": ("pytest -m gpu", pytest_stage),
    }
    for name, benchmark in BENCHMARKS.items():
        actions[name] = (benchmark.description, functools.partial(bench_stage, name, benchmark))
    return [
        Stage(n, actions[n][0], actions[n][1], float(STAGE_BUDGETS[n][device]))
        for n in STAGE_NAMES
        if n in names
    ]


def limits(stages: list[Stage], budget_s: float) -> list[float]:
    """Each stage's own limit: its budget, all scaled down together when they do not fit in `budget_s` less
    the summary's reserve."""
    available = budget_s - SUMMARY_RESERVE_S
    scale = min(1.0, available / sum(s.budget_s for s in stages)) if stages else 1.0
    return [s.budget_s * scale for s in stages]


# ---- the run


def execute(run: Run, stages: list[Stage], budget_s: float) -> dict[str, Any]:
    """Run `stages` in order, each under its own limit plus whatever earlier stages left unused (never
    eating into a later stage's own limit). Returns the summary."""
    start = time.monotonic()
    deadline = start + budget_s - SUMMARY_RESERVE_S
    own = limits(stages, budget_s)
    records: list[dict[str, Any]] = []
    interrupted = None
    for index, stage in enumerate(stages):
        limit = deadline - time.monotonic() - sum(own[index + 1 :])
        record: dict[str, Any] = {
            "name": stage.name,
            "description": stage.description,
            "limit_s": round(max(limit, 0), 1),
        }
        before = files_in(run.out_dir)
        began = time.monotonic()
        say(f"[{index + 1}/{len(stages)}] {stage.name}: {stage.description} (limit {max(limit, 0):.0f} s)")
        if interrupted:
            record |= {"status": "skipped", "reason": interrupted}
        elif limit < min(own[index], MIN_STAGE_S) / 2:  # earlier stages overran: too little left to start
            record |= {
                "status": "skipped",
                "reason": f"{max(limit, 0):.1f} s left of --budget-s {budget_s:g}",
            }
        else:
            try:
                record |= stage.action(run, limit)
                record["status"] = "passed"
            except StageFailed as failure:
                record |= (failure.args[1] if len(failure.args) > 1 else {}) | {"reason": failure.args[0]}
                record["status"] = "timeout" if record.get("timed_out") else "failed"
            except KeyboardInterrupt:
                interrupted = "the run was interrupted"
                record |= {"status": "interrupted", "reason": interrupted}
            except Exception as error:  # a bug here or a broken machine: the next stage still runs
                record |= {"status": "error", "reason": f"{type(error).__name__}: {error}"}
        record["seconds"] = round(time.monotonic() - began, 2)
        new = sorted(files_in(run.out_dir) - before)
        run.written += [p for p in new if p not in run.written]
        record["files"] = [relative(p) for p in new]
        records.append(record)
        report_stage(record)
    return {
        "check": "gpu-check",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": run.device,
        "device_name": run.name,
        "device_info": run.device_info,
        "python": run.python,
        "budget_s": budget_s,
        "wall_s": round(time.monotonic() - start, 2),
        "ok": all(r["status"] == "passed" for r in records),
        "pytest": next((r.get("pytest") for r in records if r["name"] == "pytest"), None),
        "out_dir": relative(run.out_dir),
        "log_dir": relative(run.log_dir),
        "site_dir": str(run.site_dir),
        "stages": records,
    }


def say(line: str) -> None:
    print(f"gpu-check: {line}", flush=True)


def report_stage(record: dict[str, Any]) -> None:
    """One line per stage, and the end of its log when it did not pass."""
    detail = ""
    if record.get("pytest"):
        counts = record["pytest"]
        detail = ", ".join(f"{counts[k]} {k}" for k in ("passed", "failed", "errors", "skipped"))
        detail = f": {detail}"
    reason = f" ({record['reason']})" if record.get("reason") else ""
    say(f"    {record['status']} in {record['seconds']:.1f} s{detail}{reason}")
    log = record.get("log")
    if record["status"] != "passed" and log:
        path = repo_path(log)
        tail = path.read_text(errors="replace")[-1500:] if path.exists() else ""
        print("\n".join("      | " + line for line in tail.splitlines()[-15:]), flush=True)


def write_summary(run: Run, summary: dict[str, Any], path: Path | None = None) -> Path:
    path = path or run.free_path(run.out_dir / f"gpu-check-{run.name}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(temporary, path)
    return path


def package(run: Run, summary_path: Path) -> Path:
    """One tarball of everything this run wrote (results, logs, the summary), for $OUT."""
    tarball = run.free_path(run.log_dir / f"gpu-check-{run.name}.tar.gz")
    root = f"gpu-check-{run.name}"
    with tarfile.open(tarball, "w:gz") as archive:
        for path in dict.fromkeys([summary_path, *run.written]):
            if path.exists():
                folder = "results" if path.is_relative_to(run.out_dir) else "logs"
                archive.add(path, arcname=f"{root}/{folder}/{path.name}")
    return tarball


def copy_out(paths: list[Path], out: Path, room: int = OUT_FILE_COUNT) -> tuple[list[str], list[str]]:
    """Copy `paths` into $OUT as the device tool takes them back: at most `room` (of its 8) plain files of at
    most 16 MiB, named with letters, digits and . _ - only. Returns (copied, left out with why)."""
    copied, left = [], []
    out.mkdir(parents=True, exist_ok=True)
    for path in paths:
        name = re.sub(r"[^A-Za-z0-9._-]", "-", path.name)
        if len(copied) >= room:
            left.append(f"{path.name} (more than {room} files)")
        elif not path.exists():
            left.append(f"{path.name} (not written)")
        elif path.stat().st_size > OUT_FILE_LIMIT:
            left.append(f"{path.name} ({path.stat().st_size / 2**20:.1f} MiB: over 16 MiB)")
        else:
            target = out / name
            n = 2
            while target.exists():
                target = out / f"{Path(name).stem}-{n}{Path(name).suffix}"
                n += 1
            shutil.copyfile(path, target)
            copied.append(str(target))
    return copied, left


def finish(run: Run, summary: dict[str, Any]) -> Path:
    """The summary first (it must stand whatever happens next), then the tarball and the copies to $OUT,
    then the summary again with what those did, copied to $OUT last."""
    summary_path = write_summary(run, summary)
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    extras: dict[str, Any] = {}
    try:
        tarball = package(run, summary_path)
        extras["tarball"] = relative(tarball)
        if out is not None:
            pytest_record = next((r for r in summary["stages"] if r["name"] == "pytest"), {})
            logs = [repo_path(pytest_record[key]) for key in ("log", "junit") if pytest_record.get(key)]
            copied, left_out = copy_out([tarball, *logs], out, room=OUT_FILE_COUNT - 1)
            extras |= {"out_copies": [*copied, str(out / summary_path.name)], "out_left_out": left_out}
    except Exception as error:  # the summary already stands
        extras["packaging_error"] = f"{type(error).__name__}: {error}"
    summary |= extras
    write_summary(run, summary, summary_path)
    if out is not None:
        copy_out([summary_path], out)
    return summary_path


def print_summary(summary: dict[str, Any], path: Path) -> None:
    say(f"{'stage':<15} {'status':<12} {'seconds':>8} {'limit':>6}  files")
    for record in summary["stages"]:
        files = ", ".join(Path(f).name for f in record.get("files", [])) or "-"
        status, seconds, limit = record["status"], record["seconds"], record["limit_s"]
        say(f"{record['name']:<15} {status:<12} {seconds:>8.1f} {limit:>6.0f}  {files}")
    verdict = "every stage passed" if summary["ok"] else "NOT every stage passed"
    say(f"{verdict} in {summary['wall_s']:.0f} s of {summary['budget_s']:.0f}; summary {relative(path)}")
    for line in summary.get("out_copies", []):
        say(f"copied to $OUT: {line}")


def positive_budget(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--budget-s {text!r} is not a number of seconds") from None
    least = SUMMARY_RESERVE_S + MIN_STAGE_S * len(STAGE_NAMES)
    if not value >= least:
        raise argparse.ArgumentTypeError(
            f"--budget-s {text}: at least {least:g} seconds ({SUMMARY_RESERVE_S:g} for the summary, "
            f"{MIN_STAGE_S:g} per stage); the default is {DEFAULT_BUDGET_S:g}"
        )
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="tools/gpu_check.py",
        description="Install, test and benchmark attnpack on a CUDA machine in one bounded run.",
    )
    parser.add_argument(
        "--device",
        choices=DEVICES,
        default="cuda",
        help="cuda: the headline geometries; cpu: the same run at the smoke geometries",
    )
    parser.add_argument(
        "--out-dir",
        type=Path,
        help="results and summary (default: benchmarks/results on cuda; on cpu the run's log folder)",
    )
    parser.add_argument(
        "--log-dir",
        type=Path,
        help="logs, JUnit XML, tarball (default: a new test-artifacts/gpu-check-<time>)",
    )
    parser.add_argument(
        "--budget-s",
        type=positive_budget,
        default=DEFAULT_BUDGET_S,
        help=f"the whole run's wall-clock limit in seconds (default {DEFAULT_BUDGET_S:g})",
    )
    parser.add_argument("--wheels", type=Path, default=REPO / ".whl", help="folder of wheels (default .whl)")
    parser.add_argument("--site-dir", type=Path, help="where the wheels go (default: a new folder in /tmp)")
    parser.add_argument(
        "--install",
        choices=INSTALL_MODES,
        default="missing",
        help="missing (default): what this Python lacks or has at a version the wheels do not accept; "
        "all: every wheel, first on the path; none: nothing",
    )
    parser.add_argument(
        "--stages",
        nargs="+",
        metavar="STAGE",
        help=f"only these after install and probe, in the usual order ({', '.join(STAGE_NAMES[2:])})",
    )
    args = parser.parse_args(argv)
    unknown = [name for name in args.stages or () if name not in STAGE_NAMES]
    if unknown:
        parser.error(f"--stages {' '.join(unknown)}: not a stage; accepted: {', '.join(STAGE_NAMES[2:])}")
    return args


def interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stamp = utc_stamp()
    log_dir = (args.log_dir or free_path(REPO / "test-artifacts" / f"gpu-check-{stamp}", stamp)).absolute()
    # The CPU rehearsal writes next to its logs: benchmarks/results holds committed results.
    default_out = REPO / "benchmarks" / "results" if args.device == "cuda" else log_dir / "results"
    run = Run(
        device=args.device,
        python=sys.executable,
        out_dir=(args.out_dir or default_out).absolute(),
        log_dir=log_dir,
        site_dir=(args.site_dir or Path(tempfile.mkdtemp(prefix="attnpack-site-"))).absolute(),
        wheels_dir=args.wheels.absolute(),
        install=args.install,
        stamp=stamp,
    )
    run.log_dir.mkdir(parents=True, exist_ok=True)
    run.out_dir.mkdir(parents=True, exist_ok=True)
    stages = plan(args.device, ("install", "probe", *(args.stages or STAGE_NAMES)))
    say(
        f"{args.device}: {len(stages)} stages in at most {args.budget_s:.0f} s; logs in {relative(run.log_dir)}, "
        f"results in {relative(run.out_dir)}, wheels into {run.site_dir}"
    )
    # SIGTERM (a timeout around make) ends the run the way Ctrl-C does: the summary is still written.
    signal.signal(signal.SIGTERM, interrupt)
    summary = execute(run, stages, args.budget_s)
    path = finish(run, summary)
    print_summary(summary, path)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
