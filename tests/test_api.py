"""The public API: handles, idempotence, and clear errors for bad input."""

from dataclasses import dataclass
from types import SimpleNamespace
from typing import ClassVar

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from helpers import max_diff, run_tiny, tiny_pipeline

import attnpack
from attnpack.context import SITE_ATTR
from attnpack.methods import check_choice, check_number, make_method


@pytest.fixture(scope="module")
def flux():
    return tiny_pipeline("tiny-flux")


def current(pipe):
    return list(pipe.transformer.attn_processors.values())


def test_attach_is_idempotent(flux):
    ctx = attnpack.attach(flux)
    hooks = len(flux.transformer._forward_pre_hooks)
    assert attnpack.attach(flux) is ctx
    assert len(flux.transformer._forward_pre_hooks) == hooks
    assert attnpack.remove(flux)
    assert not attnpack.remove(flux)  # nothing left to remove


def test_handles_stack_and_unwind_in_any_order(flux):
    originals = current(flux)
    for order in ("first", "last"):
        first = attnpack.apply(flux, "dense")
        second = attnpack.apply(flux, "dense", backend="reference")
        assert all(p is second.method for p in current(flux))
        if order == "first":
            first.remove()
            assert all(p is second.method for p in current(flux))
            second.remove()
        else:
            second.remove()
            assert all(p is first.method for p in current(flux))
            first.remove()
        assert all(a is b for a, b in zip(current(flux), originals, strict=True))
    attnpack.remove(flux)


def test_handle_as_context_manager(flux):
    originals = current(flux)
    with attnpack.apply(flux, attnpack.DenseAttention()) as handle:
        assert handle.num_layers == len(originals)
        assert "3 layers" in repr(handle)
    assert handle.removed and all(a is b for a, b in zip(current(flux), originals, strict=True))
    handle.remove()  # a second remove is harmless
    attnpack.remove(flux)


def test_remove_pipe_also_undoes_set_attn_processor(flux):
    originals = current(flux)
    attnpack.apply(flux, "dense")
    flux.transformer.set_attn_processor(attnpack.DenseAttention(backend="reference"))
    attnpack.remove(flux)
    assert all(a is b for a, b in zip(current(flux), originals, strict=True))


def test_unsupported_processors_are_left_alone():
    pipe = tiny_pipeline("tiny-sd1.5")

    class CustomProcessor(AttnProcessor2_0):
        """Someone else's processor: attnpack cannot know what it does."""

    custom = CustomProcessor()
    module = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    module.set_processor(custom)
    handle = attnpack.apply(pipe, "dense")
    assert module.processor is custom and not hasattr(module, SITE_ATTR)
    assert handle.num_layers == 13
    with pytest.raises(RuntimeError, match=r"attnpack\.attach"):
        # forced onto it anyway, the processor cannot tell the module's family
        module.set_processor(attnpack.DenseAttention())
        run_tiny(pipe, "tiny-sd1.5")
    attnpack.remove(pipe)


def test_config_and_repr():
    method = attnpack.DenseAttention(backend="reference")
    assert method.config() == {"method": "dense", "backend": "reference"}
    assert repr(method) == "DenseAttention(backend='reference')"
    assert make_method(" Dense ").backend == "sdpa"


# Bad input: the error names the parameter, the value and what is accepted.


def test_unknown_method_name(flux):
    with pytest.raises(ValueError, match=r"method='radiall' is not an attnpack method; accepted: 'dense'"):
        attnpack.apply(flux, "radiall")


def test_method_of_wrong_type(flux):
    with pytest.raises(TypeError, match=r"method=3 \(int\) must be a method name"):
        attnpack.apply(flux, 3)


def test_config_value_out_of_range(flux):
    with pytest.raises(
        ValueError,
        match=r"DenseAttention: backend='flash' is not accepted; choose one of 'sdpa', 'reference'",
    ):
        attnpack.apply(flux, "dense", backend="flash")


def test_unknown_config_parameter(flux):
    with pytest.raises(TypeError, match=r"DenseAttention has no parameter 'decay_factor'; accepted: backend"):
        attnpack.apply(flux, "dense", decay_factor=0.2)


def test_settings_with_a_method_object(flux):
    with pytest.raises(TypeError, match=r"settings \['backend'\] were given with a DenseAttention object"):
        attnpack.apply(flux, attnpack.DenseAttention(), backend="sdpa")


@dataclass(eq=False, repr=False)
class VideoOnly(attnpack.DenseAttention):
    families: ClassVar[tuple[str, ...]] = ("wan", "hunyuan_video")


def test_family_the_method_does_not_support(flux):
    with pytest.raises(
        ValueError,
        match=r"acts on the families \['wan', 'hunyuan_video'\].*transformer: FluxTransformer2DModel \(flux\)",
    ):
        attnpack.apply(flux, VideoOnly())
    attnpack.remove(flux)


def test_denoiser_no_family_supports():
    pipe = SimpleNamespace(transformer=torch.nn.Linear(2, 2))
    with pytest.raises(
        ValueError, match=r"no attnpack family supports transformer: Linear; supported families: unet"
    ):
        attnpack.attach(pipe)


def test_pipeline_without_denoiser():
    with pytest.raises(
        ValueError, match=r"pipe: SimpleNamespace has no denoiser; attnpack expects a `transformer`"
    ):
        attnpack.apply(SimpleNamespace(vae=torch.nn.Identity()), "dense")
    with pytest.raises(TypeError, match=r"pipe=None \(NoneType\) must be a diffusers pipeline or a denoiser"):
        attnpack.attach(None)


def test_processor_needing_context_without_attach():
    @dataclass(eq=False, repr=False)
    class NeedsContext(attnpack.DenseAttention):
        needs_context: ClassVar[bool] = True

    pipe = tiny_pipeline("tiny-flux")
    pipe.transformer.set_attn_processor(NeedsContext())
    with pytest.raises(
        RuntimeError, match=r"NeedsContext needs the denoising context .* call attnpack\.attach\(pipe\)"
    ):
        run_tiny(pipe, "tiny-flux")
    stock = run_tiny(tiny_pipeline("tiny-flux"), "tiny-flux")
    attnpack.attach(pipe)  # with the context it runs, and matches stock
    assert max_diff(run_tiny(pipe, "tiny-flux"), stock) <= 1e-5
    attnpack.remove(pipe)  # the modules never had a stock processor here: they get fresh ones
    assert {type(p).__name__ for p in current(pipe)} == {"FluxAttnProcessor"}
    assert torch.equal(run_tiny(pipe, "tiny-flux"), stock)


def test_generic_attention_needs_attach():
    pipe = tiny_pipeline("tiny-sd1.5")
    pipe.unet.set_attn_processor(attnpack.DenseAttention())
    with pytest.raises(
        RuntimeError, match=r"Attention module that attnpack has not attached.*attnpack\.attach\(pipe\)"
    ):
        run_tiny(pipe, "tiny-sd1.5")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(value=1.5, low=0, high=1), r"X: p=1.5 is out of range; expected a number in \[0, 1\]"),
        (
            dict(value=0, low=0, low_inclusive=False),
            r"X: p=0 is out of range; expected a number in \(0, inf\)",
        ),
        (
            dict(value=2.5, low=1, integer=True),
            r"X: p=2.5 is out of range; expected an integer in \[1, inf\)",
        ),
        (dict(value=True, low=0), r"X: p=True is out of range"),
        (dict(value=float("nan")), r"X: p=nan is out of range; expected a number in \(-inf, inf\)"),
        (dict(value="3", high=4), r"X: p='3' is out of range; expected a number in \(-inf, 4\]"),
    ],
)
def test_check_number(kwargs, message):
    with pytest.raises(ValueError, match=message):
        check_number("X", "p", **kwargs)


def test_check_number_accepts():
    check_number("X", "p", 1, low=1, high=1)
    check_number("X", "p", 0.5, low=0, high=1, low_inclusive=False, high_inclusive=False)
    check_choice("X", "mode", "a", ("a", "b"))
