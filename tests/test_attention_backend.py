"""diffusers' `set_attention_backend` (flash, sage, flex, ...) reaches attnpack's layers (issue 25): the dense
parts of every method run through `dispatch_attention_fn` on the model's backend, and the stock processors
that `remove()` brings back keep the backend that was set while attnpack was in."""

import math

import pytest
import torch
from diffusers.models import attention_dispatch
from diffusers.models.attention_dispatch import AttentionBackendName, attention_backend
from helpers import max_diff, run_tiny, tiny_pipeline

import attnpack

REGISTRY = attention_dispatch._AttentionBackendRegistry
MATH = AttentionBackendName._NATIVE_MATH  # runs on the CPU and differs from attnpack's own SDPA call


@pytest.fixture
def math_calls(monkeypatch):
    """Counts the calls diffusers' math backend serves; the active backend is put back afterwards."""
    calls = []
    backend = REGISTRY._backends[MATH]

    def counted(**kwargs):
        calls.append((kwargs["query"].shape, kwargs["key"].shape))
        return backend(**kwargs)

    monkeypatch.setitem(REGISTRY._backends, MATH, counted)
    active = REGISTRY._active_backend
    yield calls
    REGISTRY.set_active_backend(active)


def attention_processors(model):
    return [m.processor for m in model.modules() if hasattr(m, "set_processor")]


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-wan-t2v"])
def test_a_backend_set_before_apply_runs_attnpacks_dense_attention(name, math_calls):
    pipe = tiny_pipeline(name)
    pipe.transformer.set_attention_backend(MATH.value)
    stock = run_tiny(pipe, name)
    stock_calls = len(math_calls)
    assert stock_calls > 0
    math_calls.clear()
    with attnpack.apply(pipe, "dense"):
        ours = run_tiny(pipe, name)
    assert len(math_calls) == stock_calls  # every call on the backend, none on attnpack's own SDPA
    assert max_diff(ours, stock) == 0.0


def test_a_backend_set_after_apply_reaches_the_methods_dense_steps_and_survives_remove(math_calls):
    pipe = tiny_pipeline("tiny-wan-t2v")
    handle = attnpack.apply(pipe, "radial", dense_steps=1)  # the first step dense, as the paper does
    pipe.transformer.set_attention_backend(MATH.value)
    run_tiny(pipe, "tiny-wan-t2v")
    assert math_calls, "radial's dense steps ignored the model's attention backend"
    handle.remove()
    attnpack.remove(pipe)
    backends = {p._attention_backend for p in attention_processors(pipe.transformer)}
    assert backends == {MATH}  # the stock processors that came back are on the backend that was set
    pipe.transformer.reset_attention_backend()
    with attnpack.apply(pipe, "dense") as handle:
        assert {p._attention_backend for p in handle.installed.values()} == {None}


def test_the_attention_backend_block_reaches_attnpack(math_calls):
    pipe = tiny_pipeline("tiny-flux")
    with attnpack.apply(pipe, "dense"):
        run_tiny(pipe, "tiny-flux")
        assert not math_calls  # plain SDPA by default: attnpack's own dense kernel
        with attention_backend(MATH):
            run_tiny(pipe, "tiny-flux")
    assert math_calls


def test_the_reference_dense_backend_stays_attnpacks(math_calls):
    pipe = tiny_pipeline("tiny-flux")
    pipe.transformer.set_attention_backend(MATH.value)
    with attnpack.apply(pipe, "dense", backend="reference"):
        out = run_tiny(pipe, "tiny-flux")
    assert not math_calls  # "reference" is attnpack's float32 math, asked for by name
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    ("name", "method", "settings"),
    [
        ("tiny-wan-t2v", "freelong", {}),  # its global branch: every video query to every video key
        ("tiny-flux", "pooled_agent", {"agent_grid": 4}),  # the text queries attend densely
    ],
)
def test_the_plain_attention_inside_a_method_runs_on_the_backend(name, method, settings, math_calls):
    pipe = tiny_pipeline(name)
    pipe.transformer.set_attention_backend(MATH.value)
    with attnpack.apply(pipe, method, **settings) as handle:
        assert handle.num_layers > 0
        out = run_tiny(pipe, name)
    ctx = attnpack.attach(pipe)
    image, text = math.prod(ctx.grid), ctx.text_len
    # on the layers the method acts on, not only the cross-attention it leaves to the stock path
    expected = (image, image) if method == "freelong" else (text, text + image)
    assert expected in [(q[1], k[1]) for q, k in math_calls]
    assert torch.isfinite(out).all()
