"""The benchmarks' dense baseline: the SDPA-call census, the probe that picks the fastest dense backend, and
the contexts that run a model on it (FlashAttention-3 through a stand-in module on the CPU)."""

import importlib.util
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from attnpack.bench.runners import (
    AttentionCall,
    dense_backend,
    pick_dense_backend,
    recording_attention_calls,
)

HAS_FLASH_ATTN_3 = importlib.util.find_spec("flash_attn_interface") is not None


def toy_forward(dtype=torch.float32):
    """Three SDPA calls of two kinds, the way diffusers makes them: keywords, and a key mask."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 64, 16, generator=g, dtype=dtype)
    text = torch.randn(1, 2, 8, 16, generator=g, dtype=dtype)
    mask = torch.ones(1, 1, 1, 8, dtype=torch.bool)

    def forward():
        x = F.scaled_dot_product_attention(q, q, q)
        x = F.scaled_dot_product_attention(query=x, key=x, value=x, scale=0.25)
        return F.scaled_dot_product_attention(x, text, text, attn_mask=mask)

    return forward


def test_the_census_counts_each_kind_of_call_and_restores_sdpa():
    original = F.scaled_dot_product_attention
    with recording_attention_calls() as calls:
        toy_forward()()
    assert F.scaled_dot_product_attention is original
    assert dict(calls) == {
        AttentionCall((1, 2, 64, 16), (1, 2, 64, 16), (1, 2, 64, 16), torch.float32): 2,
        AttentionCall(
            (1, 2, 64, 16), (1, 2, 8, 16), (1, 2, 8, 16), torch.float32, (1, 1, 1, 8), torch.bool
        ): 1,
    }


def test_the_probe_picks_the_least_estimate_and_records_why():
    candidates = ("sdpa-default", "sdpa-math", "sdpa-flash", "sdpa-cudnn", "flash-attn-3")
    baseline = pick_dense_backend(toy_forward(), torch.device("cpu"), candidates=candidates, rep_ms=2)
    record = baseline.record
    assert (
        baseline.name
        == record["picked"]
        == min(record["estimated_attention_ms"], key=record["estimated_attention_ms"].get)
    )
    self_call, text_call = record["calls"]
    assert (self_call["count"], self_call["mask"]) == (2, None)
    assert (text_call["count"], text_call["mask"], text_call["key"]) == (1, [1, 1, 1, 8], [1, 2, 8, 16])
    for call in record["calls"]:
        assert call["ms"]["sdpa-cudnn"].startswith("cannot run it")  # no cuDNN on a CPU
        assert call["ms"]["sdpa-math"] > 0 and call["ms"]["sdpa-default"] > 0
    for name, estimate in record["estimated_attention_ms"].items():
        own = [
            c["ms"][name] if isinstance(c["ms"][name], float) else c["ms"]["sdpa-default"]
            for c in record["calls"]
        ]
        assert estimate == pytest.approx(
            sum(c["count"] * ms for c, ms in zip(record["calls"], own, strict=True)), abs=2e-3
        )
    if not HAS_FLASH_ATTN_3:
        assert "flash-attn-3" not in record["estimated_attention_ms"]
        assert "not installed" in record["unavailable"]["flash-attn-3"]
    with baseline.context():  # the whole toy model runs on the pick
        toy_forward()()


def test_off_cuda_the_baseline_is_sdpas_default_without_a_probe():
    def forward():
        raise AssertionError("nothing is probed off CUDA")

    baseline = pick_dense_backend(forward, torch.device("cpu"))
    assert baseline.name == "sdpa-default" and baseline.record["picked"] == "sdpa-default"
    assert "nothing probed" in baseline.record["reason"]


@pytest.fixture
def stand_in_flash_attn_3(monkeypatch):
    """A flash_attn_interface whose flash_attn_func is SDPA in (B, S, H, D) layout, counting its calls."""
    module = types.ModuleType("flash_attn_interface")
    module.calls = []
    original = F.scaled_dot_product_attention

    def flash_attn_func(q, k, v, softmax_scale=None):
        module.calls.append(tuple(q.shape))
        out = original(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=softmax_scale)
        return out.transpose(1, 2), None  # some releases return (out, lse)

    module.flash_attn_func = flash_attn_func
    monkeypatch.setitem(sys.modules, "flash_attn_interface", module)
    return module


def test_flash_attn_3_takes_the_calls_it_can_serve(stand_in_flash_attn_3):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 32, 16, generator=g, dtype=torch.bfloat16) for _ in range(3))
    mask = torch.ones(1, 1, 1, 32, dtype=torch.bool)
    expected = F.scaled_dot_product_attention(q, k, v, scale=0.3)
    original = F.scaled_dot_product_attention
    with dense_backend("flash-attn-3"):
        routed = F.scaled_dot_product_attention(q, k, v, scale=0.3)
        assert stand_in_flash_attn_3.calls == [(1, 32, 2, 16)]  # (B, S, H, D), as FlashAttention-3 takes it
        masked = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # falls back to SDPA
        F.scaled_dot_product_attention(q.float(), k.float(), v.float())  # float32: SDPA too
    assert F.scaled_dot_product_attention is original
    assert len(stand_in_flash_attn_3.calls) == 1
    torch.testing.assert_close(routed, expected)
    assert torch.equal(masked, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    with (
        dense_backend("flash-attn-3", strict=True),
        pytest.raises(RuntimeError, match="takes no attention mask"),
    ):
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def test_the_probe_times_flash_attn_3_where_it_is_installed(stand_in_flash_attn_3):
    baseline = pick_dense_backend(
        toy_forward(torch.bfloat16), torch.device("cpu"), candidates=("flash-attn-3",), rep_ms=2
    )
    self_call, text_call = baseline.record["calls"]
    assert isinstance(self_call["ms"]["flash-attn-3"], float)
    assert text_call["ms"]["flash-attn-3"].startswith("cannot run it: FlashAttention-3 cannot run this call")
    assert set(baseline.record["estimated_attention_ms"]) == {"sdpa-default", "flash-attn-3"}


def test_dense_backend_names_what_it_accepts():
    with dense_backend("sdpa-math", strict=True):
        F.scaled_dot_product_attention(*(torch.randn(1, 1, 4, 8) for _ in range(3)))
    with pytest.raises(
        ValueError, match=r"dense backend 'flash' is not accepted; choose one of sdpa-default"
    ):
        dense_backend("flash")
    with pytest.raises(ValueError, match=r"SDPA backend 'fast' is not accepted; choose one of flash, cudnn"):
        dense_backend("sdpa-fast")
