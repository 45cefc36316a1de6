"""Saying so when a method does not act: a layer that falls back to dense attention is logged at INFO, and a
denoiser call in which every layer a method acts on fell back is a WARNING, once per method and cause, since
the user then gets plain attention under the method's name."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .families.base import AttnCall
    from .methods.base import AttentionMethod

logger = logging.getLogger("attnpack")

_warned: set[tuple[str, ...]] = set()


def warn_once(key: tuple[str, ...], message: str, *args) -> None:
    """A WARNING the first time `key` comes up in this process, INFO after that."""
    level = logging.INFO if key in _warned else logging.WARNING
    _warned.add(key)
    logger.log(level, message, *args)


@dataclass
class ForwardCoverage:
    """Per denoiser call: how many calls of the method's acting layers ran, and which fell back, with why."""

    acting: dict[str, int] = field(default_factory=dict)  # method name -> calls on layers it acts on
    fallbacks: dict[str, dict[str, str]] = field(default_factory=dict)  # method name -> {site: reason}
    fallback_calls: dict[str, int] = field(default_factory=dict)

    def reset(self) -> None:
        self.acting.clear()
        self.fallbacks.clear()
        self.fallback_calls.clear()

    def act(self, method: AttentionMethod) -> None:
        self.acting[method.name] = self.acting.get(method.name, 0) + 1

    def fall_back(self, method: AttentionMethod, site: str, reason: str) -> None:
        self.fallbacks.setdefault(method.name, {})[site] = reason
        self.fallback_calls[method.name] = self.fallback_calls.get(method.name, 0) + 1

    def report(self, denoiser: str | None) -> None:
        """After the denoiser call: warn for every method that acted on no layer at all."""
        for name, calls in self.acting.items():
            if calls and self.fallback_calls.get(name, 0) >= calls:
                reasons = sorted(set(self.fallbacks[name].values()))
                warn_once(
                    (name, denoiser or "", *reasons),
                    "attnpack: %r ran plain dense attention on every layer it acts on in this %s call (%s); "
                    "the output is the stock model's, not the method's",
                    name,
                    denoiser or "denoiser",
                    "; ".join(reasons),
                )
        self.reset()


def fall_back(method: AttentionMethod, call: AttnCall, reason: str) -> None:
    """Record that `method` runs `call` dense because of `reason` (e.g. "no video grid"): INFO per layer, and
    the denoiser call's report warns when no acting layer was left."""
    site = call.site.name if call.site is not None else type(call.module).__name__
    logger.info("%s: %s for %s, running it dense", type(method).__name__, reason, site)
    coverage = getattr(call.context, "coverage", None)
    if coverage is not None:
        coverage.fall_back(method, site, reason)


class CoverageReport:
    """Forward pre-hook and hook on a denoiser: starts and ends the coverage of one call."""

    def __init__(self, coverage: ForwardCoverage, denoiser: str):
        self.coverage, self.denoiser = coverage, denoiser

    def start(self, module, args, kwargs):
        self.coverage.reset()

    def end(self, module, args, kwargs, output):
        self.coverage.report(self.denoiser)
