"""Dense attention through attnpack's whole path reproduces every family's stock diffusers output."""

import pytest
import torch
from helpers import denoisers, max_diff, run_tiny, tiny_pipeline

import attnpack
from attnpack.context import SITE_ATTR
from attnpack.pipelines import TINY_PIPELINES

ALL = list(TINY_PIPELINES)
TOLERANCE = 1e-5  # fp32


def processors(pipe) -> dict[str, object]:
    return {
        f"{i}.{name}": p
        for i, model in enumerate(denoisers(pipe))
        for name, p in model.attn_processors.items()
    }


@pytest.mark.parametrize("name", ALL)
def test_apply_dense_matches_stock_and_remove_restores(name):
    pipe = tiny_pipeline(name)
    stock = run_tiny(pipe, name)
    before = processors(pipe)

    handle = attnpack.apply(pipe, "dense")
    assert handle.num_layers > 0
    assert all(isinstance(p, attnpack.DenseAttention) for p in processors(pipe).values())
    dense = run_tiny(pipe, name)
    assert max_diff(dense, stock) <= TOLERANCE

    handle.remove()
    after_remove = processors(pipe)
    assert after_remove.keys() == before.keys()
    assert all(after_remove[key] is before[key] for key in before), (
        "remove() must restore the original objects"
    )
    assert torch.equal(run_tiny(pipe, name), stock)


@pytest.mark.parametrize("name", ALL)
def test_set_attn_processor_after_attach(name):
    pipe = tiny_pipeline(name)
    stock = run_tiny(pipe, name)
    attnpack.attach(pipe)
    for model in denoisers(pipe):
        model.set_attn_processor(attnpack.DenseAttention())
    assert max_diff(run_tiny(pipe, name), stock) <= TOLERANCE
    # the float32 reference math agrees too, closely
    for model in denoisers(pipe):
        model.set_attn_processor(attnpack.DenseAttention(backend="reference"))
    assert max_diff(run_tiny(pipe, name), stock) <= 1e-4
    assert attnpack.remove(pipe)
    assert torch.equal(run_tiny(pipe, name), stock)


@pytest.mark.parametrize("name", ["tiny-sd1.5", "tiny-flux", "tiny-wan-i2v"])
def test_remove_leaves_no_trace(name):
    pipe = tiny_pipeline(name)
    run_tiny(pipe, name)  # a stock run first: the scheduler sets attributes of its own
    scheduler_attrs = dict(pipe.scheduler.__dict__)
    processors_before = processors(pipe)
    hooks_before = [dict(model._forward_pre_hooks) for model in denoisers(pipe)]

    attnpack.apply(pipe, "dense")
    run_tiny(pipe, name)
    attnpack.remove(pipe)

    assert not hasattr(pipe, "_attnpack")
    for model, hooks in zip(denoisers(pipe), hooks_before, strict=True):
        assert dict(model._forward_pre_hooks) == hooks
        assert not any(hasattr(module, SITE_ATTR) for module in model.modules())
    assert {k: v for k, v in processors(pipe).items()} == processors_before
    assert set(pipe.scheduler.__dict__) == set(scheduler_attrs)
    assert "step" not in pipe.scheduler.__dict__


def test_bare_denoiser():
    """attach / apply also take a denoiser model directly."""
    pipe = tiny_pipeline("tiny-flux")
    stock = run_tiny(pipe, "tiny-flux")
    handle = attnpack.apply(pipe.transformer, "dense")
    assert max_diff(run_tiny(pipe, "tiny-flux"), stock) <= TOLERANCE
    ctx = pipe.transformer._attnpack.context
    assert ctx.grid == (8, 12) and ctx.step_index is None  # no scheduler seen: steps unknown
    handle.remove()
    assert attnpack.remove(pipe.transformer)


def test_dense_without_attach_on_unambiguous_modules():
    """FluxAttention / WanAttention belong to one family: dense runs on them even without attach."""
    pipe = tiny_pipeline("tiny-wan-t2v")
    stock = run_tiny(pipe, "tiny-wan-t2v")
    pipe.transformer.set_attn_processor(attnpack.DenseAttention())
    assert max_diff(run_tiny(pipe, "tiny-wan-t2v"), stock) <= TOLERANCE


def test_fused_projections():
    pipe = tiny_pipeline("tiny-flux")
    pipe.transformer.fuse_qkv_projections()
    stock = run_tiny(pipe, "tiny-flux")
    with attnpack.apply(pipe, "dense"):
        assert max_diff(run_tiny(pipe, "tiny-flux"), stock) <= TOLERANCE


def test_bf16_close_to_stock():
    pipe = tiny_pipeline("tiny-wan-t2v").to(torch.bfloat16)
    stock = run_tiny(pipe, "tiny-wan-t2v")
    with attnpack.apply(pipe, "dense"):
        assert torch.equal(run_tiny(pipe, "tiny-wan-t2v"), stock)
