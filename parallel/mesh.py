"""Process groups and the device mesh: one place that knows how ranks are arranged.

Mesh dimensions (outermost first): `dp_replicate` (HSDP replicas), `dp_shard` (FSDP shards),
`ep` (expert parallel) and `cp` (context parallel). Their product is the world size. This
version builds the `dp_shard` dimension; the others are validated to be 1 by the config.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    ep: int
    cp: int
    world_size: int

    def __post_init__(self) -> None:
        fixed = self.dp_replicate * self.ep * self.cp
        if self.dp_shard == -1:
            if self.world_size % fixed:
                raise ValueError(
                    f"world size {self.world_size} is not divisible by "
                    f"dp_replicate * ep * cp = {fixed}"
                )
            object.__setattr__(self, "dp_shard", self.world_size // fixed)
        degrees = (self.dp_replicate, self.dp_shard, self.ep, self.cp)
        if any(d < 1 for d in degrees) or fixed * self.dp_shard != self.world_size:
            raise ValueError(
                f"parallel degrees dp_replicate={self.dp_replicate} x dp_shard={self.dp_shard} x "
                f"ep={self.ep} x cp={self.cp} must multiply to the world size {self.world_size}"
            )

    @property
    def dp_size(self) -> int:
        """Ranks that read different data."""
        return self.dp_replicate * self.dp_shard

    def build_mesh(self, device_type: str) -> DeviceMesh:
        return init_device_mesh(device_type, (self.dp_shard,), mesh_dim_names=("dp_shard",))


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device


def init_distributed(device_type: str) -> DistributedContext:
    """Join the torchrun job, or form a one-rank group when started as a plain process.

    A one-rank group keeps a single code path: the model is always wrapped with FSDP2 and saved
    with DCP, whether the job has one process or thousands.
    """
    backend = "nccl" if device_type == "cuda" else "gloo"
    if "RANK" in os.environ:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        dist.init_process_group(backend)
    else:
        rank, world_size, local_rank = 0, 1, 0
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    if device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return DistributedContext(rank, local_rank, world_size, device)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over every rank, in place, and return the tensor."""
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor
