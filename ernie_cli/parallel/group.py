"""The process group of a tensor-parallel run: who this process is, and the two collectives the
run needs (the sum of a layer's partial outputs, and rank 0's commands to the others).

There is one group per process (torch.distributed's default one): gloo on the CPU, nccl on CUDA.
A model in one process holds SINGLE, and the operations in kernels/ops.py skip every collective
for it, so the single-process forward is exactly what it was.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Group:
    rank: int = 0
    world: int = 1

    @property
    def leads(self) -> bool:
        return self.rank == 0


SINGLE = Group()

# How long a collective waits for its partners. Long: a follower that has loaded its part waits in
# its first collective until rank 0 has loaded its own, minutes for a large checkpoint. A crashed
# rank is noticed sooner than this: gloo sees its connections close, and rank 0 watches its
# followers (launch.py) while they watch it.
TIMEOUT = datetime.timedelta(hours=1)


def join(rank: int, world: int, init_method: str, device: torch.device) -> Group:
    """Enter the group of `world` processes that meet at init_method (blocks until all have come)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", init_method=init_method, rank=rank, world_size=world, timeout=TIMEOUT, device_id=device)
    else:
        dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world, timeout=TIMEOUT)
    return Group(rank, world)


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """x summed over the ranks, in place; every rank gets the same sum."""
    dist.all_reduce(x)
    return x


def broadcast(x: torch.Tensor) -> torch.Tensor:
    """rank 0's x, on every rank (in place)."""
    dist.broadcast(x, src=0)
    return x
