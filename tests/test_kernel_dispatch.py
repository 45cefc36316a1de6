"""Which backend runs: argument, set_backend, environment variable, auto; and errors for bad input."""

import logging

import pytest
import torch
from kernel_cases import disc2d, empty_rows, inputs, relative_error

import attnpack.kernels as kernels
from attnpack.kernels import block_sparse_attention
from attnpack.kernels.block_sparse_attention import resolve_backend


@pytest.fixture(autouse=True)
def clean_backend(monkeypatch):
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    kernels.set_backend(None)
    yield
    kernels.set_backend(None)


def test_auto_runs_sdpa_or_the_reference_on_cpu_and_says_so_once(caplog):
    import importlib

    importlib.import_module("attnpack.kernels.block_sparse_attention")._logged.clear()
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
    with pytest.raises(ValueError, match=r"set_backend: name='cuda' is not one of 'auto', 'triton'"):
        kernels.set_backend("cuda")
    with pytest.raises(ValueError, match=r"backend='xla' is not one of"):
        resolve_backend("xla", torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(
        ValueError, match=r"backend='triton' needs CUDA tensors \(got cpu\); set TRITON_INTERPRET=1"
    ):
        resolve_backend("triton", torch.device("cpu"))


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
