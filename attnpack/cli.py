"""The `attnpack` command."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from . import __version__
from .environment import device_info, versions
from .families import FAMILIES
from .kernels import backends
from .methods import METHODS


def system_info() -> dict[str, Any]:
    """Versions, device, kernel backends, methods and families: what `attnpack info` reports."""
    all_versions = versions()
    return {
        "attnpack": all_versions.pop("attnpack"),
        "python": all_versions.pop("python"),
        "versions": all_versions,
        "device": device_info(),
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

    bench = commands.add_parser("bench", help="time attnpack at real-model geometries (needs a CUDA GPU)")
    bench_commands = bench.add_subparsers(dest="suite", metavar="SUITE", required=True)
    kernels = bench_commands.add_parser(
        "kernels", help="block-sparse attention against SDPA, FlexAttention, xformers"
    )
    kernels.add_argument("--geometry", nargs="+", metavar="NAME", help="default: every real-model geometry")
    kernels.add_argument("--dtype", default="bfloat16", help="bfloat16 (default) or float16")
    kernels.add_argument("--device", help="cuda (default when present) or cpu (the tiny geometry only)")
    kernels.add_argument(
        "--out", help="JSON path or folder (default benchmarks/results/kernels-<device>.json)"
    )
    kernels.add_argument("--overwrite", action="store_true", help="replace existing result files")
    kernels.add_argument("--warmup-ms", type=float, default=25.0)
    kernels.add_argument("--rep-ms", type=float, default=100.0)
    args = parser.parse_args(argv)

    if args.command == "info":
        report = system_info()
        sys.stdout.write(json.dumps(report, indent=2) + "\n" if args.json else format_info(report))
        return 0
    if args.command == "bench":
        return _bench_kernels(args)
    parser.print_help()
    return 2


def _bench_kernels(args) -> int:
    from .bench import kernels

    try:
        path = kernels.run(
            args.geometry or kernels.DEFAULT_GEOMETRIES,
            device=args.device,
            dtype=args.dtype,
            out=args.out,
            overwrite=args.overwrite,
            warmup_ms=args.warmup_ms,
            rep_ms=args.rep_ms,
        )
    except (ValueError, FileExistsError) as error:
        sys.stderr.write(f"attnpack bench kernels: {error}\n")
        return 2
    result = json.loads(path.read_text())
    lines = [f"{'geometry':<24} {'implementation':<16} {'ms':>10} {'TFLOP/s':>9}  note"]
    for record in result["geometries"]:
        for row in record["rows"]:
            note = row.get("skipped", "")
            ms = f"{row['ms']:.3f}" if "ms" in row else "-"
            tflops = f"{row['tflops']:.1f}" if "tflops" in row else "-"
            lines.append(f"{record['geometry']:<24} {row['implementation']:<16} {ms:>10} {tflops:>9}  {note}")
        summary = ", ".join(f"{k}={v}" for k, v in record["summary"].items())
        lines.append(f"{'':<24} {summary}")
    lines.append(f"wrote {path} and {path.with_suffix('.png')}")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
