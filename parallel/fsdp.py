"""Parallelisms applied to the model from outside, in one ordered place (`parallelize_model`).

Expert parallelism (parallel/expert.py) splits the routed experts over the `ep` ranks. FSDP2
(`fully_shard`) shards the parameters over the dense FSDP mesh; with a 2-D mesh
("dp_replicate", "dp_shard_cp") the same call gives HSDP. Activation checkpointing recomputes
chosen blocks in backward. The model's code knows nothing of any of them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint

from parallel.context import apply_context_parallel
from parallel.expert import apply_expert_parallel, scale_expert_gradients
from parallel.mesh import ParallelMeshes
from trainer.model.moe import MoE


def parallelize_model(
    model: nn.Module, meshes: ParallelMeshes, compute_dtype: torch.dtype, checkpoint_every: int
) -> None:
    """Apply every parallelism to `model`, in place, in the one order in which they compose.

    With parallel.cp > 1 the model's logits are for this rank's share of each row: the labels
    must be split alike (`model.sequence_split.shard`).

    1. Expert parallelism splits the routed experts over `meshes.ep` and hooks the token
       all-to-all around `moe.experts` (parallel/expert.py). It changes which weights a rank
       holds, so it must come before FSDP shards them. Expert gradients are then rescaled by
       1 / ep (`scale_expert_gradients`, derivation in `_expert_grad_factor`).
    2. Context parallelism splits every row over `meshes.cp` (parallel/context.py); like EP it
       changes what the forward computes, not how parameters are stored. Its ranks hold
       identical parameters, so FSDP shards over them too (the dense mesh is dp_shard x cp).
    3. Activation checkpointing goes INSIDE FSDP (applied before it, as in torchtitan): FSDP's
       hooks then stay outermost, so a block's parameters are all-gathered once for its forward
       and once for its backward, and the recompute, which runs in backward after FSDP's
       pre-backward all-gather, reuses those unsharded parameters. Were AC outside, the
       recompute would rerun FSDP's pre-forward hook: a third all-gather and re-registered
       backward hooks.
    4. FSDP last: `fully_shard` turns parameters into DTensor shards and swaps module classes;
       every step above must see the plain modules and parameters. With EP, each MoE's experts
       are a unit of their own over `meshes.expert_fsdp` (the ranks holding the same slice),
       wrapped before the blocks so the block units leave their parameters alone.
    """
    dims = meshes.dims
    if dims.ep_enabled:
        apply_expert_parallel(model, meshes.ep)
        scale_expert_gradients(model, _expert_grad_factor(dims.ep))
    if dims.cp_enabled:
        apply_context_parallel(model, meshes.cp)
    apply_activation_checkpointing(model, checkpoint_every)
    expert_mesh = meshes.expert_fsdp if dims.ep_enabled else None
    apply_fsdp(model, meshes.fsdp, compute_dtype, expert_mesh)


def _expert_grad_factor(ep: int) -> float:
    """What expert gradients must be multiplied by so that they equal one process's.

    W ranks, G valid labels in the global batch, ce_r rank r's summed cross-entropy. Each rank
    backpropagates L_r = ce_r * W / G (+ router terms, which do not touch expert weights).

    Dense weights: FSDP averages over all W ranks: (1/W) sum_r W dce_r/G = sum_r dce_r / G,
    the one-process gradient.

    Expert slice e on rank r: the dispatch all-to-all brought here every token copy routed to e
    from the ep ranks of r's group, and its backward returns their gradients, so the local
    gradient is already the sum over that group: sum_{s in group} W dce_s/G. FSDP over
    `expert_fsdp` then AVERAGES over the W/ep ranks holding e, one per ep group, so the sum
    covers every rank once and is divided by W/ep:
        (ep/W) sum_s W dce_s/G = ep * sum_s dce_s/G.
    Hence a factor 1/ep (HSDP alike: dp_replicate * dp_shard_mod_ep = W/ep). For ep a power
    of two the scaling is exact in floating point.
    """
    return 1.0 / ep


def apply_fsdp(
    model: nn.Module,
    mesh: DeviceMesh,
    compute_dtype: torch.dtype,
    expert_mesh: DeviceMesh | None = None,
) -> None:
    """Shard the embedding, each block, [norm, output] and the root, in that order.

    Each `fully_shard` call makes one all-gather unit; the blocks are units of their own so
    only one block's full parameters live at a time, and the final norm and output head form
    one unit because they run back to back. A 1-D mesh shards over all its ranks (FSDP); a 2-D
    mesh ("dp_replicate", "dp_shard_cp") shards over the inner dim and replicates over the outer
    one (HSDP): reduce-scatter inside a replica, then all-reduce across replicas.

    Gradients are reduced in float32 and AVERAGED over every rank of the mesh, both dims for
    HSDP (FSDP's default; gloo has no pre-multiplied sum for a custom factor), so the trainer
    scales its loss by the data-parallel size.

    With `expert_mesh` (expert parallelism), each MoE's routed experts are first sharded over
    that mesh only, and their gradients reduced (averaged) over the ranks holding the same
    expert slice; see `_expert_grad_factor` for the rescaling this needs.
    """
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    fully_shard(model.tok_embeddings, mesh=mesh, mp_policy=policy)
    for block in model.layers.values():
        if expert_mesh is not None and isinstance(block.feed_forward, MoE):
            fully_shard(block.feed_forward.experts, mesh=expert_mesh, mp_policy=policy)
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard([model.norm, model.output], mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def checkpointed_layers(n_layers: int, every: int) -> list[int]:
    """The blocks `every` selects: the every-th, 2*every-th, ... (0-based every-1, ...).

    `every` = 0 selects none ("none"), 1 all ("full"), N every Nth ("every:N").
    """
    if every < 0:
        raise ValueError(f"checkpoint_every must be >= 0; got {every}")
    return [i for i in range(n_layers) if every and (i + 1) % every == 0]


def apply_activation_checkpointing(model: nn.Module, every: int) -> list[int]:
    """Recompute the chosen blocks' activations in backward instead of keeping them; return them.

    Only each chosen block's `forward` is replaced, on the instance, by a non-reentrant
    `torch.utils.checkpoint` of the same forward. The module tree is untouched, so parameter
    names, optimizer groups and checkpoint keys are the same with and without AC (and a
    checkpoint saved without AC loads with it); `checkpoint_wrapper` would insert
    `_checkpoint_wrapped_module.` into every name below a block.
    """
    layers = checkpointed_layers(len(model.layers), every)
    for i in layers:
        block = model.layers[str(i)]
        block.forward = _checkpointed(block, block.forward)
    return layers


def _checkpointed(block: nn.Module, forward: Callable) -> Callable:
    def recompute_context() -> tuple[contextlib.AbstractContextManager, ...]:
        return contextlib.nullcontext(), _buffers_restored(block)

    def checkpointed_forward(*args, **kwargs):
        return checkpoint(
            forward, *args, use_reentrant=False, context_fn=recompute_context, **kwargs
        )

    return checkpointed_forward


@contextlib.contextmanager
def _buffers_restored(module: nn.Module) -> Iterator[None]:
    """Undo what a recompute writes into buffers: a forward's side effects must happen once.

    The MoE layers count the tokens each expert receives in a buffer during forward; without
    this, a checkpointed layer would count every token twice. The recompute may stop early
    (once it has rebuilt what backward needs); the `finally` restores the buffers either way.
    """
    saved = [(buffer, buffer.detach().clone()) for buffer in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)
