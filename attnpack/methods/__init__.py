"""Attention methods: one file each, a config dataclass + attend() + its schedule."""

from __future__ import annotations

import dataclasses
from typing import Any

from .agent import AgentAttention, PooledAgentAttention
from .base import AttentionMethod, check_choice, check_number
from .clear import ClearAttention
from .dense import DenseAttention
from .freelong import FreeLongAttention
from .freenoise import FreeNoiseAttention
from .isolation import IsolationAttention, Subject
from .radial import RadialAttention
from .trajectory import TrajectoryRoPE

METHODS: dict[str, type[AttentionMethod]] = {
    cls.name: cls
    for cls in (
        DenseAttention,
        RadialAttention,
        ClearAttention,
        AgentAttention,
        PooledAgentAttention,
        FreeNoiseAttention,
        FreeLongAttention,
        IsolationAttention,
        TrajectoryRoPE,
    )
}


def make_method(method: str | AttentionMethod, **config: Any) -> AttentionMethod:
    """A method object from a name and settings (`"dense"`, backend="reference"), or the object itself."""
    if isinstance(method, AttentionMethod):
        if config:
            raise TypeError(
                f"settings {sorted(config)} were given with a {type(method).__name__} object; pass settings "
                f"only with a method name, e.g. attnpack.apply(pipe, {method.name!r}, ...)"
            )
        return method
    if not isinstance(method, str):
        raise TypeError(
            f"method={method!r} ({type(method).__name__}) must be a method name ({', '.join(map(repr, METHODS))}) "
            f"or an attnpack method object such as attnpack.DenseAttention()"
        )
    cls = METHODS.get(method.strip().lower())
    if cls is None:
        raise ValueError(
            f"method={method!r} is not an attnpack method; accepted: {', '.join(map(repr, METHODS))}"
        )
    accepted = [f.name for f in dataclasses.fields(cls)]
    unknown = [key for key in config if key not in accepted]
    if unknown:
        raise TypeError(
            f"{cls.__name__} has no parameter {', '.join(map(repr, unknown))}; "
            f"accepted: {', '.join(accepted) if accepted else 'none'}"
        )
    return cls(**config)


__all__ = [
    "METHODS",
    "AgentAttention",
    "AttentionMethod",
    "ClearAttention",
    "DenseAttention",
    "FreeLongAttention",
    "FreeNoiseAttention",
    "IsolationAttention",
    "PooledAgentAttention",
    "RadialAttention",
    "Subject",
    "TrajectoryRoPE",
    "check_choice",
    "check_number",
    "make_method",
]
