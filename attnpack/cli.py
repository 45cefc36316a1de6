"""The `attnpack` command."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from . import __version__
from .environment import device_info, versions
from .families import FAMILIES
from .kernels import backends, registry
from .methods import METHODS
from .methods.needs import INPUT_KINDS

CLIP_ID, DINO_ID = "openai/clip-vit-base-patch32", "facebook/dinov2-small"


def system_info() -> dict[str, Any]:
    """Versions, device, kernel backends, methods and families: what `attnpack info` reports."""
    all_versions = versions()
    return {
        "attnpack": all_versions.pop("attnpack"),
        "python": all_versions.pop("python"),
        "versions": all_versions,
        "device": device_info(),
        "backends": [vars(backend) for backend in backends()],
        "kernel_ops": {op: [vars(backend) for backend in rows] for op, rows in registry().items()},
        "methods": {
            name: {
                "class": cls.__name__,
                "families": list(cls.families),
                "roles": sorted(role.value for role in cls.roles),
                "roles_by_family": {
                    family: sorted(role.value for role in cls.family_roles.get(family, cls.roles))
                    for family in cls.families
                },
                "runner": cls.needs.runner,
                "inputs": {
                    given.name: {
                        "kind": given.kind,
                        "required": given.required,
                        "or": list(given.alternatives),
                    }
                    for given in cls.needs.inputs
                },
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
    lines += ["", "kernel ops (backend: runs here?):"]
    for op, rows in info["kernel_ops"].items():
        auto, *named = rows
        listed = ", ".join(f"{row['name']} {'yes' if row['available'] else 'no'}" for row in named)
        lines.append(f"  {op:<32} {listed}")
        lines.append(f"  {'':<32} auto: {auto['detail']}")
    lines += ["", "methods:"]
    for name, method in info["methods"].items():
        lines.append(f"  {name:<13} {method['class']:<22} families: {', '.join(method['families'])}")
        by_family = method["roles_by_family"]
        if len({tuple(roles) for roles in by_family.values()}) > 1:
            layers = "; ".join(f"{family}: {', '.join(roles)}" for family, roles in by_family.items())
        else:
            layers = ", ".join(method["roles"])
        lines.append(f"  {'':<13} {'':<22} layers:   {layers}")
        if method["runner"] != "apply" or method["inputs"]:
            inputs = method["inputs"].items()
            needs = [" or ".join([name, *given["or"]]) for name, given in inputs if given["required"]]
            takes = [name for name, given in inputs if not given["required"]]
            runs = [f"runs through {method['runner']}"]
            runs += [f"needs {', '.join(needs)}"] * bool(needs) + [f"takes {', '.join(takes)}"] * bool(takes)
            lines.append(f"  {'':<13} {'':<22} {'; '.join(runs)}")
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
    info.set_defaults(handler=_info)
    info.add_argument("--json", action="store_true", help="print the report as JSON")

    bench = commands.add_parser("bench", help="time attnpack at real-model geometries (needs a CUDA GPU)")
    bench_commands = bench.add_subparsers(dest="suite", metavar="SUITE", required=True)
    kernels = bench_commands.add_parser(
        "kernels", help="block-sparse attention against SDPA, FlexAttention, xformers"
    )
    bench.set_defaults(handler=_bench)
    kernels.add_argument(
        "--geometry", dest="names", nargs="+", metavar="NAME", help="default: every real-model geometry"
    )
    kernels.add_argument("--dtype", default="bfloat16", help="bfloat16 (default) or float16")
    kernels.add_argument("--device", help="cuda (default when present) or cpu (the tiny geometry only)")
    kernels.add_argument(
        "--out", help="JSON path or folder (default benchmarks/results/kernels-<device>.json)"
    )
    kernels.add_argument("--overwrite", action="store_true", help="replace existing result files")
    kernels.add_argument("--warmup-ms", type=float, default=25.0)
    kernels.add_argument("--rep-ms", type=float, default=100.0)
    radial_bench = bench_commands.add_parser("radial", help="one transformer forward: dense against radial")
    radial_bench.add_argument(
        "--model", dest="names", nargs="+", metavar="NAME", help="default: every full-size model"
    )
    radial_bench.add_argument("--device", help="cuda (default when present) or cpu (the tiny model only)")
    radial_bench.add_argument(
        "--out", help="JSON path or folder (default benchmarks/results/radial-<device>.json)"
    )
    radial_bench.add_argument("--overwrite", action="store_true", help="replace existing result files")
    radial_bench.add_argument("--repeats", type=int, default=3, help="timed forwards per setting (median)")
    radial_bench.add_argument(
        "--parallel",
        choices=("ulysses", "ring"),
        help="under torchrun: every rank runs the model under diffusers' context parallelism",
    )
    clear_bench = bench_commands.add_parser(
        "clear", help="CLEAR: the attention op and a FLUX step, dense and local"
    )
    clear_bench.add_argument(
        "--resolution",
        dest="names",
        nargs="+",
        metavar="NAME",
        help="default: flux-1024 flux-2048 flux-4096",
    )
    clear_bench.add_argument("--device", help="cuda (default when present) or cpu (the tiny resolution only)")
    clear_bench.add_argument(
        "--out", help="JSON path or folder (default benchmarks/results/clear-<device>.json)"
    )
    clear_bench.add_argument("--overwrite", action="store_true", help="replace existing result files")
    clear_bench.add_argument(
        "--no-steps", dest="steps", action="store_false", help="the op only, no transformer"
    )
    clear_bench.add_argument("--repeats", type=int, default=3, help="timed transformer forwards (median)")
    agent_bench = bench_commands.add_parser(
        "agent", help="AgentSD: one UNet step, dense against stages 1 and 2"
    )
    agent_bench.add_argument(
        "--model", dest="names", nargs="+", metavar="NAME", help="default: sd1.5-512 sdxl-1024"
    )
    agent_bench.add_argument("--device", help="cuda (default when present) or cpu (the tiny model only)")
    agent_bench.add_argument(
        "--out", help="JSON path or folder (default benchmarks/results/agent-<device>.json)"
    )
    agent_bench.add_argument("--overwrite", action="store_true", help="replace existing result files")
    agent_bench.add_argument(
        "--repeats", type=int, default=5, help="timed UNet forwards per setting (median)"
    )
    temporal_bench = bench_commands.add_parser(
        "temporal", help="AnimateDiff temporal attention: FreeLong one pass, FreeNoise fused windows"
    )
    temporal_bench.add_argument(
        "--geometry", dest="names", nargs="+", metavar="NAME", help="default: the three motion-module levels"
    )
    temporal_bench.add_argument(
        "--device", help="cuda (default when present) or cpu (the tiny geometry only)"
    )
    temporal_bench.add_argument(
        "--out", help="JSON path or folder (default benchmarks/results/temporal-<device>.json)"
    )
    temporal_bench.add_argument("--overwrite", action="store_true", help="replace existing result files")
    temporal_bench.add_argument("--warmup-ms", type=float, default=25.0)
    temporal_bench.add_argument("--rep-ms", type=float, default=100.0)
    patterns_bench = bench_commands.add_parser(
        "patterns", help="every method's pattern at real geometries: build time, memory, densities"
    )
    patterns_bench.add_argument(
        "names", nargs="*", metavar="ROW", help="row names, shell patterns or prefixes (default: every real row; "
        "tiny: the smoke rows)"
    )  # fmt: skip
    patterns_bench.add_argument("--device", help="cuda (default when present) or cpu")
    patterns_bench.add_argument(
        "--out", help="JSON path or folder (default benchmarks/results/patterns-<device>.json)"
    )
    patterns_bench.add_argument("--overwrite", action="store_true", help="replace existing result files")
    patterns_bench.add_argument(
        "--time-limit", type=float, default=120.0, metavar="SECONDS",
        help="per row, each in its own process (default 120; 0: all rows in this process, no limit)",
    )  # fmt: skip
    generate = commands.add_parser(
        "generate", help="an image or video with a preset and a method, config embedded"
    )
    generate.set_defaults(handler=_generate)
    generate.add_argument("--preset", required=True, help="a preset name (attnpack presets lists them)")
    generate.add_argument("--method", default="dense", help="method name (default dense)")
    generate.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a method setting; VALUE is JSON or text",
    )
    generate.add_argument("--prompt", required=True)
    for given in declared_inputs():  # what methods take apart from their settings (`needs.inputs`)
        text = given.kind == "text"
        generate.add_argument(
            f"--{given.name.replace('_', '-')}",
            dest=f"input_{given.name}",
            metavar="TEXT" if text else "JSON",
            help=f"{given.label}: {INPUT_KINDS[given.kind]}{'' if text else ', as JSON or a .json file'}",
        )
    generate.add_argument("--out", required=True, help=".png for images, .mp4 for videos (+ .json sidecar)")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--steps", type=int, dest="num_inference_steps")
    generate.add_argument("--height", type=int)
    generate.add_argument("--width", type=int)
    generate.add_argument("--frames", type=int, dest="num_frames")
    generate.add_argument(
        "--compare-dense", action="store_true", help="also run dense: side by side, both timings"
    )
    generate.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    presets = commands.add_parser("presets", help="the presets: models, settings, methods")
    presets.set_defaults(handler=_presets)
    presets.add_argument("--json", action="store_true")
    run = commands.add_parser("run", help="run a ComfyUI-style workflow JSON (API or UI format)")
    run.set_defaults(handler=_run_workflow)
    run.add_argument("workflow", help="workflow JSON file")
    run.add_argument("--out", default=".", help="folder for the files the workflow saves (default: here)")
    schema = commands.add_parser("workflow-schema", help="print the JSON Schema of attnpack's node set")
    schema.set_defaults(handler=_workflow_schema)
    schema.add_argument("--out", help="write it to this file instead")
    evaluate = commands.add_parser(
        "eval", help="score outputs (a manifest) or a batch run: JSON + HTML report"
    )
    evaluate.set_defaults(handler=_eval)
    evaluate.add_argument(
        "manifest", nargs="?", help="manifest.json (or its folder) listing outputs to score"
    )
    evaluate.add_argument(
        "--prompts", help="a text file, one prompt per line: generate dense and --method, then score"
    )
    evaluate.add_argument("--preset", help="with --prompts: the preset")
    evaluate.add_argument("--method", help="with --prompts: the method")
    evaluate.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
    evaluate.add_argument("--seeds", type=int, nargs="+", default=[0])
    evaluate.add_argument(
        "--out", required=True, help="folder for report.json, report.html (and batch outputs)"
    )
    evaluate.add_argument(
        "--clip-model", default=None, help=f"CLIP id or folder for CLIP scores (e.g. {CLIP_ID})"
    )
    evaluate.add_argument(
        "--dino-model", default=None, help=f"DINO id or folder for similarity (e.g. {DINO_ID})"
    )
    evaluate.add_argument(
        "--lpips", action="store_true", help="also LPIPS to the dense outputs (needs torchvision and weights)"
    )
    evaluate.add_argument(
        "--lpips-net", choices=("alex", "vgg", "squeeze"), default="alex", help="LPIPS network"
    )
    for name, what in (("fid", "FID, Inception v3"), ("kid", "KID, Inception v3"), ("fvd", "FVD, I3D")):
        evaluate.add_argument(
            f"--{name}", action="store_true", help=f"also {what}: each method's outputs to the dense ones"
        )
    evaluate.add_argument("--fvd-model", metavar="PATH", help="with --fvd: the I3D file (i3d_torchscript.pt)")
    evaluate.add_argument("--overwrite", action="store_true")
    evaluate.add_argument(
        "--toy", action="store_true", help="measure every method on the shipped toy models (held-out world "
        "prompts, OpenCV shape detection): toy-quality-<device>.json, .md (the README's tables) and .png"
    )  # fmt: skip
    evaluate.add_argument(
        "--count", type=int, nargs=5, metavar=("PROMPTS", "SUBJECTS", "VIDEOS", "LONG", "TRAJECTORIES"),
        help="with --toy: how many of each (default: 32 12 12 6 9)"
    )  # fmt: skip
    pattern = commands.add_parser("pattern", help="a sparsity pattern at a geometry: densities and a picture")
    pattern_kinds = pattern.add_subparsers(dest="kind", metavar="PATTERN", required=True)
    radial = pattern_kinds.add_parser("radial", help="radial attention (video DiTs)")
    radial.add_argument("--frames", type=int, required=True, help="latent frames")
    radial.add_argument(
        "--frame-shape", type=int, nargs=2, required=True, metavar=("H", "W"), help="tokens per frame"
    )
    pattern.set_defaults(handler=_pattern)
    radial.add_argument("--decay-factor", type=float, default=1.0)
    radial.add_argument("--no-sink", dest="sink", action="store_false", help="no full first key frame")
    radial.add_argument("--text-tokens", type=int, default=0)
    radial.add_argument("--text-first", action="store_true")
    radial.add_argument("--variant", default="official", help="official (default) or spatial")
    radial.add_argument("--block-size", type=int, default=128)
    radial.add_argument("--png", help="write a picture of the block map (the token mask for short sequences)")
    radial.add_argument("--overwrite", action="store_true", help="replace an existing --png file")
    distill = commands.add_parser("distill", help="train attention for a method")
    distill_kinds = distill.add_subparsers(dest="kind", metavar="METHOD", required=True)
    clear = distill_kinds.add_parser("clear", help="CLEAR attention for FLUX, against the dense teacher")
    clear.add_argument("--model", required=True, help="a FLUX pipeline: Hub id, local folder, or tiny-flux")
    clear.add_argument(
        "--images", required=True, help="folder of teacher images (prompt: name.txt beside name.png)"
    )
    distill.set_defaults(handler=_distill_clear)
    clear.add_argument("--out", required=True, help="safetensors file to write")
    clear.add_argument("--radius", type=float, default=16)
    clear.add_argument("--down-factor", type=int, default=None)
    clear.add_argument("--steps", type=int, default=1000)
    clear.add_argument("--learning-rate", type=float, default=1e-4)
    clear.add_argument("--resolution", type=int, default=1024)
    clear.add_argument("--batch-size", type=int, default=1)
    clear.add_argument("--mixed-precision", default="no", help="no, fp16 or bf16 (accelerate)")
    clear.add_argument("--seed", type=int, default=0)
    clear.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    train = commands.add_parser("train", help="train a toy model on the procedural world (resumable)")
    train.add_argument(
        "model", choices=["toy-image", "toy-video"], help="toy-image (FLUX) or toy-video (Wan)"
    )
    train.set_defaults(handler=_train)
    train.add_argument("--out", help="folder for the trained pipeline (default: ./toy-image or ./toy-video)")
    train.add_argument(
        "--work-dir", help="checkpoints and the latent cache; a second run resumes there "
        "(default: .attnpack-train/<model>)"
    )  # fmt: skip
    train.add_argument("--steps", type=int, help="denoiser steps (default: the recipe's)")
    train.add_argument("--vae-steps", type=int, help="VAE steps (default: the recipe's)")
    train.add_argument("--batch", type=int, help="denoiser batch (default: the recipe's)")
    train.add_argument(
        "--samples", type=int, help="training set size in world samples (default: the recipe's)"
    )
    train.add_argument("--learning-rate", type=float, help="denoiser learning rate (default: the recipe's)")
    train.add_argument("--seed", type=int, help="default: the recipe's (0)")
    train.add_argument("--mixed-precision", default="no", help="no, fp16 or bf16 (accelerate; GPU)")
    train.add_argument("--restart", action="store_true", help="discard the work folder's checkpoints")
    train.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 2
    return args.handler(args)


def _info(args) -> int:
    report = system_info()
    sys.stdout.write(json.dumps(report, indent=2) + "\n" if args.json else format_info(report))
    return 0


def _workflow_schema(args) -> int:
    from .workflow import schema

    text = json.dumps(schema(), indent=2) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def load_flux(model: str):
    """A FluxPipeline from a Hub id or a local folder, or the tiny random-weight one ("tiny-flux")."""
    if model == "tiny-flux":
        from .pipelines import build_tiny_pipeline

        return build_tiny_pipeline("tiny-flux")
    from diffusers import FluxPipeline

    try:
        return FluxPipeline.from_pretrained(model)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"could not load the FLUX pipeline {model!r} ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
            f"give a local folder, or download it first: `huggingface-cli download {model}` (HF_HUB_OFFLINE unset)"
        ) from error


def _distill_clear(args) -> int:
    from .training import distill_clear

    try:
        pipe = load_flux(args.model)
        result = distill_clear(
            pipe,
            args.images,
            args.out,
            radius=args.radius,
            down_factor=args.down_factor,
            steps=args.steps,
            learning_rate=args.learning_rate,
            resolution=args.resolution,
            batch_size=args.batch_size,
            mixed_precision=args.mixed_precision,
            seed=args.seed,
            overwrite=args.overwrite,
        )
    except (ValueError, FileExistsError) as error:
        sys.stderr.write(f"attnpack distill clear: {error}\n")
        return 2
    losses = result.losses
    head, tail = losses[: max(1, len(losses) // 10)], losses[-max(1, len(losses) // 10) :]
    sys.stdout.write(
        f"loss {sum(head) / len(head):.4f} -> {sum(tail) / len(tail):.4f} over {len(losses)} steps\n"
        f"wrote {result.path}: load it with attnpack.ClearAttention(radius={args.radius:g}"
        f"{f', down_factor={args.down_factor}' if args.down_factor else ''}, weights={str(result.path)!r})\n"
    )
    return 0


def _train(args) -> int:
    from .training.toy import RECIPES, train_toy

    kind = args.model.removeprefix("toy-")
    overrides = {"steps": args.steps, "vae_steps": args.vae_steps, "batch": args.batch, "samples": args.samples,
                 "learning_rate": args.learning_rate, "seed": args.seed}  # fmt: skip
    try:
        result = train_toy(
            kind,
            args.out or args.model,
            work_dir=args.work_dir,
            recipe=RECIPES[kind].with_overrides(**overrides),
            restart=args.restart,
            overwrite=args.overwrite,
            mixed_precision=args.mixed_precision,
        )
    except (ValueError, FileExistsError) as error:
        sys.stderr.write(f"attnpack train {args.model}: {error}\n")
        return 2
    scores = ", ".join(f"{k} {v:.3f}" for k, v in result.metrics["adherence"].items())
    sys.stdout.write(
        f"wrote {result.out}; adherence on {result.metrics['count']} held-out prompts: {scores}\n"
    )
    return 0


def _pattern(args) -> int:
    from .bench.report import write_atomically
    from .patterns import radial
    from .patterns.pictures import block_map_image, mask_image

    try:
        pattern = radial(
            args.frames,
            tuple(args.frame_shape),
            decay_factor=args.decay_factor,
            sink=args.sink,
            text_tokens=args.text_tokens,
            text_first=args.text_first,
            variant=args.variant,
            block_size=args.block_size,
        )
        lines = [
            f"radial ({args.variant}): {args.frames} frames x {args.frame_shape[0]} x {args.frame_shape[1]} tokens"
            f" + {args.text_tokens} text = {pattern.q_len:,} tokens",
            f"blocks {pattern.block_q} x {pattern.block_kv}: {pattern.num_blocks:,} of "
            f"{pattern.num_q_blocks * pattern.num_kv_blocks:,} computed",
            f"block density   {pattern.block_density:.4f}",
            f"element density {pattern.element_density:.4f}",
        ]
        if args.png:
            picture = mask_image(pattern) if pattern.q_len <= 4096 else block_map_image(pattern)
            write_atomically(args.png, lambda path: picture.save(path, format="PNG"), args.overwrite)
            lines.append(f"wrote {args.png}")
    except (ValueError, FileExistsError) as error:
        sys.stderr.write(f"attnpack pattern radial: {error}\n")
        return 2
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def declared_inputs() -> list:
    """Every method's own inputs (`needs.inputs`), each name once, in method order."""
    found = {given.name: given for cls in METHODS.values() for given in cls.needs.inputs}
    return list(found.values())


def input_params(args) -> dict:
    """The declared inputs given on the command line, as method settings (JSON from text or a .json file)."""
    params = {}
    for given in declared_inputs():
        value = getattr(args, f"input_{given.name}", None)
        if value is None:
            continue
        if given.kind != "text":
            flag = f"--{given.name.replace('_', '-')}"
            try:
                text = Path(value).read_text() if value.endswith(".json") else value
                value = json.loads(text)
            except (OSError, json.JSONDecodeError) as error:
                raise ValueError(f"{flag} {value!r}: not JSON or a readable .json file ({error})") from error
        params[given.name] = value
    return params


def parse_params(pairs: list[str]) -> dict:
    """["k=v", ...] -> {k: v}, v read as JSON where it parses (numbers, booleans, lists), else as text."""
    params = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--param {pair!r} must be KEY=VALUE")
        try:
            params[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            params[key.strip()] = value
    return params


def _generate(args) -> int:
    from .pipelines import ModelUnavailable, generate, save

    out = args.out
    try:
        params = {**parse_params(args.param), **input_params(args)}
        if Path(out).exists() and not args.overwrite:
            raise FileExistsError(f"{out} exists; pass --overwrite to replace it, or choose another --out")
        overrides = {k: getattr(args, k) for k in ("num_inference_steps", "height", "width", "num_frames")}
        result = generate(
            args.preset, args.prompt, method=args.method, params=params, seed=args.seed,
            compare_dense=args.compare_dense, **overrides,
        )  # fmt: skip
        written = save(result, out, overwrite=args.overwrite)
    except (ValueError, TypeError, FileExistsError, ModelUnavailable) as error:
        sys.stderr.write(f"attnpack generate: {error}\n")
        return 2
    line = f"{args.method}: {result.seconds:.2f} s"
    if result.dense_seconds is not None:
        line += f", dense {result.dense_seconds:.2f} s ({result.speedup:.2f}x)"
    sys.stdout.write(f"{line}\nwrote {', '.join(map(str, written))}\n")
    return 0


def _eval(args) -> int:
    from .eval import MetricModelUnavailable, evaluate_manifest, run_batch, write_report
    from .pipelines import ModelUnavailable

    if args.toy:
        return _eval_toy(args)
    models = {
        "clip_model": args.clip_model,
        "dino_model": args.dino_model,
        "lpips_net": args.lpips_net if args.lpips else None,
        "sets": tuple(name for name in ("fid", "kid", "fvd") if getattr(args, name)),
        "video_features": args.fvd_model,
    }
    try:
        if args.prompts:
            if not (args.preset and args.method):
                raise ValueError("--prompts needs --preset and --method")
            lines = [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
            rows = run_batch(lines, preset=args.preset, method=args.method, params=parse_params(args.param),
                             seeds=args.seeds, out=args.out, overwrite=args.overwrite, **models)  # fmt: skip
        elif args.manifest:
            rows = evaluate_manifest(args.manifest, **models)
        else:
            raise ValueError("give a manifest, or --prompts with --preset and --method")
        written = write_report(rows, args.out, overwrite=args.overwrite)
    except (ValueError, OSError, FileExistsError, MetricModelUnavailable, ModelUnavailable) as error:
        sys.stderr.write(f"attnpack eval: {error}\n")
        return 2
    scored = sum("thumbnail" in row for row in rows)  # the rest: per-method set distances
    sys.stdout.write(f"scored {scored} outputs; wrote {', '.join(map(str, written))}\n")
    return 0


def _eval_toy(args) -> int:
    from .eval.toy import quality_tables, toy_quality, write_quality

    names = ("prompts", "subjects", "videos", "long_videos", "trajectories")
    counts = dict(zip(names, args.count, strict=True)) if args.count else {}
    try:
        if any(n < 1 for n in counts.values()):
            raise ValueError(f"--count {' '.join(map(str, args.count))}: every count must be >= 1")
        result, outputs = toy_quality(**counts)
        written = write_quality(result, outputs, args.out, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        sys.stderr.write(f"attnpack eval --toy: {error}\n")
        return 2
    sys.stdout.write(quality_tables(result) + f"\nwrote {', '.join(map(str, written))}\n")
    return 0


def _run_workflow(args) -> int:
    from .pipelines import ModelUnavailable
    from .workflow import WorkflowError, run

    try:
        results = run(args.workflow, output_dir=args.out)
    except (WorkflowError, ValueError, FileExistsError, ModelUnavailable, OSError) as error:
        sys.stderr.write(f"attnpack run: {error}\n")
        return 2
    for node_id, outputs in results.items():
        for output in outputs:
            if isinstance(output, dict):
                sys.stdout.write(f"node {node_id}: {json.dumps(output)}\n")
    sys.stdout.write(f"ran {len(results)} nodes; files in {args.out}\n")
    return 0


def _presets(args) -> int:
    from .pipelines import PRESETS

    described = {name: preset.describe() for name, preset in PRESETS.items()}
    if args.json:
        sys.stdout.write(json.dumps(described, indent=2, default=str) + "\n")
        return 0
    for name, preset in described.items():
        sys.stdout.write(
            f"{name:<20} {preset['kind']:<6} {preset['model']:<48} methods: {', '.join(preset['methods'])}\n"
        )
    return 0


def _bench(args) -> int:
    import importlib

    suite = importlib.import_module(f".bench.{args.suite}", "attnpack")
    options = {name: getattr(args, name) for name in suite.OPTIONS}
    try:
        path = suite.run(
            args.names or suite.DEFAULT, device=args.device, out=args.out, overwrite=args.overwrite, **options
        )
    except (ValueError, FileExistsError) as error:
        sys.stderr.write(f"attnpack bench {args.suite}: {error}\n")
        return 2
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_rank() != 0:
        return 0  # rank 0 wrote the result and reports it
    lines = suite.table(json.loads(path.read_text()))
    lines.append(f"wrote {path} and {path.with_suffix('.png')}")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
