"""Process groups and device meshes: the one place that knows how ranks are arranged.

Degrees (the `parallel.*` config keys) and what each mesh dimension means:

    dp_replicate     HSDP replicas. Each replica holds a full (sharded) copy of the model;
                     gradients are all-reduced across replicas after the in-replica
                     reduce-scatter. Ranks in different replicas read different rows.
    dp_shard         FSDP shards inside one replica; -1 means "every rank the other dimensions
                     leave": world_size / (dp_replicate * cp). Ranks read different rows.
    cp               context parallel: ranks that split ONE sequence into chunks. They read the
                     same rows, and they also shard the dense parameters (FSDP runs over
                     dp_shard x cp, as in torchtitan), since their parameters are identical.
    ep               expert parallel. Not a factor of the world size: it BORROWS its ranks from
                     dp_shard x cp (torchtitan's design), so ep must divide dp_shard * cp.

    world_size = dp_replicate * dp_shard * cp

`build_mesh` makes one root mesh, `world`, with dims ("dp_replicate", "dp_shard", "cp") in that
order (cp innermost, so a sequence's chunks sit on neighbouring ranks: the same node when the
degrees allow). Every other mesh is a view of the same ranks, made with `_flatten`/`_unflatten`
from the root and bookkept here (torch deprecates slicing flattened dims out of a root mesh):

    dp_shard_cp      flatten(dp_shard, cp): the FSDP shard dim of the dense parameters
    fsdp             the dense parameters' FSDP mesh: ("dp_replicate", "dp_shard_cp") when
                     dp_replicate > 1 (HSDP), else ("dp_shard_cp",)
    dp               flatten(dp_replicate, dp_shard): data-loading ranks; a rank reads rows
                     `dp.get_local_rank()` of `dp_size` (cp ranks of one group read alike)
    experts          ("dp_replicate", "dp_shard_mod_ep", "ep"): dp_shard_cp unflattened into
                     (dp_shard * cp / ep, ep), row-major, so an ep group is ep consecutive ranks
                     of dp_shard_cp. Expert weights are split over "ep" (E / ep experts a rank)
                     and FSDP-sharded over "dp_shard_mod_ep" (`expert_fsdp`, with
                     "dp_replicate" in front for HSDP). With ep = 1 it equals the dense layout.
    ep               the 1-D expert-parallel group (all-to-all token dispatch and combine)

For 4 ranks, the groups of each view (R dp_replicate, S dp_shard, C cp, E ep; a group is written
as its ranks, "-" means every rank alone). tests/parallel/test_mesh.py checks each row.

    degrees          dp_shard_cp  dp_replicate  cp      dp      ep      dp_shard_mod_ep
    S=4              0123         -             -       0123    -       0123
    S=4 E=2          0123         -             -       0123    01 23   02 13
    S=4 E=4          0123         -             -       0123    0123    -
    S=2 C=2          0123         -             01 23   02 13   -       0123
    S=2 C=2 E=2      0123         -             01 23   02 13   01 23   02 13
    S=2 C=2 E=4      0123         -             01 23   02 13   0123    -
    R=2 S=2          01 23        02 13         -       0123    -       01 23
    R=2 S=2 E=2      01 23        02 13         -       0123    01 23   -

With C=2 E=2 the ep groups are exactly the cp groups; with E=4 an ep group spans several cp
groups. Any E dividing S*C works: token dispatch only needs E ranks holding distinct tokens.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

ROOT_DIMS = ("dp_replicate", "dp_shard", "cp")
DENSE_DIMS = ("dp_replicate", "dp_shard_cp")
EXPERT_DIMS = ("dp_replicate", "dp_shard_mod_ep", "ep")


@dataclass(frozen=True)
class ParallelDims:
    """Parallel degrees checked against the world size (see the module docstring for the dims).

    Errors name the config keys (`parallel.dp_shard`, ...), so a bad config is fixed at once.
    """

    dp_replicate: int
    dp_shard: int
    ep: int
    cp: int
    world_size: int

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"the world size must be >= 1; got {self.world_size}")
        for key in ("dp_replicate", "ep", "cp"):
            if getattr(self, key) < 1:
                raise ValueError(f"parallel.{key} must be >= 1; got {getattr(self, key)}")
        others = self.dp_replicate * self.cp
        if self.dp_shard == -1:
            if self.world_size % others:
                raise ValueError(
                    f"parallel.dp_shard = -1 takes the ranks that parallel.dp_replicate "
                    f"({self.dp_replicate}) x parallel.cp ({self.cp}) = {others} leave, but the "
                    f"world size {self.world_size} is not divisible by {others}"
                )
            object.__setattr__(self, "dp_shard", self.world_size // others)
        if self.dp_shard < 1:
            raise ValueError(
                f"parallel.dp_shard must be >= 1, or -1 for the rest of the ranks; "
                f"got {self.dp_shard}"
            )
        if others * self.dp_shard != self.world_size:
            raise ValueError(
                f"parallel.dp_replicate ({self.dp_replicate}) x parallel.dp_shard "
                f"({self.dp_shard}) x parallel.cp ({self.cp}) = {others * self.dp_shard} must "
                f"equal the world size {self.world_size} (parallel.ep borrows its ranks from "
                "dp_shard x cp and is not a factor; parallel.dp_shard = -1 takes the rest)"
            )
        if self.dp_shard_cp % self.ep:
            raise ValueError(
                f"parallel.ep ({self.ep}) must divide parallel.dp_shard ({self.dp_shard}) x "
                f"parallel.cp ({self.cp}) = {self.dp_shard_cp}: expert parallelism borrows its "
                "ranks from the dp_shard x cp ranks of each replica"
            )

    @property
    def dp_replicate_enabled(self) -> bool:
        return self.dp_replicate > 1

    @property
    def dp_shard_enabled(self) -> bool:
        return self.dp_shard > 1

    @property
    def cp_enabled(self) -> bool:
        return self.cp > 1

    @property
    def ep_enabled(self) -> bool:
        return self.ep > 1

    @property
    def fsdp_enabled(self) -> bool:
        """Dense parameters are sharded over more than one rank (dp_shard x cp)."""
        return self.dp_shard_cp > 1

    @property
    def dp_size(self) -> int:
        """Ranks that read different rows of each global batch."""
        return self.dp_replicate * self.dp_shard

    @property
    def dp_shard_cp(self) -> int:
        """Ranks the dense parameters are sharded over, within one replica."""
        return self.dp_shard * self.cp

    @property
    def dp_shard_mod_ep(self) -> int:
        """Ranks each expert's weights are FSDP-sharded over, within one replica."""
        return self.dp_shard_cp // self.ep

    def build_mesh(self, device_type: str) -> ParallelMeshes:
        """Create the root mesh and its views; a collective: every rank must call it."""
        world = init_device_mesh(
            device_type, (self.dp_replicate, self.dp_shard, self.cp), mesh_dim_names=ROOT_DIMS
        )
        # One 1-D view of all ranks in root order, re-split into each layout below: views made
        # this way share the root's rank order, so "ep borrows from dp_shard x cp" is exact.
        flat = world._flatten("world")
        dense = flat._unflatten(0, (self.dp_replicate, self.dp_shard_cp), DENSE_DIMS)
        data = flat._unflatten(0, (self.dp_size, self.cp), ("dp", "cp"))
        experts = flat._unflatten(
            0, (self.dp_replicate, self.dp_shard_mod_ep, self.ep), EXPERT_DIMS
        )
        return ParallelMeshes(self, world, dense, data["dp"], experts)


@dataclass(frozen=True)
class ParallelMeshes:
    """The root mesh and the views each parallelism uses (see the module docstring)."""

    dims: ParallelDims
    world: DeviceMesh
    """("dp_replicate", "dp_shard", "cp"): the root every other mesh is a view of."""
    dense: DeviceMesh
    """("dp_replicate", "dp_shard_cp")."""
    dp: DeviceMesh
    """("dp",): data-loading ranks."""
    experts: DeviceMesh
    """("dp_replicate", "dp_shard_mod_ep", "ep")."""

    @property
    def dp_shard_cp(self) -> DeviceMesh:
        return self.dense["dp_shard_cp"]

    @property
    def fsdp(self) -> DeviceMesh:
        """The dense parameters' FSDP mesh: 2-D (HSDP) when dp_replicate > 1, else 1-D."""
        if self.dims.dp_replicate_enabled:
            return self.dense
        return self.dense["dp_shard_cp"]

    @property
    def ep(self) -> DeviceMesh:
        return self.experts["ep"]

    @property
    def cp(self) -> DeviceMesh:
        """The ranks that split one row between them."""
        return self.world["cp"]

    @property
    def expert_fsdp(self) -> DeviceMesh:
        """The routed experts' FSDP mesh once they are split over `ep`."""
        if self.dims.dp_replicate_enabled:
            return self.experts["dp_replicate", "dp_shard_mod_ep"]
        return self.experts["dp_shard_mod_ep"]


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device


def init_distributed(device_type: str, timeout_s: float = 600.0) -> DistributedContext:
    """Join the torchrun job, or form a one-rank group when started as a plain process.

    A one-rank group keeps a single code path: the model is always wrapped with FSDP2 and saved
    with DCP, whether the job has one process or thousands. A collective still waiting after
    `timeout_s` raises (gloo) or aborts the communicator (nccl's watchdog) with the operation in
    the message, so a dead or stuck rank ends the job instead of hanging it; every group made
    later (device meshes) inherits the timeout.
    """
    backend = "nccl" if device_type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if "RANK" in os.environ:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        dist.init_process_group(backend, timeout=timeout)
    else:
        rank, world_size, local_rank = 0, 1, 0
        dist.init_process_group(
            backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
        )
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
