"""Benchmarks over the GPUs of one `torchrun`: every rank runs the same model under diffusers' context
parallelism, the slowest rank's time counts, rank 0 writes the result.

    torchrun --nproc_per_node=8 -m attnpack.cli bench radial --parallel ulysses
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..parallel import MODES


@dataclass(frozen=True)
class Ranks:
    mode: str  # "ulysses" or "ring"
    world: int
    rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def label(self) -> str:
        return f"{self.mode}{self.world}"

    def config(self):
        """A fresh ContextParallelConfig for one model (enable_parallelism sets it up per model)."""
        from diffusers import ContextParallelConfig

        if self.mode == "ulysses":
            return ContextParallelConfig(ulysses_degree=self.world)
        return ContextParallelConfig(ring_degree=self.world)

    def slowest(self, seconds: float) -> float:
        """The largest of the ranks' times: a step is done when its slowest rank is."""
        import torch.distributed as dist

        value = torch.tensor([seconds], dtype=torch.float64, device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return float(value.item())

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()


def start(mode: str | None, device: str | None) -> Ranks | None:
    """The ranks of this torchrun for `--parallel mode`, with the process group started; None without."""
    if mode is None:
        return None
    if mode not in MODES:
        raise ValueError(f"--parallel {mode!r} is not accepted; choose one of {', '.join(MODES)}")
    import torch.distributed as dist

    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ:
            raise ValueError(
                f"--parallel {mode} runs one process per GPU: start it with torchrun, e.g. "
                f"torchrun --nproc_per_node=2 -m attnpack.cli bench radial --parallel {mode}"
            )
        cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        dist.init_process_group("nccl" if cuda else "gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    if world < 2:
        raise ValueError(f"--parallel {mode} needs at least 2 processes; torchrun started {world}")
    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        place = torch.device("cuda", local)
    else:
        if torch.accelerator.device_count() == 0:
            raise ValueError(
                "--parallel on the CPU: diffusers' enable_parallelism places rank r on device "
                "r % torch.accelerator.device_count(), which is 0 on a CPU build of torch (see the README's "
                "known issues); run it on GPUs"
            )
        place = torch.device("cpu")
    return Ranks(mode, world, rank, place)
