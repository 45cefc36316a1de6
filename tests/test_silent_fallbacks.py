"""No silent no-ops (issue 25): `apply` warns once when a method acts on no layer and installs nothing there,
a denoiser call in which every layer a method acts on fell back to dense attention warns once, and the Handle
says on how many layers (and which) the method acts."""

import logging

import pytest
import torch
from helpers import max_diff, run_tiny, tiny_pipeline

import attnpack
from attnpack import fallback
from attnpack.families.unet import FAMILY as UNET


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(fallback, "_warned", set())


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "attnpack" and r.levelno == logging.WARNING]


def test_agent_beyond_max_downsample_everywhere_warns_once_and_installs_nothing(caplog):
    pipe = tiny_pipeline("tiny-sdxl")  # its attention starts at down_blocks.1: 1/2 of the latent
    stock = run_tiny(pipe, "tiny-sdxl")
    with caplog.at_level(logging.INFO, logger="attnpack"):
        handle = attnpack.apply(pipe, "agent", max_downsample=1)
        again = attnpack.apply(pipe, "agent", max_downsample=1)
    (warning,) = warnings_of(caplog)
    assert "'agent' acts on no layer" in warning and "beyond max_downsample=1" in warning
    assert handle.num_layers == again.num_layers == 0 and handle.layers == []
    assert "on 0 layers" in repr(handle)
    assert max_diff(run_tiny(pipe, "tiny-sdxl"), stock) == 0.0


def test_agent_installs_exactly_on_the_layers_it_acts_on():
    pipe = tiny_pipeline("tiny-sd1.5")  # attention at full, 1/2 (down_blocks.1, mid, up_blocks.0) and full
    # matched on what the attention reads, so that it needs no block hooks of apply's
    handle = attnpack.apply(pipe, "agent", max_downsample=1, match_on="normed")
    self_layers = [s for s in attnpack.attach(pipe).sites if s.role.value == "self"]
    full_resolution = [
        s.name for s in self_layers if s.local_name.startswith(("down_blocks.0.", "up_blocks.1."))
    ]
    assert handle.layers == full_resolution and 0 < handle.num_layers < len(self_layers)
    assert f"on {handle.num_layers} layers" in repr(handle)
    ours = run_tiny(pipe, "tiny-sd1.5")
    handle.remove()
    # Installed everywhere, the method decides at every call; the same output says apply's choice from the
    # module names matches what the calls find.
    pipe.unet.set_attn_processor(attnpack.AgentAttention(max_downsample=1, match_on="normed"))
    assert max_diff(run_tiny(pipe, "tiny-sd1.5"), ours) == 0.0


def test_unet_downsample_factors_follow_the_samplers():
    pipe = tiny_pipeline("tiny-sdxl")
    factors = {
        name.split(".attentions")[0]: UNET.downsample_factor(pipe.unet, name)
        for name, _ in UNET.attention_modules(pipe.unet)
    }
    assert factors == {"down_blocks.1": 2, "mid_block": 2, "up_blocks.0": 2}
    assert UNET.downsample_factor(pipe.unet, "conv_in") is None


def kontext_like_call(pipe):
    """The tiny FLUX transformer's inputs with a second image's tokens appended, as FLUX Kontext passes its
    reference image: the call's tokens are no longer the latent's grid."""
    seen = {}

    def capture(module, args, kwargs):
        seen.update(kwargs)

    hook = pipe.transformer.register_forward_pre_hook(capture, with_kwargs=True)
    run_tiny(pipe, "tiny-flux")
    hook.remove()
    reference_ids = seen["img_ids"].clone()
    reference_ids[:, 0] = 1
    return seen | {
        "hidden_states": torch.cat([seen["hidden_states"], seen["hidden_states"]], dim=1),
        "img_ids": torch.cat([seen["img_ids"], reference_ids]),
    }


def test_a_call_where_every_layer_fell_back_warns_once(caplog):
    pipe = tiny_pipeline("tiny-flux")
    attnpack.apply(pipe, "clear", radius=2)
    with caplog.at_level(logging.INFO, logger="attnpack"):
        run_tiny(pipe, "tiny-flux")  # a plain call: CLEAR acts, nothing to say
        assert warnings_of(caplog) == []
        inputs = kontext_like_call(pipe)
        with torch.no_grad():
            for _ in range(2):
                pipe.transformer(**inputs)
    (warning,) = warnings_of(caplog)
    assert "'clear' ran plain dense attention on every layer it acts on" in warning
    assert "no image grid" in warning
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any("no image grid for transformer." in m for m in infos)  # the layers, one by one
