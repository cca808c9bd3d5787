"""torchrun plumbing: rank discovery, process group (also for one FSDP process), barriers."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup(need_group: bool = False) -> DistInfo:
    """Initialise the process group when launched by torchrun with WORLD_SIZE > 1, or whenever
    ``need_group`` (FSDP shards over a process group, even of one process started without torchrun)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    backend = "nccl" if cuda else "gloo"
    if dist.is_initialized():
        pass
    elif "MASTER_ADDR" in os.environ and (world > 1 or need_group):
        dist.init_process_group(backend=backend)
    elif need_group:  # one process started without torchrun
        dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    return DistInfo(rank, world, local, device)


def barrier(info: DistInfo) -> None:
    if dist.is_initialized():
        dist.barrier()


def mean(value: float, info: DistInfo) -> float:
    """The mean of a per-rank number over all ranks (collective; the value itself when single-process)."""
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return float(t.item()) / info.world


def teardown(info: DistInfo) -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
