"""Which backend runs, for every kernel op: argument, set_backend, environment variable, auto; fallbacks logged
once; errors for bad input; one registry, one interpreter check, no import cycle."""

import ast
import importlib
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kernel_cases import disc2d, empty_rows, inputs, relative_error

import attnpack.kernels as kernels
from attnpack.kernels import block_sparse_attention, dispatch
from attnpack.kernels.block_sparse_attention import resolve_backend

KERNELS_DIR = Path(dispatch.__file__).parent
OPS = (
    "block_sparse_attention",
    "block_sparse_attention_backward",
    "windowed_attention",
    "global_local_attention",
    "best_match",
    "dense_attention",
)
TRITON_OPS = tuple(op for op in OPS if op != "dense_attention")


@pytest.fixture(autouse=True)
def clean_backend(monkeypatch):
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    monkeypatch.setattr(dispatch, "_logged", set())  # each test sees its own first fallback
    kernels.set_backend(None)
    yield
    kernels.set_backend(None)


def attnpack_records(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "attnpack" and text in r.getMessage()]


# ---- every op, through the registry


def _block_sparse_case():
    pattern = disc2d()
    q, k, v = (x.detach() for x in inputs(pattern, head_dim=16))
    return pattern, q, k, v


def op_case(op: str):
    """(run the op with `backend`, the module and name of its Triton entry, of its reference entry)."""
    torch.manual_seed(0)
    if op == "block_sparse_attention":
        pattern, q, k, v = _block_sparse_case()
        return (
            lambda backend=None: block_sparse_attention(q, k, v, pattern, backend=backend),
            ("attnpack.kernels.block_sparse_attention.triton_kernels", "forward"),
            ("attnpack.kernels.block_sparse_attention", "block_sparse_attention_reference"),
        )
    if op == "block_sparse_attention_backward":
        pattern, q, k, v = _block_sparse_case()
        out, lse = block_sparse_attention(q, k, v, pattern, return_lse=True, backend="reference")
        grad = torch.randn_like(q)
        return (
            lambda backend=None: kernels.block_sparse_attention_backward(
                grad, q, k, v, out, lse, pattern, backend=backend
            ),
            ("attnpack.kernels.block_sparse_attention.triton_kernels", "backward"),
            ("attnpack.kernels.block_sparse_attention", "block_sparse_attention_backward_reference"),
        )
    if op == "windowed_attention":
        q, k, v = (torch.randn(2, 8, 2, 16) for _ in range(3))
        windows, weights = [(0, 4), (2, 6), (4, 8)], torch.ones(4)
        return (
            lambda backend=None: kernels.windowed_attention(q, k, v, windows, weights, backend=backend),
            ("attnpack.kernels.temporal_windows.triton_kernel", "windowed_attention_triton"),
            ("attnpack.kernels.temporal_windows", "windowed_attention_reference"),
        )
    if op == "global_local_attention":
        q, k, v = (torch.randn(2, 8, 2, 16) for _ in range(3))
        return (
            lambda backend=None: kernels.global_local_attention(q, k, v, 4, backend=backend),
            ("attnpack.kernels.temporal_windows.global_local", "global_local_attention_triton"),
            ("attnpack.kernels.temporal_windows", "global_local_attention_reference"),
        )
    if op == "best_match":
        src, dst = torch.randn(1, 5, 8), torch.randn(1, 7, 8)
        return (
            lambda backend=None: kernels.best_match(src, dst, backend=backend),
            ("attnpack.kernels.bipartite_match.triton_kernel", "best_match_triton"),
            ("attnpack.kernels.bipartite_match", "best_match_reference"),
        )
    q, k, v = (torch.randn(1, 6, 2, 8) for _ in range(3))
    return (
        lambda backend=None: kernels.dense_attention(q, k, v, backend=backend),
        None,
        ("attnpack.kernels.dense", "dense_attention_reference"),
    )


class StubRan(Exception):
    pass


def spy(monkeypatch, where, *, fail: bool = False) -> list:
    """Record calls of module.name (and run it), or with `fail` raise StubRan instead of running it."""
    module_name, name = where
    module = importlib.import_module(module_name)
    original = getattr(module, name)
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(name)
        if fail:
            raise StubRan(f"{module_name}.{name}")
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


@pytest.mark.parametrize("how", ["set_backend", "use_backend", "environment"])
@pytest.mark.parametrize("op", OPS)
def test_every_op_honours_the_process_wide_reference(op, how, monkeypatch):
    # Auto as on a CUDA machine: it would pick Triton (stubbed to raise), so only the choice keeps it off.
    monkeypatch.setattr(dispatch, "triton_runs_fast", lambda device: None)
    run, triton_entry, reference_entry = op_case(op)
    reference = spy(monkeypatch, reference_entry)
    if triton_entry is not None:
        triton = spy(monkeypatch, triton_entry, fail=True)
        with pytest.raises(StubRan):
            run()
        assert triton == [triton_entry[1]] and reference == []
        triton.clear()
    else:
        run()  # dense: auto is sdpa
        assert reference == []
    if how == "set_backend":
        kernels.set_backend("reference")
        run()
    elif how == "use_backend":
        with kernels.use_backend("reference"):
            run()
    else:
        monkeypatch.setenv(kernels.ENV_VAR, "REFERENCE")
        run()
    assert reference == [reference_entry[1]]
    if triton_entry is not None:
        assert triton == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors through Triton's interpreter (conftest)")
@pytest.mark.parametrize("op", TRITON_OPS)
def test_every_op_runs_triton_when_chosen_and_the_interpreter_is_on(op, monkeypatch):
    assert dispatch.interpreting()
    run, triton_entry, reference_entry = op_case(op)
    expected = run("reference")
    triton = spy(monkeypatch, triton_entry)
    spy(monkeypatch, reference_entry, fail=True)
    kernels.set_backend("triton")
    got = run()
    assert triton == [triton_entry[1]]
    got, expected = ((x,) if isinstance(x, torch.Tensor) else x for x in (got, expected))
    for g, e in zip(got, expected, strict=True):
        assert relative_error(g.float(), e.float()) < 1e-4


@pytest.mark.parametrize("op", OPS)
def test_an_explicit_backend_the_op_lacks_is_an_error(op):
    run, _, _ = op_case(op)
    with pytest.raises(
        ValueError, match=rf"^{op}: backend='xla' is not one of .*'reference'.* \(or 'auto'\)"
    ):
        run("xla")
    if op in ("windowed_attention", "global_local_attention", "best_match", "dense_attention"):
        with pytest.raises(ValueError, match=rf"^{op}: backend='chunked' is not one of"):
            run("chunked")  # another op has it; this one does not


@pytest.mark.parametrize("how", ["set_backend", "environment"])
def test_a_process_wide_backend_the_op_lacks_runs_auto_and_says_so_once(how, monkeypatch, caplog):
    run, _, reference_entry = op_case("best_match")
    reference = spy(monkeypatch, reference_entry)
    if how == "set_backend":
        kernels.set_backend("chunked")
        source = "set_backend"
    else:
        monkeypatch.setenv(kernels.ENV_VAR, "chunked")
        source = kernels.ENV_VAR
    with caplog.at_level(logging.INFO, logger="attnpack"):
        run()
        assert reference == ["best_match_reference"]  # auto on the CPU
        lacks = attnpack_records(caplog, "has no 'chunked' backend")
        assert lacks == [
            f"best_match: has no 'chunked' backend (chosen by {source}; it has 'triton', 'reference'), "
            "running its auto choice 'reference'"
        ]
        caplog.clear()
        run()
    assert reference == ["best_match_reference"] * 2
    assert attnpack_records(caplog, "best_match") == []  # once


def test_dense_attention_runs_sdpa_for_a_process_wide_triton(monkeypatch, caplog):
    run, _, reference_entry = op_case("dense_attention")
    reference = spy(monkeypatch, reference_entry)
    expected = run("reference")
    reference.clear()
    kernels.set_backend("triton")
    with caplog.at_level(logging.INFO, logger="attnpack"):
        got = run()
    assert reference == [] and relative_error(got, expected) < 1e-5
    assert len(attnpack_records(caplog, "dense_attention: has no 'triton' backend")) == 1


def test_a_process_wide_backend_the_op_has_but_cannot_run_is_an_error(monkeypatch):
    q = torch.randn(1, 8, 2, 16)
    kernels.set_backend("triton")
    with pytest.raises(ValueError, match=r"windowed_attention: backend='triton' runs one token per frame"):
        kernels.windowed_attention(q, q, q, [(0, 2)], torch.ones(2), tokens_per_frame=2)
    long = torch.randn(1, 130, 1, 8)
    with pytest.raises(
        ValueError, match=r"global_local_attention: backend='triton' runs at most 128 frames \(got 130\)"
    ):
        kernels.global_local_attention(long, long, long, 4)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"best_match: backend='triton' needs CUDA tensors \(got cpu\)"):
        kernels.best_match(torch.randn(1, 3, 4), torch.randn(1, 3, 4))
    kernels.set_backend("sdpa")
    pattern, q, k, v = _block_sparse_case()
    with pytest.raises(ValueError, match="block_sparse_attention: backend='sdpa' does not return the LSE"):
        block_sparse_attention(q, k, v, pattern, return_lse=True)


def test_an_unknown_environment_value_is_an_error(monkeypatch):
    monkeypatch.setenv(kernels.ENV_VAR, "trtion")
    with pytest.raises(ValueError, match=r"ATTNPACK_KERNEL_BACKEND='trtion' is not one of 'auto', 'triton'"):
        kernels.best_match(torch.randn(1, 3, 4), torch.randn(1, 3, 4))


@pytest.mark.parametrize(
    ("op", "message"),
    [
        (
            "block_sparse_attention",
            "block_sparse_attention: no CUDA device (cpu), running sdpa with the dense mask",
        ),
        (
            "block_sparse_attention_backward",
            "block_sparse_attention_backward: no CUDA device (cpu), running reference with the dense mask",
        ),
        ("windowed_attention", "windowed_attention: no CUDA device (cpu), running the reference"),
        ("global_local_attention", "global_local_attention: no CUDA device (cpu), running the reference"),
        ("best_match", "best_match: no CUDA device (cpu), running the reference"),
    ],
)
def test_auto_off_cuda_says_so_once(op, message, caplog):
    run, _, _ = op_case(op)
    with caplog.at_level(logging.INFO, logger="attnpack"):
        run()
        assert len(attnpack_records(caplog, message)) == 1
        caplog.clear()
        run("auto")
    assert attnpack_records(caplog, op) == []


def test_auto_stays_quiet_where_it_runs_the_fast_path(caplog):
    run, _, _ = op_case("dense_attention")
    with caplog.at_level(logging.INFO, logger="attnpack"):
        run()
    assert attnpack_records(caplog, "dense_attention") == []


def test_auto_rules_of_the_temporal_ops_on_cuda():
    """Resolved without running: Triton on CUDA where its kernel can, else the reference (logged)."""
    cuda = torch.device("cuda")
    windowed, global_local = dispatch.get_op("windowed_attention"), dispatch.get_op("global_local_attention")
    assert windowed.resolve(None, device=cuda, tokens_per_frame=1) == "triton"
    assert windowed.resolve(None, device=cuda, tokens_per_frame=4) == "reference"
    assert global_local.resolve(None, device=cuda, frames=128) == "triton"
    assert global_local.resolve(None, device=cuda, frames=129) == "reference"
    assert dispatch.get_op("best_match").resolve(None, device=cuda) == "triton"


# ---- block sparse: today's rules, through the registry


def test_auto_runs_sdpa_or_the_reference_on_cpu_and_says_so_once(caplog):
    with caplog.at_level(logging.INFO, logger="attnpack"):
        assert resolve_backend(None, torch.device("cpu")) == "sdpa"
        assert resolve_backend("auto", torch.device("cpu")) == "sdpa"
        assert resolve_backend("auto", torch.device("cpu"), need_lse=True) == "reference"
    messages = [r.message for r in caplog.records if "no CUDA device" in r.message]
    assert len(messages) == 2 and "sdpa with the dense mask" in messages[0]
    assert resolve_backend(None, torch.device("cuda")) == "triton"


def test_precedence(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv(kernels.ENV_VAR, "flex")
    assert resolve_backend(None, cpu) == "flex"
    with kernels.use_backend("sdpa"):
        assert resolve_backend(None, cpu) == "sdpa"
        assert resolve_backend("reference", cpu) == "reference"  # the call's own choice wins
    assert kernels.current_backend() == "flex"
    assert kernels.set_backend("Reference") is None
    assert resolve_backend(None, cpu) == "reference"


def test_bad_backend_names(monkeypatch):
    with pytest.raises(ValueError, match=r"set_backend: name='cuda' is not one of 'auto', ") as error:
        kernels.set_backend("cuda")
    for name in ("triton", "reference", "flex", "sdpa", "chunked"):  # every op's backends
        assert repr(name) in str(error.value)
    with pytest.raises(ValueError, match=r"set_backend: name=3 is not a backend name"):
        kernels.set_backend(3)
    with pytest.raises(ValueError, match=r"backend='xla' is not one of"):
        resolve_backend("xla", torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(
        ValueError, match=r"backend='triton' needs CUDA tensors \(got cpu\); set TRITON_INTERPRET=1"
    ):
        resolve_backend("triton", torch.device("cpu"))


def test_set_backend_takes_a_name_only_one_op_has():
    assert set(dispatch.backend_names()) == {"auto", "triton", "reference", "flex", "sdpa", "chunked"}
    kernels.set_backend("chunked")  # block sparse only: still a valid process-wide choice
    assert kernels.current_backend() == "chunked"
    assert resolve_backend(None, torch.device("cpu")) == "chunked"


def test_comparison_backends_agree_with_the_reference():
    pattern = empty_rows()
    q, k, v = (x.detach() for x in inputs(pattern))
    expected, expected_lse = block_sparse_attention(q, k, v, pattern, backend="reference", return_lse=True)
    flex, flex_lse = block_sparse_attention(q, k, v, pattern, backend="flex", return_lse=True)
    sdpa = block_sparse_attention(q, k, v, pattern, backend="sdpa")
    assert relative_error(flex, expected) < 1e-5 and relative_error(sdpa, expected) < 1e-5
    finite = torch.isfinite(expected_lse)
    assert torch.allclose(flex_lse[finite], expected_lse[finite], atol=1e-4)
    with pytest.raises(ValueError, match="backend='sdpa' does not return the LSE"):
        block_sparse_attention(q, k, v, pattern, backend="sdpa", return_lse=True)


def test_reference_gradients_are_finite_with_empty_rows():
    pattern = empty_rows()
    q, k, v = inputs(pattern)
    block_sparse_attention(q, k, v, pattern, backend="reference").sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda q, k, v: (q[0], k, v), r"q, k, v must be \(B, S, H, D\)"),
        (lambda q, k, v: (q.half(), k, v), r"must share one dtype of float16, bfloat16, float32"),
        (lambda q, k, v: (q.double(), k.double(), v.double()), r"must share one dtype"),
        (lambda q, k, v: (q, k[:, :-1], v), r"k and v must be equal"),
        (
            lambda q, k, v: (q[:, :-1], k, v),
            r"the pattern is for 59 queries x 59 keys; q has 58 tokens and k 59",
        ),
        (lambda q, k, v: (q[..., :1, :], k[..., :1, :], v[..., :1, :]), None),
    ],
)
def test_input_errors(change, message):
    pattern = disc2d()
    q, k, v = change(*(x.detach() for x in inputs(pattern)))
    if message is None:  # one head is fine
        block_sparse_attention(q, k, v, pattern)
        return
    with pytest.raises(ValueError, match=message):
        block_sparse_attention(q, k, v, pattern)


def test_heads_must_split_into_groups():
    from kernel_cases import head_groups

    pattern = head_groups()
    q, k, v = (x.detach() for x in inputs(pattern, heads=3))
    with pytest.raises(ValueError, match="3 heads do not split into the pattern's 2 head groups"):
        block_sparse_attention(q, k, v, pattern)


# ---- the registry listing, the interpreter check, the imports


def test_registry_lists_every_op_and_what_runs_here(monkeypatch):
    listing = kernels.registry()
    assert set(listing) == set(OPS)
    for op, rows in listing.items():
        names = [row.name for row in rows]
        assert names[0] == "auto" and names[1:] == list(dispatch.get_op(op).names)
        found = {row.name: row for row in rows}
        assert found["reference"].available
        if "triton" in found:
            assert found["triton"].available == (torch.cuda.is_available() or dispatch.interpreting())
    assert [row.name for row in listing["block_sparse_attention"]] == [
        "auto", "triton", "reference", "flex", "sdpa", "chunked"
    ]  # fmt: skip
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        triton = {row.name: row for row in kernels.registry()["best_match"]}["triton"]
        assert not triton.available and "no CUDA GPU" in triton.detail
    assert {backend.name for backend in kernels.backends()} >= {"triton", "sdpa"}  # `attnpack info`


def test_one_interpreter_check(monkeypatch):
    checks = re.compile(
        r"""environ(\.get)?\s*[\[(]\s*["']TRITON_INTERPRET|runtime\.interpret|def _?interpreting"""
    )
    offenders = [
        f"{path.relative_to(KERNELS_DIR)}:{number}"
        for path in sorted(KERNELS_DIR.rglob("*.py"))
        if path.name != "dispatch.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if checks.search(line)
    ]
    assert offenders == []
    assert len(re.findall(r"^def interpreting\(", (KERNELS_DIR / "dispatch.py").read_text(), re.M)) == 1
    for module in (
        "attnpack.kernels.block_sparse_attention.triton_kernels",
        "attnpack.kernels.temporal_windows.triton_kernel",
        "attnpack.kernels.temporal_windows.global_local",
        "attnpack.kernels.bipartite_match.triton_kernel",
    ):
        assert importlib.import_module(module).interpreting is dispatch.interpreting
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not dispatch.interpreting()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.interpreting()


def test_dispatch_and_backend_import_no_op():
    """The ops import dispatch, never the other way round: no cycle."""
    for name in ("dispatch.py", "backend.py"):
        tree = ast.parse((KERNELS_DIR / name).read_text())
        relative = [
            node.module or "."
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.level > 0
        ]
        assert relative == ([] if name == "dispatch.py" else ["dispatch"])


@pytest.mark.parametrize(
    "first",
    ["attnpack.kernels.dispatch", "attnpack.kernels.backend", "attnpack.kernels.block_sparse_attention"],
)
def test_imports_in_a_fresh_process(first, tmp_path):
    code = (
        f"import {first}\n"
        "import attnpack.kernels as k\n"
        "assert k.set_backend('chunked') is None and k.current_backend() == 'chunked'\n"
        "assert set(k.registry()) == {'block_sparse_attention', 'block_sparse_attention_backward',"
        " 'windowed_attention', 'global_local_attention', 'best_match', 'dense_attention'}\n"
    )
    # Outside the checkout: there `attnpack` would be the bare source folder, without `kernels`.
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
