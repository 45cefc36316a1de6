"""One registry for every kernel op: its backends, why one cannot run on a call's arguments, its auto rule.

Each op registers here (`register_op`), and every call resolves its backend the same way: the call's
`backend=`, else `set_backend(...)` / `use_backend(...)`, else ATTNPACK_KERNEL_BACKEND, else "auto".

- An explicit `backend=` the op does not have, or cannot run on these arguments: ValueError.
- A process-wide choice the op does not have (say "chunked" for `best_match`): the op's auto choice,
  logged once at INFO. One it has but cannot run on these arguments: ValueError with the reason.
- "auto": the op's rule; every fallback to a slower backend is logged once at INFO on logger "attnpack".

This module imports no op: the ops import it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

logger = logging.getLogger("attnpack")

ENV_VAR = "ATTNPACK_KERNEL_BACKEND"
AUTO = "auto"

# A check gets the call's arguments (always `device`; the rest is the op's) and returns why the backend
# cannot run on them, or None when it can.
Check = Callable[..., "str | None"]
# An auto rule gets the same arguments and returns (backend, why it is a fallback or None).
AutoRule = Callable[..., "tuple[str, str | None]"]

_chosen: str | None = None
_logged: set[str] = set()


def log_once(message: str) -> None:
    """Log `message` at INFO the first time it comes, so that a fallback is reported, not repeated."""
    if message not in _logged:
        _logged.add(message)
        logger.info(message)


# ---- what this machine has


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (TRITON_INTERPRET=1): Triton's own setting, read live."""
    triton = sys.modules.get("triton")
    if triton is None and triton_installed():
        import triton
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"  # triton before 3.3, or none installed


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_runs_fast(device: torch.device) -> str | None:
    """Why compiled Triton kernels do not run on `device` (what auto asks), or None when they do."""
    if device.type != "cuda":
        return "no CUDA device"
    if not triton_installed():
        return "triton is not installed"
    return None


def triton_can_run(device: torch.device, **_: Any) -> str | None:
    """The check of every "triton" backend: CUDA tensors with triton installed, or Triton's interpreter."""
    if not triton_installed():
        return "needs the triton package (Linux only; not installed)"
    if device.type != "cuda" and not interpreting():
        return (
            f"needs CUDA tensors (got {device.type}); set TRITON_INTERPRET=1 to run the kernels in "
            "Triton's interpreter"
        )
    return None


def _triton_here() -> str | None:
    if not triton_installed():
        return "needs the triton package (Linux only; not installed)"
    if not torch.cuda.is_available() and not interpreting():
        return "no CUDA GPU here; TRITON_INTERPRET=1 runs the kernels in Triton's interpreter"
    return None


def _flex_here() -> str | None:
    if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
        return f"needs FlexAttention (torch {torch.__version__} has none)"
    return None


def _runs(**_: Any) -> None:
    return None


# ---- the registry


@dataclass(frozen=True)
class KernelBackend:
    """One backend of one op. `can_run(**call)`: why it cannot run on a call's arguments (None: it can);
    `requires()`: why it cannot run on this machine at all (what the registry listing reports)."""

    name: str
    summary: str
    can_run: Check = _runs
    requires: Callable[[], str | None] = _runs


@dataclass
class KernelOp:
    """An op, its backends in the order they are listed, and its auto rule."""

    name: str
    auto: AutoRule
    auto_summary: str
    backends: dict[str, KernelBackend] = field(default_factory=dict)

    def register(
        self, name: str, summary: str, *, can_run: Check = _runs, requires: Callable[[], str | None] = _runs
    ) -> KernelBackend:
        if name == AUTO or name in self.backends:
            raise ValueError(f"{self.name}: backend name {name!r} is reserved or already registered")
        self.backends[name] = KernelBackend(name, summary, can_run, requires)
        return self.backends[name]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.backends)

    def resolve(self, backend: str | None = None, /, **call: Any) -> str:
        """The backend this call runs on (see the module docstring for the order and the errors)."""
        if backend is not None:
            return self._checked(_normalised(backend, f"{self.name}: backend"), call)
        name, source = process_choice()
        if name != AUTO and name not in self.backends:
            choice, _ = self._auto(call)
            log_once(
                f"{self.name}: has no {name!r} backend (chosen by {source}; it has "
                f"{_listed(self.names)}), running its auto choice {choice!r}"
            )
            return choice
        return self._checked(name, call)

    def _checked(self, name: str, call: dict[str, Any]) -> str:
        if name == AUTO:
            return self._auto(call)[0]
        entry = self.backends.get(name)
        if entry is None:  # only an explicit choice gets here: a process-wide one ran auto above
            raise ValueError(f"{self.name}: backend={name!r} is not one of {_listed(self.names)} (or 'auto')")
        reason = entry.can_run(**call) or entry.requires()
        if reason:
            raise ValueError(f"{self.name}: backend={name!r} {reason}")
        return name

    def _auto(self, call: dict[str, Any]) -> tuple[str, str | None]:
        choice, fallback = self.auto(**call)
        if fallback:
            log_once(f"{self.name}: {fallback}")
        return choice, fallback


_OPS: dict[str, KernelOp] = {}


def register_op(name: str, auto: AutoRule, auto_summary: str) -> KernelOp:
    """A new op in the registry; register its backends on what this returns."""
    if name in _OPS:
        raise ValueError(f"register_op: name={name!r} is already registered")
    _OPS[name] = KernelOp(name, auto, auto_summary)
    return _OPS[name]


def get_op(name: str) -> KernelOp:
    if name not in _OPS:
        raise ValueError(f"get_op: name={name!r} is not one of {_listed(_OPS)}")
    return _OPS[name]


def backend_names() -> tuple[str, ...]:
    """What `set_backend` accepts: "auto" and every backend any op has, in registration order."""
    names = dict.fromkeys([AUTO])
    for entry in _OPS.values():
        names.update(dict.fromkeys(entry.backends))
    return tuple(names)


@dataclass(frozen=True)
class Backend:
    """A backend as `attnpack info` reports it: whether this machine can run it, and a detail."""

    name: str
    available: bool
    detail: str


def registry() -> dict[str, list[Backend]]:
    """Every op and its backends, each with whether it can run on this machine (and why not); the op's
    auto rule first, as "auto"."""
    listing = {}
    for name, entry in _OPS.items():
        rows = [Backend(AUTO, True, entry.auto_summary)]
        for backend in entry.backends.values():
            reason = backend.requires()
            rows.append(Backend(backend.name, reason is None, reason or backend.summary))
        listing[name] = rows
    return listing


# ---- the process-wide choice


def _listed(names) -> str:
    return ", ".join(map(repr, names))


def _normalised(name: Any, what: str) -> str:
    if not isinstance(name, str):
        raise ValueError(f"{what}={name!r} is not a backend name; choose one of {_listed(backend_names())}")
    return name.lower()


def process_choice() -> tuple[str, str]:
    """The process-wide choice and where it comes from ("set_backend", the environment variable, or
    "default"); a name that no op has raises ValueError."""
    if _chosen is not None:
        return _chosen, "set_backend"
    value = os.environ.get(ENV_VAR)
    if not value:
        return AUTO, "default"
    name = value.lower()
    if name not in backend_names():
        raise ValueError(f"{ENV_VAR}={value!r} is not one of {_listed(backend_names())}")
    return name, ENV_VAR


def current_backend() -> str:
    return _chosen or os.environ.get(ENV_VAR) or AUTO


def set_backend(name: str | None) -> str | None:
    """Choose the backend of every kernel op for this process ("auto" or any op's backend: "triton",
    "reference", "flex", "sdpa", "chunked"), or None to fall back to ATTNPACK_KERNEL_BACKEND / auto. An op
    without that backend runs its auto choice. Returns the previous choice."""
    global _chosen
    if name is not None:
        name = _normalised(name, "set_backend: name")
        if name not in backend_names():
            raise ValueError(f"set_backend: name={name!r} is not one of {_listed(backend_names())}")
    previous, _chosen = _chosen, name
    return previous


@contextlib.contextmanager
def use_backend(name: str | None):
    """`with use_backend("flex"): ...` — the backend inside the block, the previous one after."""
    previous = set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def triton_backend(summary: str, extra: Check = _runs) -> dict[str, Any]:
    """The keyword arguments of a "triton" registration: the shared device check, then the op's own."""

    def can_run(**call: Any) -> str | None:
        return extra(**call) or triton_can_run(**call)

    return dict(summary=summary, can_run=can_run, requires=_triton_here)


def flex_backend(summary: str) -> dict[str, Any]:
    return dict(summary=summary, requires=_flex_here)


def triton_or(fallback: str, running: str, extra: Check = _runs) -> AutoRule:
    """The auto rule of most ops: compiled Triton on CUDA where `extra` allows it, else `fallback`
    (logged once: "<why>, running <running>")."""

    def auto(**call: Any) -> tuple[str, str | None]:
        why = triton_runs_fast(call["device"])
        why = extra(**call) if why is None else f"{why} ({call['device'].type})"
        return ("triton", None) if why is None else (fallback, f"{why}, running {running}")

    return auto


__all__ = [
    "AUTO",
    "ENV_VAR",
    "Backend",
    "KernelBackend",
    "KernelOp",
    "backend_names",
    "current_backend",
    "get_op",
    "interpreting",
    "log_once",
    "process_choice",
    "register_op",
    "registry",
    "set_backend",
    "triton_can_run",
    "use_backend",
]
