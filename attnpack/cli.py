"""The `attnpack` command."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import sys
from typing import Any

import torch

from . import __version__
from .families import FAMILIES
from .kernels import backends
from .methods import METHODS


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def system_info() -> dict[str, Any]:
    """Versions, device, kernel backends, methods and families: what `attnpack info` reports."""
    cuda = torch.cuda.is_available()
    device = {
        "type": "cuda" if cuda else "cpu",
        "name": torch.cuda.get_device_name() if cuda else _cpu_name(),
        "cuda": torch.version.cuda,
        "count": torch.cuda.device_count() if cuda else 0,
    }
    if cuda:
        device["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        device["memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return {
        "attnpack": __version__,
        "python": platform.python_version(),
        "versions": {
            name: _version(name) for name in ("torch", "triton", "diffusers", "transformers", "accelerate")
        },
        "device": device,
        "backends": [vars(backend) for backend in backends()],
        "methods": {
            name: {
                "class": cls.__name__,
                "families": list(cls.families),
                "roles": sorted(role.value for role in cls.roles),
            }
            for name, cls in METHODS.items()
        },
        "families": {
            name: {"title": family.title, "denoisers": list(family.denoiser_classes)}
            for name, family in FAMILIES.items()
        },
    }


def format_info(info: dict[str, Any]) -> str:
    versions = ", ".join(f"{name} {version or 'not installed'}" for name, version in info["versions"].items())
    device = info["device"]
    if device["type"] == "cuda":
        where = f"CUDA: {device['name']} (x{device['count']}, sm {device['capability']}, {device['memory_gib']} GiB)"
    else:
        where = f"CPU: {device['name']} (no CUDA GPU)"
    lines = [
        f"attnpack {info['attnpack']}  (python {info['python']})",
        f"versions: {versions}",
        f"device:   {where}",
        "",
        "kernel backends:",
    ]
    for backend in info["backends"]:
        lines.append(
            f"  {backend['name']:<15} {'yes' if backend['available'] else 'no ':<4} {backend['detail']}"
        )
    lines += ["", "methods:"]
    for name, method in info["methods"].items():
        lines.append(f"  {name:<10} {method['class']:<22} families: {', '.join(method['families'])}")
        lines.append(f"  {'':<10} {'':<22} layers:   {', '.join(method['roles'])}")
    lines += ["", "families:"]
    for name, family in info["families"].items():
        lines.append(f"  {name:<14} {family['title']}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="attnpack", description="Sparse and structured attention for diffusers pipelines."
    )
    parser.add_argument("--version", action="version", version=f"attnpack {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = commands.add_parser(
        "info", help="versions, device, kernel backends, methods and the families they support"
    )
    info.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)

    if args.command == "info":
        report = system_info()
        sys.stdout.write(json.dumps(report, indent=2) + "\n" if args.json else format_info(report))
        return 0
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
