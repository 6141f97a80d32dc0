"""FSDP2 wrapping: shard parameters over the data-parallel mesh dimension."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, compute_dtype: torch.dtype) -> None:
    """Shard the embedding, each block, [norm, output] and the root, in that order.

    Each `fully_shard` call makes one all-gather unit; the blocks are units of their own so
    only one block's full parameters live at a time, and the final norm and output head form
    one unit because they run back to back. Gradients are reduced in float32 and AVERAGED over
    the shard group (FSDP's default; gloo has no pre-multiplied sum for a custom factor), so the
    trainer scales its loss by the data-parallel size.
    """
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    fully_shard(model.tok_embeddings, mesh=mesh, mp_policy=policy)
    for block in model.layers.values():
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard([model.norm, model.output], mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
