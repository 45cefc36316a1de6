"""Attention implementations the benchmarks time against attnpack, and the dense baseline they pick.

Op level: SDPA restricted to one backend, FlashAttention-3 and xformers where installed, FlexAttention on a
pattern's block mask or on a `BlockMask` of its own. Model level: `pick_dense_backend` records the attention
calls of one forward, times each dense backend at those shapes and returns the fastest, whose `context()`
then runs every SDPA call of the model on it (see its docstring).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from ..kernels.block_sparse_attention.flex import block_mask, compiled_flex_attention
from ..patterns import tile
from .report import median_ms

logger = logging.getLogger("attnpack")

FLASH_ATTN_3 = "flash-attn-3"
# What a model-level benchmark may pick as its dense baseline, SDPA's own choice first: it wins ties.
DENSE_BACKENDS = ("sdpa-default", FLASH_ATTN_3, "sdpa-cudnn", "sdpa-flash", "sdpa-efficient")


def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend

    backends = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }
    if name not in backends:
        raise ValueError(f"SDPA backend {name!r} is not accepted; choose one of {', '.join(backends)}")
    return backends[name]


def sdpa_runner(backend_name: str):
    """SDPA restricted to one backend ("flash", "cudnn", "efficient", "math"), in (B, S, H, D) layout."""
    from torch.nn.attention import sdpa_kernel

    backend = _sdpa_backend(backend_name)

    def run(q, k, v):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            ).transpose(1, 2)

    return run


def flash_attn_3() -> Callable:
    """FlashAttention-3's `flash_attn_func` ((B, S, H, D) layout), or ImportError saying what is missing."""
    try:
        module = importlib.import_module("flash_attn_interface")
    except ImportError as error:
        raise ImportError(
            "FlashAttention-3 (module flash_attn_interface, built from flash-attention's hopper/ folder) "
            "is not installed"
        ) from error
    return module.flash_attn_func


def _flash_attn_3_output(result) -> torch.Tensor:
    # Releases differ: some return (out, lse), some out alone.
    return result[0] if isinstance(result, (tuple, list)) else result


def dense_op_runs(q, k, v) -> list[tuple[str, Callable[[], Any] | None, str | None]]:
    """The dense implementations an op-level benchmark times on (B, S, H, D) inputs: (name, callable or
    None, why it is missing). CUDA: each SDPA backend, FlashAttention-3 (a row saying why when it is not
    installed) and xformers when installed; elsewhere SDPA's math backend."""
    if not q.is_cuda:
        return [("sdpa-math", partial(sdpa_runner("math"), q, k, v), None)]
    runs: list[tuple[str, Callable[[], Any] | None, str | None]] = [
        (f"sdpa-{name}", partial(sdpa_runner(name), q, k, v), None)
        for name in ("flash", "cudnn", "efficient")
    ]
    try:
        attend = flash_attn_3()
        runs.append((FLASH_ATTN_3, lambda: _flash_attn_3_output(attend(q, k, v)), None))
    except ImportError as error:
        runs.append((FLASH_ATTN_3, None, str(error)))
    with contextlib.suppress(ImportError):
        import xformers.ops

        runs.append(("xformers", lambda: xformers.ops.memory_efficient_attention(q, k, v), None))
    return runs


def flex_runner(q, k, v, pattern):
    """FlexAttention on inputs already in the pattern's order: its kernel alone, with the same block mask."""
    mask = block_mask(pattern, q.shape[2])

    def ordered(x, order):
        return (x if order is None else tile(x, order)).transpose(1, 2)

    qt, kt, vt = ordered(q, pattern.q_order), ordered(k, pattern.kv_order), ordered(v, pattern.kv_order)
    return flex_mask_runner(qt, kt, vt, mask)


def flex_mask_runner(q, k, v, mask):
    """FlexAttention on (B, H, S, D) inputs with a BlockMask of the caller's; compiled on CUDA, as it is
    meant to run (CLEAR's public code compiles it too)."""
    if not q.is_cuda:
        from torch.nn.attention.flex_attention import flex_attention as run
    else:
        run = compiled_flex_attention()
    return lambda: run(q, k, v, block_mask=mask)


# ---- the dense baseline of a model-level benchmark


@dataclass(frozen=True)
class AttentionCall:
    """One kind of SDPA call of a model's forward, (B, H, S, D) shapes as SDPA sees them."""

    query: tuple[int, ...]
    key: tuple[int, ...]
    value: tuple[int, ...]
    dtype: torch.dtype
    mask: tuple[int, ...] | None = None
    mask_dtype: torch.dtype | None = None
    is_causal: bool = False
    enable_gqa: bool = False

    def inputs(self, device: torch.device):
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v = (
            torch.randn(shape, generator=g, device=device, dtype=self.dtype)
            for shape in (self.query, self.key, self.value)
        )
        mask = None
        if self.mask is not None:  # all keys visible: the benchmarks' masks keep every token
            if self.mask_dtype == torch.bool:
                mask = torch.ones(self.mask, device=device, dtype=torch.bool)
            else:
                mask = torch.zeros(self.mask, device=device, dtype=self.mask_dtype)
        return q, k, v, mask

    def flops(self) -> float:
        *_, q_len, head_dim = self.query
        return 4.0 * torch.Size(self.query[:-2]).numel() * q_len * self.key[-2] * head_dim

    def describe(self) -> dict[str, Any]:
        return {
            "query": list(self.query),
            "key": list(self.key),
            "dtype": str(self.dtype).removeprefix("torch."),
            "mask": None if self.mask is None else list(self.mask),
        }


@contextlib.contextmanager
def recording_attention_calls() -> Iterator[Counter]:
    """Count the SDPA calls made inside, by `AttentionCall` (diffusers' processors and attnpack's dense
    path call `torch.nn.functional.scaled_dot_product_attention` by attribute, so they all pass here)."""
    original = F.scaled_dot_product_attention
    calls: Counter = Counter()

    def recorded(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **extra):
        calls[
            AttentionCall(
                tuple(query.shape),
                tuple(key.shape),
                tuple(value.shape),
                query.dtype,
                None if attn_mask is None else tuple(attn_mask.shape),
                None if attn_mask is None else attn_mask.dtype,
                bool(is_causal),
                bool(extra.get("enable_gqa", False)),
            )
        ] += 1
        return original(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, **extra)

    with _sdpa_replaced_by(recorded):
        yield calls


@contextlib.contextmanager
def _sdpa_replaced_by(replacement) -> Iterator[None]:
    """Run with `torch.nn.functional.scaled_dot_product_attention` replaced (the way every processor and
    attnpack's dense path reach SDPA), restored afterwards whatever happens."""
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = replacement
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def _flash_attn_3_serves(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa) -> str | None:
    """Why FlashAttention-3 cannot run this SDPA call, or None when it can."""
    if attn_mask is not None:
        return "it takes no attention mask"
    if dropout_p or is_causal or enable_gqa:
        return "dropout, causal and GQA calls stay on SDPA"  # SDPA's causal aligns differently
    if query.dtype not in (torch.float16, torch.bfloat16):
        return f"it runs float16 / bfloat16, not {query.dtype}"
    if query.ndim != 4 or not query.shape[-1] == key.shape[-1] == value.shape[-1]:
        return "it needs 4-D q, k, v of one head size"
    if query.shape[-1] > 256 or query.shape[-1] % 8:
        return f"head size {query.shape[-1]} is not a multiple of 8 up to 256"
    return None


@contextlib.contextmanager
def _sdpa_on_flash_attn_3(strict: bool) -> Iterator[None]:
    """Every SDPA call FlashAttention-3 can serve goes to it. The others run SDPA as before (`strict`:
    raise instead, for the probe). Routed at SDPA itself because a UNet's processors call it directly,
    where diffusers' attention_backend("_flash_3") reaches only the DiTs' dispatch."""
    attend = flash_attn_3()
    original = F.scaled_dot_product_attention

    def routed(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **extra):
        enable_gqa = bool(extra.get("enable_gqa", False))
        refused = _flash_attn_3_serves(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa)
        if refused is None:

            def bshd(x):
                x = x.transpose(1, 2)
                return x if x.stride(-1) == 1 else x.contiguous()

            out = attend(bshd(query), bshd(key), bshd(value), softmax_scale=scale)
            return _flash_attn_3_output(out).transpose(1, 2)
        if strict:
            raise RuntimeError(f"FlashAttention-3 cannot run this call: {refused}")
        return original(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, **extra)

    with _sdpa_replaced_by(routed):
        yield


def dense_backend(name: str, *, strict: bool = False):
    """A context under which SDPA calls run on `name` (one of DENSE_BACKENDS, or "sdpa-math"). Not
    `strict`: calls the backend cannot serve fall back to SDPA's own choice, so that a whole model runs;
    `strict`: they raise (what the probe needs to see)."""
    if name == "sdpa-default":
        return contextlib.nullcontext()
    if name == FLASH_ATTN_3:
        return _sdpa_on_flash_attn_3(strict)
    if not name.startswith("sdpa-"):
        raise ValueError(
            f"dense backend {name!r} is not accepted; choose one of {', '.join(DENSE_BACKENDS)}, sdpa-math"
        )
    from torch.nn.attention import sdpa_kernel

    backend = _sdpa_backend(name.removeprefix("sdpa-"))
    if strict:
        return sdpa_kernel([backend])
    # The picked backend first, then SDPA's default order for the calls it cannot serve.
    fallbacks = [_sdpa_backend(other) for other in ("flash", "efficient", "math")]
    order = [backend] + [b for b in fallbacks if b != backend]
    try:
        return sdpa_kernel(order, set_priority=True)
    except TypeError:  # torch < 2.6 has no priorities: SDPA then tries the enabled ones in its own order
        return sdpa_kernel(order)


@dataclass(frozen=True)
class DenseBaseline:
    """The dense backend a model-level benchmark compares against, and how it was chosen (`record`)."""

    name: str
    record: dict[str, Any] = field(default_factory=dict)

    def context(self):
        return dense_backend(self.name)


def default_baseline(reason: str) -> DenseBaseline:
    return DenseBaseline("sdpa-default", {"picked": "sdpa-default", "reason": reason})


def pick_dense_backend(
    forward: Callable[[], Any],
    device: torch.device,
    *,
    candidates: tuple[str, ...] | None = None,
    warmup_ms: float = 10,
    rep_ms: float = 40,
) -> DenseBaseline:
    """The fastest dense backend for a model: one `forward()` records its SDPA calls, then each candidate
    (default: DENSE_BACKENDS) is timed at each call's shape; its estimate is the sum over the calls, times
    their counts, of its time, or SDPA's default time where it cannot serve a call (what its `context()`
    then runs). The least estimate wins. Off CUDA, without `candidates`: SDPA's default, nothing probed."""
    if candidates is None:
        if device.type != "cuda":
            return default_baseline(f"on {device.type}: SDPA's default, nothing probed")
        candidates = DENSE_BACKENDS
    candidates = ("sdpa-default", *(name for name in candidates if name != "sdpa-default"))
    with torch.inference_mode(), recording_attention_calls() as calls:
        forward()
    if not calls:
        return default_baseline("the forward made no SDPA call")
    unavailable: dict[str, str] = {}
    probes = []
    for call, count in calls.items():
        q, k, v, mask = call.inputs(device)
        ms: dict[str, float | str] = {}
        for name in candidates:
            if name in unavailable:
                continue
            try:
                with dense_backend(name, strict=True):
                    # bound inside: under FlashAttention-3 the attribute is the routing function
                    attend = partial(
                        F.scaled_dot_product_attention,
                        q,
                        k,
                        v,
                        attn_mask=mask,
                        is_causal=call.is_causal,
                        enable_gqa=call.enable_gqa,
                    )
                    ms[name] = round(median_ms(attend, device, warmup_ms, rep_ms), 4)
            except ImportError as error:
                unavailable[name] = str(error)
            except (RuntimeError, ValueError, NotImplementedError) as error:
                ms[name] = "cannot run it: " + str(error).splitlines()[0][:160]
        if not isinstance(ms["sdpa-default"], float):  # the model itself just made this call
            raise RuntimeError(
                f"dense baseline probe: SDPA failed on {call.describe()}: {ms['sdpa-default']}"
            )
        probes.append((call, count, ms))
        del q, k, v, mask
    estimate = {}
    for name in candidates:
        if name in unavailable:
            continue
        total = 0.0
        for _, count, ms in probes:
            own = ms.get(name)
            total += count * (own if isinstance(own, float) else ms["sdpa-default"])
        estimate[name] = round(total, 3)
    picked = min(estimate, key=estimate.get)  # dicts keep order: sdpa-default wins a tie
    logger.info("dense baseline: %s (estimated attention ms per forward %s)", picked, estimate)
    record = {
        "picked": picked,
        "estimated_attention_ms": estimate,
        "unavailable": unavailable,
        "calls": [call.describe() | {"count": count, "ms": ms} for call, count, ms in probes],
        "how": "one forward's SDPA calls, each candidate timed at each call's shape; estimate = sum over "
        "the calls of count x ms (SDPA's default where the candidate cannot run a call)",
    }
    return DenseBaseline(picked, record)
