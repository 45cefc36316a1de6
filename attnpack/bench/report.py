"""Timing and result files shared by the benchmarks: medians, JSON with device and versions, a PNG plot."""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def median_ms(
    fn: Callable[[], Any], device: torch.device, warmup_ms: float = 25, rep_ms: float = 100
) -> float:
    """Median time of `fn` in milliseconds: CUDA events through triton's do_bench on a GPU, a wall clock
    (after a synchronize) elsewhere."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    fn()  # warm-up
    times = []
    deadline = time.perf_counter() + rep_ms / 1000
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 100):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def random_model(
    cls: type, config: dict[str, Any], device: torch.device, dtype: torch.dtype
) -> torch.nn.Module:
    """A diffusers model from its config with random weights, made directly in `dtype` on `device`, in eval
    mode without gradients: speed does not depend on the weights."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(**config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def time_forward(model, inputs: dict, device: torch.device, repeats: int) -> float:
    """Median seconds of one forward, after a warm-up forward (kernel builds, autotuning)."""
    times = []
    with torch.inference_mode():
        model(**inputs)
        for _ in range(repeats):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                model(**inputs)
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1000)
            else:
                begin = time.perf_counter()
                model(**inputs)
                times.append(time.perf_counter() - begin)
    return sorted(times)[len(times) // 2]


def peak_memory_gib(fn: Callable[[], Any], device: torch.device) -> float | None:
    """Peak memory allocated during one call of `fn` above what was allocated before it, in GiB; None off CUDA."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    with torch.inference_mode():
        fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**30


def prepare_run(
    suite: str, names: list[str], known, smoke: tuple[str, ...], flag: str, device, out, overwrite: bool
) -> tuple[torch.device, dict[str, Any], Path]:
    """What every benchmark checks before it starts: known names, a GPU for the real sizes, a result path
    that will not overwrite anything unasked. Returns (device, device info, JSON path)."""
    from ..environment import device_info

    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"{flag} {', '.join(map(repr, unknown))} is not known; accepted: {', '.join(known)}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" and any(name not in smoke for name in names):
        raise ValueError(
            f"bench {suite} times real sizes on a CUDA GPU; this machine runs on {device.type}. "
            f"Use --{flag} {' '.join(smoke)} to check the benchmark itself on a CPU."
        )
    info = device_info(device)
    return device, info, result_path(suite, info, out, overwrite)


def result_path(suite: str, info: dict[str, Any], out, overwrite: bool) -> Path:
    """`out` (a JSON path or a folder; default benchmarks/results/) for `suite` on this device, refused
    when it exists and `overwrite` is not set."""
    from ..environment import device_slug

    name = f"{suite}-{device_slug(info)}.json"
    out = Path("benchmarks/results") / name if out is None else Path(out)
    if out.suffix != ".json":
        out = out / name
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it, or choose another --out")
    return out


def result_header(suite: str, info: dict[str, Any], dtype, timing: dict[str, Any], notes: list[str]) -> dict:
    """What every result file starts with: suite, time, device, versions, dtype, how it was timed, notes."""
    import datetime

    from ..environment import versions

    return {
        "benchmark": suite,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": info,
        "versions": versions(),
        "dtype": str(dtype).removeprefix("torch."),
        "timing": timing,
        "notes": notes,
    }


def write_atomically(path: Path, write: Callable[[Path], None], overwrite: bool) -> None:
    """Write through a temporary file in the same folder, then rename; refuse to replace an existing file
    unless `overwrite`."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite to replace it, or choose another --out")
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=path.suffix)
    os.close(handle)
    try:
        write(Path(temporary))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes it private; the result is a normal file
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_json(path: Path, data: dict, overwrite: bool) -> None:
    write_atomically(path, lambda p: p.write_text(json.dumps(data, indent=2) + "\n"), overwrite)


def plot_speedups(
    path: Path,
    title: str,
    groups: list[str],
    series: dict[str, list[float | None]],
    overwrite: bool,
    xlabel: str = "speedup over the best dense SDPA backend (higher is better)",
):
    """Grouped horizontal bars: one group per geometry, one bar per series (None: not measured)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = len(groups)
    height = 0.8 / max(1, len(series))
    figure, axis = plt.subplots(figsize=(9, 1.2 + 0.9 * rows * max(1, len(series)) / 3))
    for i, (name, values) in enumerate(series.items()):
        positions = [row + i * height for row in range(rows)]
        bars = [value if value is not None else 0.0 for value in values]
        drawn = axis.barh(positions, bars, height=height, label=name)
        for bar, value in zip(drawn, values, strict=True):
            label = "n/a" if value is None else f"{value:.2f}x"
            axis.text(
                bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {label}", va="center", fontsize=7
            )
    axis.set_yticks([row + height * (len(series) - 1) / 2 for row in range(rows)], groups, fontsize=8)
    axis.invert_yaxis()
    axis.axvline(1.0, color="gray", linewidth=0.8, linestyle="--")
    axis.set_xlabel(xlabel)
    axis.set_title(title, fontsize=10)
    axis.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    write_atomically(path, lambda p: figure.savefig(p, dpi=130, format="png"), overwrite)
    plt.close(figure)
