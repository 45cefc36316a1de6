"""ClearAttention: CLEAR's local attention for FLUX and SD 3 / 3.5 (Liu et al., 2024).

Every image token attends a disc of `radius` tokens around itself, every text token and, with
`down_factor=f`, (H/f)(W/f) pooled tokens: the image keys and values averaged over f x f windows with a
learnable `spatial_weight` per layer (initialised to 1/f²). Text tokens attend the text and the
full-resolution image. The pattern comes from `attnpack.patterns.clear_window`, in tiled order.

Without weights it runs training-free on the model's own projections (an approximation of dense
attention). With the released distilled weights (`weights=` a local safetensors file, or the Hub repo
"Huage001/CLEAR", whose file is then picked by radius and down_factor) it runs the projections CLEAR
was trained with: `attnpack.apply` swaps them in and `handle.remove()` puts the originals back.

High resolution, as in the public code: `proportional_attention` scales attention by
sqrt(log_4608(N) / d) for N keys (10 N with pooled tokens, as their code does), and `ntk_factor` stretches
RoPE's base for positions beyond the training grid.
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..context import site_of
from ..fallback import fall_back
from ..families.base import AttnCall
from ..layout import Role
from ..patterns.clear import clear_window
from .base import AttentionMethod, SparseAttention, check_number, dense_attention_of, run_sparse

logger = logging.getLogger("attnpack")

HUB_REPO = "Huage001/CLEAR"
TRAIN_TOKENS = 64**2 + 512  # FLUX's training sequence at 1024 px: the base of the proportional scale
PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass(eq=False, repr=False)
class ClearAttention(AttentionMethod):
    """CLEAR local attention. `radius` in tokens (the released weights: 8, 16, 32), `down_factor` for the
    pooled tokens (released: 4 with radius 8 and 16), `weights` a file or Hub id of distilled weights."""

    radius: float = 16
    down_factor: int | None = None
    weights: str | dict | None = None
    proportional_attention: bool = False
    ntk_factor: float = 1.0

    name: ClassVar[str] = "clear"
    families: ClassVar[tuple[str, ...]] = ("flux", "sd3")
    roles: ClassVar[frozenset[Role]] = frozenset({Role.JOINT, Role.SELF})  # SELF: SD 3.5's image-only attn2
    needs_context: ClassVar[bool] = True
    context_parallel: ClassVar[frozenset[str]] = frozenset({"ulysses", "ring"})

    def __post_init__(self):
        check_number("ClearAttention", "radius", self.radius, low=0, low_inclusive=False)
        if self.down_factor is not None:
            check_number("ClearAttention", "down_factor", self.down_factor, low=2, integer=True)
        check_number("ClearAttention", "ntk_factor", self.ntk_factor, low=0, low_inclusive=False)
        if not isinstance(self.proportional_attention, bool):
            raise ValueError(
                f"ClearAttention: proportional_attention={self.proportional_attention!r} must be True or False"
            )
        if self.weights is not None and not isinstance(self.weights, (str, os.PathLike, dict)):
            raise ValueError(
                f"ClearAttention: weights={self.weights!r} must be a safetensors path, a Hub repo id "
                f"such as {HUB_REPO!r}, a state dict, or None"
            )

    # ---- per-layer processors and weights

    def processor_for(self, module, site):
        return ClearLayer(self) if self.down_factor else self

    def install(self, processors: dict[torch.nn.Module, Any], denoisers: dict[str, torch.nn.Module]):
        undo = []
        try:
            if self.weights is not None:
                undo.append(load_clear_weights(self, processors))
            if self.ntk_factor != 1.0:
                undo.append(_stretch_rope(processors, denoisers, self.ntk_factor))
        except Exception:
            for step in reversed(undo):  # a refused setting leaves the model as it was
                step()
            raise
        if not undo:
            return None
        return lambda: [step() for step in reversed(undo)]

    def pooling_weights(self, call: AttnCall) -> torch.Tensor:
        """(f, f) weights of the pooled tokens: uniform here (installed through `set_attn_processor`);
        the per-layer `ClearLayer` that `attnpack.apply` installs holds learned ones."""
        f = self.down_factor
        return torch.full((f, f), 1.0 / (f * f), device=call.key.device, dtype=torch.float32)

    # ---- attention

    def attend(self, call: AttnCall) -> torch.Tensor:
        return run_sparse(call, self.sparse_attention(call), self.extra_keys(call))

    def extra_keys(self, call: AttnCall) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The pooled tokens: keys and values averaged over f x f windows of the image."""
        if not self.down_factor or call.layout.grid is None:
            return None
        return self._pool(call)

    def preview_pattern(self, grid):
        if len(grid) != 2:
            return None
        return clear_window(grid, self.radius, text_tokens=0, down_factor=self.down_factor)

    def sparse_attention(self, call: AttnCall) -> SparseAttention:
        layout = call.layout
        if layout.grid is None:
            fall_back(self, call, "no image grid")
            return dense_attention_of(call)
        pattern = clear_window(
            layout.grid,
            self.radius,
            text_tokens=layout.text_len,
            text_first=layout.text_first,
            down_factor=self.down_factor,
            device=call.query.device,
        )
        scale = call.scale
        if self.proportional_attention:
            # The public code's N: the sequence's own keys, counted before the pooled ones join them, times
            # 10 when there are pooled tokens.
            keys = pattern.q_len * (10 if self.down_factor else 1)
            scale = math.sqrt(math.log(keys, TRAIN_TOKENS) / call.query.shape[-1])
        return SparseAttention(pattern, scale, None)

    def _pool(self, call: AttnCall) -> tuple[torch.Tensor, torch.Tensor]:
        """The image keys and values averaged over f x f windows with the layer's spatial weights."""
        height, width = call.layout.grid
        f = self.down_factor
        if height % f or width % f:
            raise ValueError(
                f"ClearAttention: down_factor={f} must divide the token grid {height} x {width} it pools (under "
                f"ring attention: one rank's rows); use an image size whose height and width / 16 are "
                f"multiples of {f}, times the ranks for the height"
            )
        image = call.layout.visual_slice
        weight = self.pooling_weights(call)[None, None, :, None, :, None, None]

        def pool(x: torch.Tensor) -> torch.Tensor:
            batch, _, heads, dim = x.shape
            windows = x[:, image].unflatten(
                1, (height // f, f, width // f, f)
            )  # (B, H/f, f, W/f, f, heads, D)
            return (windows * weight.to(x.dtype)).sum(dim=(2, 4)).reshape(batch, -1, heads, dim)

        return pool(call.key), pool(call.value)


class ClearLayer(torch.nn.Module, ClearAttention):
    """The processor of one attention layer under ClearAttention with pooled tokens: it holds the layer's
    `spatial_weight`, stored the way the released weights name it (`<layer>.processor.spatial_weight`)."""

    def __init__(self, method: ClearAttention):
        torch.nn.Module.__init__(self)
        for name in ("radius", "down_factor", "weights", "proportional_attention", "ntk_factor"):
            object.__setattr__(self, name, getattr(method, name))
        f = method.down_factor
        self.spatial_weight = torch.nn.Parameter(torch.full((1, 1, 1, f, 1, f, 1), 1.0 / (f * f)))

    # the processor call is AttentionMethod's, not nn.Module's forward machinery
    __call__ = AttentionMethod.__call__

    def processor_for(self, module, site):
        return self

    def pooling_weights(self, call: AttnCall) -> torch.Tensor:
        if self.spatial_weight.device != call.key.device:  # applied to a model already on its device
            self.to(call.key.device)
        f = self.down_factor
        return self.spatial_weight.view(f, f)

    def __repr__(self) -> str:
        return f"ClearLayer(radius={self.radius}, down_factor={self.down_factor})"


# ---- weights


def released_file(radius: float, down_factor: int | None) -> str:
    """The name of the released weights for a setting, e.g. clear_local_16_down_4.safetensors."""
    released = {(8, None), (16, None), (32, None), (8, 4), (16, 4)}
    if (radius, down_factor) not in released:
        choices = ", ".join(
            f"radius={r}" + (f", down_factor={f}" if f else "") for r, f in sorted(released, key=str)
        )
        raise ValueError(
            f"ClearAttention: no released weights for radius={radius}, down_factor={down_factor}; released: {choices}"
        )
    return f"clear_local_{int(radius)}" + (f"_down_{down_factor}" if down_factor else "") + ".safetensors"


def read_weights(method: ClearAttention) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict `method.weights` names, and where it came from."""
    from safetensors.torch import load_file

    weights = method.weights
    if isinstance(weights, dict):
        return weights, "the given state dict"
    path = os.fspath(weights)
    if os.path.isfile(path):
        _check_file_name(method, path)
        return load_file(path), path
    # a Hub id: "owner/repo", or "owner/repo:file.safetensors"; anything else is a path that is not there
    if not re.fullmatch(r"[\w.-]+/[\w.-]+(:[\w./-]+\.safetensors)?", path) or (
        path.endswith(".safetensors") and ":" not in path
    ):
        raise ValueError(
            f"ClearAttention: weights={path!r} is neither a safetensors file nor a Hub id like {HUB_REPO!r}"
        )
    repo, _, filename = path.partition(":")
    filename = filename or released_file(method.radius, method.down_factor)
    from huggingface_hub import hf_hub_download

    try:
        local = hf_hub_download(repo, filename)
    except Exception as error:  # offline, unknown repo or file: say which and how to get it
        raise ValueError(
            f"ClearAttention: could not get {filename} from the Hugging Face Hub repo {repo!r} "
            f"({type(error).__name__}). Download it with `huggingface-cli download {repo} {filename}` "
            "(HF_HUB_OFFLINE must be unset) and pass the local path as weights="
        ) from error
    _check_file_name(method, local)
    return load_file(local), f"{repo}/{filename}"


def _check_file_name(method: ClearAttention, path: str) -> None:
    """The released files name their setting: refuse one that disagrees with the method's."""
    match = re.fullmatch(r"clear_local_(\d+)(?:_down_(\d+))?\.safetensors", os.path.basename(path))
    if match is None:
        return
    radius, down = int(match.group(1)), int(match.group(2)) if match.group(2) else None
    if (radius, down) != (method.radius, method.down_factor):
        raise ValueError(
            f"ClearAttention: {os.path.basename(path)} holds weights for radius={radius}, down_factor={down}; "
            f"the method has radius={method.radius}, down_factor={method.down_factor}"
        )


def expected_weights(
    method: ClearAttention, processors: dict[torch.nn.Module, Any]
) -> dict[str, torch.nn.Parameter]:
    """The parameters a CLEAR weights file sets, by key: `<layer>.to_q.weight` ... (relative to the
    transformer) and `<layer>.processor.spatial_weight` with pooled tokens."""
    expected = {}
    for module, processor in processors.items():
        name = module._attnpack_site.local_name
        for projection in PROJECTIONS:
            try:
                layer = module.get_submodule(projection)
            except AttributeError:
                continue  # single-stream blocks have no to_out
            for kind in ("weight", "bias"):
                parameter = getattr(layer, kind, None)
                if parameter is not None:
                    expected[f"{name}.{projection}.{kind}"] = parameter
        if method.down_factor:
            expected[f"{name}.processor.spatial_weight"] = processor.spatial_weight
    return expected


def load_clear_weights(method: ClearAttention, processors: dict[torch.nn.Module, Any]):
    """Load distilled CLEAR weights into the layers; returns the undo (the original projections, kept on the CPU)."""
    state, source = read_weights(method)
    expected = expected_weights(method, processors)
    pooled = sorted(k for k in state if k.endswith(".processor.spatial_weight"))
    if pooled and not method.down_factor:
        f = state[pooled[0]].shape[3] if state[pooled[0]].ndim == 7 else "?"
        raise ValueError(
            f"ClearAttention: {source} holds pooled-token weights (down_factor={f}); the method has down_factor=None"
        )
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"ClearAttention: {source} does not fit this model: {len(missing)} missing keys "
            f"{missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}"
        )
    for key, parameter in expected.items():
        if tuple(state[key].shape) != tuple(parameter.shape):
            raise ValueError(
                f"ClearAttention: {source}: {key} has shape {tuple(state[key].shape)}, the model expects "
                f"{tuple(parameter.shape)}"
            )
    originals = {}
    with torch.no_grad():
        for key, parameter in expected.items():
            if not key.endswith("spatial_weight"):  # the layer processors are new: nothing to restore
                originals[key] = parameter.detach().to("cpu", copy=True)
            parameter.copy_(state[key].to(device=parameter.device, dtype=parameter.dtype))

    def restore():
        with torch.no_grad():
            for key, original in originals.items():
                expected[key].copy_(original.to(expected[key].device))

    logger.info("ClearAttention: loaded %d tensors from %s", len(expected), source)
    return restore


def _stretch_rope(
    processors: dict[torch.nn.Module, Any], denoisers: dict[str, torch.nn.Module], factor: float
):
    """NTK-aware RoPE: the rotary base of every denoiser the method runs on scaled by `factor` (through the
    family's rotary service); returns the undo."""
    families = {site.denoiser: site.family for site in (site_of(module) for module in processors)}
    undo = []
    for name, family in families.items():
        rotary = family.rotary(denoisers[name])
        if rotary is None:
            raise ValueError(
                f"ClearAttention: ntk_factor={factor} stretches RoPE's base, and {family.title} has no rotary "
                "embedding; leave ntk_factor=1.0 there"
            )
        undo.append(rotary.scale_theta(factor))

    def restore():
        for step in reversed(undo):
            step()

    return restore
