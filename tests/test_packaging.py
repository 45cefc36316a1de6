"""How the card's top-level folders become attnpack.kernels, attnpack.pipelines and attnpack.app: links in
attnpack/ (attnpack/kernels -> ../kernels, ...), so the source tree is the package as installed. Static tools
(mypy, pyright, jedi) and a plain path search resolve them without setuptools' import hook, and Python run
from the repository root imports the same package as from anywhere else."""

import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINKED = ("kernels", "pipelines", "app")  # the card's folders inside the namespace
PROBE = (
    "import attnpack.kernels, attnpack.kernels.block_sparse_attention, attnpack.pipelines.generate, "
    "attnpack.app; print(attnpack.kernels.__file__)"
)


def test_the_card_folders_are_linked_into_the_namespace():
    for name in LINKED:
        link = REPO / "attnpack" / name
        assert link.is_symlink() and os.readlink(link) == f"../{name}", (
            f"attnpack/{name} must link to ../{name}"
        )
        assert link.resolve() == (REPO / name).resolve()


@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(), reason="not a git checkout")
def test_git_keeps_them_as_links():
    listed = subprocess.run(
        ["git", "ls-files", "-s", *(f"attnpack/{name}" for name in LINKED)],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.splitlines()  # fmt: skip
    modes = {line.split()[-1]: line.split()[0] for line in listed}
    if not modes:
        pytest.skip("the links are not committed yet")
    assert modes == {f"attnpack/{name}": "120000" for name in LINKED}, modes


@pytest.mark.parametrize("module", ["attnpack.kernels", "attnpack.kernels.block_sparse_attention",
                                    "attnpack.pipelines.generate", "attnpack.app"])  # fmt: skip
def test_a_plain_path_search_resolves_them(module):
    """What a static tool does: look the dotted name up as folders under a search root, no import hook."""
    folder = REPO.joinpath(*module.split(".")[:-1])
    spec = importlib.machinery.PathFinder.find_spec(module, [str(folder)])
    assert spec is not None and spec.origin is not None, module
    source = REPO / module.split(".")[1] / Path(*module.split(".")[2:])
    expected = source / "__init__.py" if source.is_dir() else source.with_suffix(".py")
    assert Path(spec.origin).resolve() == expected.resolve()


@pytest.mark.parametrize("where", ["repository root", "elsewhere"])
def test_the_interpreter_imports_them_from_anywhere(where, tmp_path):
    """From the repository root, ./attnpack comes first on sys.path: it must be the whole package too."""
    cwd = REPO if where == "repository root" else tmp_path
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    found = Path(result.stdout.strip())
    assert found.as_posix().endswith("attnpack/kernels/__init__.py"), found
    if where == "repository root":
        assert found.resolve() == (REPO / "kernels" / "__init__.py").resolve()


def test_the_source_folders_are_never_top_level_modules(tmp_path):
    """A Hugging Face package named `kernels` exists (transformers installs it) and diffusers imports it when
    it finds one: the install must not provide these names; what finds them is someone else's package."""
    check = (
        "import importlib.util as u, json; "
        "print(json.dumps({n: getattr(u.find_spec(n), 'origin', None) for n in ('kernels', 'pipelines', 'app')}))"
    )
    result = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    for name, origin in json.loads(result.stdout).items():
        ours = (REPO / name / "__init__.py").resolve()
        assert origin is None or Path(origin).resolve() != ours, (name, origin)


def installed_kernels_package(root: Path) -> Path:
    """A stand-in for Hugging Face's `kernels` where site-packages would hold it."""
    (root / "kernels").mkdir(parents=True)
    (root / "kernels" / "__init__.py").write_text("class CUDAProperties:\n    pass\n")
    return root


@pytest.mark.parametrize("installed", [True, False])
def test_a_top_level_import_from_the_repository_root_gets_the_installed_package(installed, tmp_path):
    """From the root, ./kernels shadows the installed `kernels`: it hands the import over (diffusers' and
    transformers' `from kernels import ...`), or fails as a missing package does. Run without site-packages
    (-S), so that the stand-in is the only `kernels` installed, or none is."""
    site = installed_kernels_package(tmp_path / "site") if installed else tmp_path
    probe = (
        "import sys\n"
        "try:\n"
        "    from kernels import CUDAProperties\n"
        "    print(sys.modules['kernels'].__file__)\n"
        "except ModuleNotFoundError as missing:\n"
        "    assert missing.name == 'kernels', missing\n"
        "    print('missing')\n"
        "print(sorted(name for name in sys.modules if name.startswith('kernels')))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    result = subprocess.run(
        [sys.executable, "-S", "-c", probe], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    found, modules = result.stdout.splitlines()
    assert found == (str(site / "kernels" / "__init__.py") if installed else "missing")
    assert modules == ("['kernels']" if installed else "[]")


def test_diffusers_imports_from_the_repository_root():
    """What broke the app in CI: `python -m attnpack.app` from the root with Hugging Face's kernels installed."""
    probe = "import diffusers.loaders.peft, attnpack.pipelines.generate"
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
