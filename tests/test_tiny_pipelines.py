"""The tiny random-weight pipelines: built offline, deterministic, and loadable with from_pretrained."""

import pytest
import torch
from diffusers import DiffusionPipeline
from helpers import max_diff, run_tiny, tiny_pipeline

import attnpack
from attnpack.pipelines import TINY_PIPELINES, build_tiny_pipeline, tiny_call_kwargs


def test_every_family_has_a_tiny_pipeline():
    assert {p.family for p in TINY_PIPELINES.values()} == set(attnpack.families.FAMILIES)


@pytest.mark.parametrize("name", ["tiny-sdxl", "tiny-cogvideox"])
def test_deterministic(name):
    first = run_tiny(tiny_pipeline(name), name)
    assert torch.isfinite(first).all()
    assert torch.equal(first, run_tiny(tiny_pipeline(name), name))


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-wan-i2v", "tiny-hunyuanvideo"])
def test_save_and_load_with_from_pretrained(tmp_path, name):
    pipe = tiny_pipeline(name)
    expected = run_tiny(pipe, name)
    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is type(pipe)
    assert max_diff(run_tiny(loaded, name), expected) <= 1e-6
    with attnpack.apply(loaded, "dense"):
        assert max_diff(run_tiny(loaded, name), expected) <= 1e-5


def test_unknown_name():
    with pytest.raises(ValueError, match=r"name='tiny-sd4' is not a tiny pipeline; accepted: tiny-sd1.5"):
        build_tiny_pipeline("tiny-sd4")
    with pytest.raises(ValueError, match=r"name='flux' is not a tiny pipeline"):
        tiny_call_kwargs("flux")
