"""Versions and device: what `attnpack info` prints and every benchmark result records."""

from __future__ import annotations

import importlib.metadata
import platform
import re
from typing import Any

import torch

PACKAGES = ("torch", "triton", "diffusers", "transformers", "accelerate")


def package_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    from . import __version__

    return {"attnpack": __version__, "python": platform.python_version()} | {
        name: package_version(name) for name in PACKAGES
    }


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: torch.device | str | None = None) -> dict[str, Any]:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda":
        return {"type": "cpu", "name": cpu_name(), "cuda": torch.version.cuda, "count": 0}
    properties = torch.cuda.get_device_properties(device)
    return {
        "type": "cuda",
        "name": properties.name,
        "cuda": torch.version.cuda,
        "count": torch.cuda.device_count(),
        "capability": f"{properties.major}.{properties.minor}",
        "memory_gib": round(properties.total_memory / 2**30, 1),
        "multiprocessors": properties.multi_processor_count,
    }


def device_slug(info: dict[str, Any]) -> str:
    """A file-name-safe name for a device: "nvidia-h100-80gb-hbm3", "cpu"."""
    if info["type"] != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", info["name"].lower()).strip("-")
