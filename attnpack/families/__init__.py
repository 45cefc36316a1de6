"""Model families: one file per diffusers attention family, each an adapter to and from canonical q, k, v.

Methods do not know families and families do not know methods: a method states which families and
roles it acts on, and `attnpack.apply` puts it where both match. What a method needs of a model beyond q, k
and v it asks the family for, as a service: `Family.rotary(model)` (re-index or rescale the rotary
embedding), `Family.temporal_blocks(model)` (frame positions, per-window blocks), `Family.deep_layers_start`,
`Adapter.leading_text_len`.
"""

from __future__ import annotations

import torch

from . import cogvideox, flux, hunyuan_video, sd3, unet, wan
from .base import Adapter, AttnCall, Family, Rotary, TemporalBlocks

FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (unet.FAMILY, flux.FAMILY, sd3.FAMILY, wan.FAMILY, cogvideox.FAMILY, hunyuan_video.FAMILY)
}

# Attention module classes that belong to one family whatever the model around them, so a processor can
# find its adapter on a module that was never attached. diffusers' generic `Attention` is shared by
# several families and needs `attnpack.attach` to tell them apart.
ADAPTERS_BY_MODULE: dict[str, Adapter] = {"FluxAttention": flux.ADAPTER, "WanAttention": wan.ADAPTER}


def family_of(model: torch.nn.Module) -> Family | None:
    for family in FAMILIES.values():
        if family.matches(model):
            return family
    return None


def supported_denoisers() -> list[str]:
    return [name for family in FAMILIES.values() for name in family.denoiser_classes]


__all__ = [
    "ADAPTERS_BY_MODULE",
    "FAMILIES",
    "Adapter",
    "AttnCall",
    "Family",
    "Rotary",
    "TemporalBlocks",
    "family_of",
    "supported_denoisers",
]
