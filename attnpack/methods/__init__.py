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


def register_method(cls: type[AttentionMethod]) -> type[AttentionMethod]:
    """Offer a method class everywhere by its `name`: `attnpack.apply(pipe, name)`, generations, the CLI,
    workflows (`attnpack.Apply<Name>` nodes) and the app (built after it) read what it declares (`needs`).
    Returns the class, so it also works as a decorator."""
    if not (isinstance(cls, type) and issubclass(cls, AttentionMethod) and dataclasses.is_dataclass(cls)):
        raise TypeError(
            f"register_method: {cls!r} must be an AttentionMethod subclass declared as a dataclass"
        )
    name = cls.name
    if not isinstance(name, str) or not name.isidentifier() or name != name.lower():
        raise ValueError(f"register_method: {cls.__name__}.name={name!r} must be a lower-case identifier")
    if METHODS.get(name, cls) is not cls:
        raise ValueError(f"register_method: the name {name!r} is taken by {METHODS[name].__name__}")
    METHODS[name] = cls
    return cls


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
    "register_method",
]
