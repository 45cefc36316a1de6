"""Dense attention through attnpack's whole path: the baseline every sparse method is compared with.

Project with the family adapter, attend with `attnpack.kernels.dense_attention`, finish with the adapter.
It reproduces each family's stock processor, which is what the equivalence tests hold it to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..families import FAMILIES
from ..families.base import AttnCall
from ..kernels import dense_attention
from ..kernels.dense import BACKENDS
from ..layout import Role
from .base import AttentionMethod, SparseAttention, check_choice, dense, dense_attention_of


@dataclass(eq=False, repr=False)
class DenseAttention(AttentionMethod):
    """Full attention. `backend`: "sdpa" (PyTorch's fused kernels, or the diffusers backend the model was
    given with `set_attention_backend`) or "reference" (float32 math)."""

    backend: str = "sdpa"

    name: ClassVar[str] = "dense"
    families: ClassVar[tuple[str, ...]] = tuple(FAMILIES)
    roles: ClassVar[frozenset[Role]] = frozenset(Role)
    context_parallel: ClassVar[frozenset[str]] = frozenset({"ulysses", "ring"})

    def __post_init__(self):
        check_choice("DenseAttention", "backend", self.backend, BACKENDS)

    def attend(self, call: AttnCall) -> torch.Tensor:
        if self.backend == "sdpa":  # or what the user set with set_attention_backend, as stock would run
            return dense(call)
        return dense_attention(
            call.query, call.key, call.value, attn_mask=call.attn_mask, scale=call.scale, backend=self.backend
        )

    def sparse_attention(self, call: AttnCall) -> SparseAttention:
        return dense_attention_of(call)

    def attend_context(self, call: AttnCall, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        if self.backend == "sdpa":
            return super().attend_context(call, key, value)
        return dense_attention(call.query, key, value, scale=call.scale, backend=self.backend)
