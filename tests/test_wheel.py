"""The wheel: everything under the attnpack namespace (the shipped toy models too), nothing top-level besides
it, importable elsewhere."""

import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Source folders and the namespace each is installed as (the card's folders through links in attnpack/).
SOURCE_PACKAGES = {
    "attnpack": "attnpack",
    "kernels": "attnpack.kernels",
    "pipelines": "attnpack.pipelines",
    "app": "attnpack.app",
}


def source_packages() -> set[str]:
    found = set()
    for folder, namespace in SOURCE_PACKAGES.items():
        for init in (REPO / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(REPO / folder).parts
            found.add(".".join((namespace, *parts)))
    return found


@pytest.mark.slow
def test_wheel_in_a_clean_venv(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(dist),
            str(REPO),
        ],
        check=True,
    )
    (wheel,) = dist.glob("attnpack-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    assert top_level == {"attnpack", wheel.name.split("-py")[0] + ".dist-info"}, top_level
    packaged = {
        name[: -len("/__init__.py")].replace("/", ".") for name in names if name.endswith("/__init__.py")
    }
    assert packaged == source_packages(), "pyproject's package list and the source folders disagree"
    shipped = [p.relative_to(REPO).as_posix() for p in (REPO / "assets").glob("toy-*/**/*") if p.is_file()]
    assert shipped and {f"attnpack/{name}" for name in shipped} <= set(names), "the toy models must travel"

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True)
    # The dependencies come from the test's own environment through a .pth line. Such a path is only
    # appended to sys.path: .pth files inside it (this checkout's editable install) are not run.
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    borrowed = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(site, "borrowed-dependencies.pth").write_text("\n".join(sorted(borrowed)) + "\n")

    check = textwrap.dedent(
        f"""
        import importlib, importlib.metadata, importlib.util
        from packaging.requirements import Requirement
        from packaging.version import Version

        packages = {sorted(source_packages())!r}
        for name in packages:
            module = importlib.import_module(name)
            assert module.__file__.startswith({site!r}), (name, module.__file__)
        for top in ("kernels", "pipelines", "app"):  # Hugging Face's kernels may be installed, not ours
            spec = importlib.util.find_spec(top)
            ours = ({site!r} + "/" + top, {str(REPO)!r} + "/" + top)
            assert spec is None or not spec.origin.startswith(ours), (top, spec.origin)
        for line in importlib.metadata.requires("attnpack"):
            requirement = Requirement(line)
            if requirement.marker is not None and not requirement.marker.evaluate({{"extra": ""}}):
                continue
            installed = Version(importlib.metadata.version(requirement.name))
            assert requirement.specifier.contains(installed, prereleases=True), (line, installed)
        import attnpack
        assert attnpack.__version__ == importlib.metadata.version("attnpack")
        print("ok", len(packages))
        """
    )
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    result = subprocess.run([python, "-c", check], cwd=outside, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("ok")
    info = subprocess.run([venv / "bin" / "attnpack", "info"], cwd=outside, capture_output=True, text=True)
    assert info.returncode == 0 and "kernel backends:" in info.stdout, info.stderr[-3000:]
