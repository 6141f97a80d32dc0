"""Expert parallelism: routed experts sharded over the `ep` ranks, tokens moved by all-to-all.

Shape legend: R token copies sent from this rank (T tokens x K experts each), N token copies
received by this rank, D model dim, E experts in the layer, L = E / ep experts on this rank,
S = ep ranks (sources or destinations).

Rank r owns experts [r * L, (r + 1) * L). Everything else in an MoE layer runs locally and
unchanged: the router sees this rank's tokens, the score multiplies the expert input before
dispatch, the shared expert runs on local tokens. Only the call `moe.experts(x_RD, counts_E)`
is wrapped, from outside, by a forward pre-hook and a forward hook (torchtitan's
`ExpertParallel._token_dispatch` / `_token_combine`):

    dispatch: all-to-all the per-expert counts, then the token copies (already sorted by global
              expert, hence by owning rank) with uneven splits; regroup the received rows, which
              arrive source-rank-major, by LOCAL expert;
    experts:  the unchanged `GroupedExperts.forward(x_NE, tokens_per_local_expert_L)`;
    combine:  undo the regrouping and all-to-all the outputs back to the ranks that sent them.

Both token all-to-alls are autograd functions, so the backward runs the mirror exchanges.

Expert weights are plain local slices of shape (L, ...) under the SAME parameter names, not
DTensors: `GroupedExperts.forward` stays a plain grouped GEMM and the model imports nothing from
torch.distributed. The price is that a state dict holds this rank's slice only; use
`gather_experts` to rebuild full tensors (export, comparison) and `shard_experts` to load them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from trainer.model.moe import MoE

EXPERT_WEIGHTS = ("w1_EDF", "w3_EDF", "w2_EFD")

EpGroup = dist.ProcessGroup | DeviceMesh | None


def _process_group(ep_group: EpGroup) -> dist.ProcessGroup:
    if isinstance(ep_group, DeviceMesh):
        return ep_group.get_group()
    return ep_group if ep_group is not None else dist.group.WORLD


def local_expert_range(n_experts: int, ep_size: int, ep_rank: int) -> range:
    """Global ids of the experts rank `ep_rank` owns."""
    if n_experts % ep_size:
        raise ValueError(
            f"expert parallelism needs model.n_experts ({n_experts}) divisible by "
            f"parallel.ep ({ep_size})"
        )
    n_local = n_experts // ep_size
    return range(ep_rank * n_local, (ep_rank + 1) * n_local)


@dataclass
class AllToAllStats:
    """Bytes the expert all-to-alls sent from this rank, summed until `pop()` (per step).

    Only the forward exchanges are counted; the backward sends the same token bytes again as
    gradients, and activation-checkpoint recomputation repeats (and is counted as) a forward.
    `token_bytes` is what left the rank; rows a rank keeps for its own experts are a local copy,
    counted in `local_bytes`. The balanced minimum for comparison is `balanced_bytes`.
    """

    ep_size: int = 1
    dispatch_bytes: int = 0
    combine_bytes: int = 0
    local_bytes: int = 0
    count_bytes: int = 0
    """Bytes sent off-rank by the per-expert count exchanges (S - 1 slices of L counts)."""
    routed_bytes: int = 0
    """Bytes of every token copy this rank routed (R x D), whatever its destination."""
    exchanges: int = 0

    @property
    def token_bytes(self) -> int:
        return self.dispatch_bytes + self.combine_bytes

    @property
    def balanced_bytes(self) -> float:
        """Dispatch + combine bytes if copies spread evenly: routed * 2 * (ep - 1) / ep."""
        return self.routed_bytes * 2 * (self.ep_size - 1) / self.ep_size

    def pop(self) -> dict[str, float]:
        """The counts so far as a dict, then reset them."""
        values = {
            "dispatch_bytes": self.dispatch_bytes,
            "combine_bytes": self.combine_bytes,
            "token_bytes": self.token_bytes,
            "balanced_bytes": self.balanced_bytes,
            "local_bytes": self.local_bytes,
            "count_bytes": self.count_bytes,
            "routed_bytes": self.routed_bytes,
            "exchanges": self.exchanges,
        }
        self.dispatch_bytes = self.combine_bytes = self.local_bytes = 0
        self.count_bytes = self.routed_bytes = self.exchanges = 0
        return values


@dataclass
class _DispatchPlan:
    """What combine needs from the dispatch of the same forward call."""

    send_splits_S: list[int]
    recv_splits_S: list[int]
    unpermute_N: torch.Tensor
    """Received row i is regrouped row unpermute_N[i]: gathers outputs back to arrival order."""


class ExpertParallel:
    """Dispatch/combine hooks around one MoE layer's `GroupedExperts` (one instance per layer)."""

    def __init__(self, n_experts: int, ep_group: EpGroup, stats: AllToAllStats):
        self.group = _process_group(ep_group)
        self.ep_size, self.ep_rank = self.group.size(), self.group.rank()
        self.n_experts = n_experts
        self.n_local = len(local_expert_range(n_experts, self.ep_size, self.ep_rank))
        self.stats = stats
        self._plan: _DispatchPlan | None = None

    def apply(self, experts: nn.Module) -> None:
        experts.register_forward_pre_hook(lambda _, args: self.dispatch_tokens(*args))
        experts.register_forward_hook(lambda _, args, out: self.combine_tokens(out))
        experts._expert_parallel = self  # marks the module as converted (see `shard_experts`)

    def dispatch_tokens(
        self, x_RD: torch.Tensor, tokens_per_expert_E: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Send copies to their expert's rank; return the received rows grouped by local expert."""
        if tokens_per_expert_E.numel() != self.n_experts:
            raise ValueError(
                f"expected counts for {self.n_experts} experts, got {tokens_per_expert_E.numel()}"
            )
        with torch.no_grad():
            # recv_SL[s, l]: copies source rank s sends to our local expert l.
            recv_SL = torch.empty_like(tokens_per_expert_E)
            dist.all_to_all_single(recv_SL, tokens_per_expert_E.contiguous(), group=self.group)
            recv_SL = recv_SL.view(self.ep_size, self.n_local)
            send_S = tokens_per_expert_E.view(self.ep_size, self.n_local).sum(1)
            # Host sync (CPU-GPU on cuda): all_to_all_single takes its splits as Python ints.
            send_splits, recv_splits = torch.stack([send_S, recv_SL.sum(1)]).tolist()
            permute_N, unpermute_N = self._regroup_by_local_expert(recv_SL, sum(recv_splits))
        self._plan = _DispatchPlan(send_splits, recv_splits, unpermute_N)
        self._count(x_RD, send_splits, recv_splits, tokens_per_expert_E.element_size())
        x_ND = all_to_all_single_autograd(x_RD, recv_splits, send_splits, self.group)
        return x_ND[permute_N], recv_SL.sum(0)

    def combine_tokens(self, out_ND: torch.Tensor) -> torch.Tensor:
        """Return each expert output to the rank (and row) its input came from."""
        plan, self._plan = self._plan, None
        if plan is None:
            raise RuntimeError("combine_tokens without a preceding dispatch_tokens")
        out_ND = out_ND[plan.unpermute_N]
        return all_to_all_single_autograd(
            out_ND, plan.send_splits_S, plan.recv_splits_S, self.group
        )

    def _regroup_by_local_expert(
        self, recv_SL: torch.Tensor, n_recv: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows arrive ordered (source rank, local expert); the experts need (local expert, source).

        Returns `permute` (regrouped row j is received row permute[j]) and its inverse.
        """
        segment_N = torch.repeat_interleave(
            torch.arange(recv_SL.numel(), device=recv_SL.device),
            recv_SL.reshape(-1),
            output_size=n_recv,
        )
        source_N, expert_N = segment_N // self.n_local, segment_N % self.n_local
        permute_N = torch.argsort(expert_N * self.ep_size + source_N, stable=True)
        unpermute_N = torch.empty_like(permute_N)
        unpermute_N[permute_N] = torch.arange(n_recv, device=permute_N.device)
        return permute_N, unpermute_N

    def _count(
        self, x_RD: torch.Tensor, send_splits: list[int], recv_splits: list[int], count_size: int
    ) -> None:
        row_bytes = x_RD.shape[-1] * x_RD.element_size()
        stats, me = self.stats, self.ep_rank
        stats.dispatch_bytes += (sum(send_splits) - send_splits[me]) * row_bytes
        stats.combine_bytes += (sum(recv_splits) - recv_splits[me]) * row_bytes
        stats.local_bytes += 2 * send_splits[me] * row_bytes
        stats.count_bytes += (self.ep_size - 1) * self.n_local * count_size
        stats.routed_bytes += sum(send_splits) * row_bytes
        stats.exchanges += 1


def shard_experts(moe: MoE, ep_group: EpGroup) -> None:
    """Replace the full expert weights (E, ...) with this rank's slice (L, ...), in place.

    Parameter objects change (names do not): call before building the optimizer and before
    FSDP. Works on meta-device models; initialise after sharding only with per-rank seeds, or
    initialise the full model first and shard it, as tests do, to reproduce the ep=1 weights.
    """
    group = _process_group(ep_group)
    experts = moe.experts
    if hasattr(experts, "_expert_parallel"):
        raise ValueError("this MoE layer's experts are already sharded for expert parallelism")
    owned = local_expert_range(moe.n_experts, group.size(), group.rank())
    for name in EXPERT_WEIGHTS:
        weight = getattr(experts, name)
        if isinstance(weight, DTensor):
            raise ValueError("apply expert parallelism before FSDP (expert weights are DTensors)")
        if weight.shape[0] != moe.n_experts:
            raise ValueError(f"experts.{name} has {weight.shape[0]} experts, not {moe.n_experts}")
        local = weight.detach()[owned.start : owned.stop].clone()
        setattr(experts, name, nn.Parameter(local, requires_grad=weight.requires_grad))


def gather_experts(moe: MoE, ep_group: EpGroup, grads: bool = False) -> dict[str, torch.Tensor]:
    """Full (E, ...) expert weights, or their gradients, rebuilt from every rank's slice.

    A collective: every rank of the group must call it. Missing gradients count as zeros.
    """
    group = _process_group(ep_group)
    full = {}
    for name in EXPERT_WEIGHTS:
        weight = getattr(moe.experts, name)
        local = weight.grad if grads else weight.detach()
        local = torch.zeros_like(weight) if local is None else local.contiguous()
        pieces = [torch.empty_like(local) for _ in range(group.size())]
        dist.all_gather(pieces, local, group=group)
        full[name] = torch.cat(pieces)
    return full


def apply_expert_parallel(model: nn.Module, ep_group: EpGroup) -> AllToAllStats:
    """Shard the experts of every MoE layer in `model` over `ep_group` and hook up dispatch.

    `model` is a built `Transformer` (or a single `MoE`). Parameter names stay the same; expert
    weights become this rank's slices. A group of one rank leaves the model untouched. Returns
    the all-to-all byte counter shared by all the layers.
    """
    group = _process_group(ep_group)
    stats = AllToAllStats(ep_size=group.size())
    if group.size() == 1:
        return stats
    moe_layers = [m for m in model.modules() if isinstance(m, MoE)]
    for moe in moe_layers:
        local_expert_range(moe.n_experts, group.size(), group.rank())  # fail before any change
    for moe in moe_layers:
        shard_experts(moe, group)
        ExpertParallel(moe.n_experts, group, stats).apply(moe.experts)
    return stats


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient by `factor` in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.factor, None


def scale_expert_gradients(model: nn.Module, factor: float) -> None:
    """Multiply the gradients of every EP-sharded expert weight by `factor`, nothing else.

    Expert outputs are scaled by `factor` on the way back (between the experts and combine) and
    their inputs by 1 / factor (between dispatch and the experts). Every weight gradient of the
    SwiGLU experts is linear in the output gradient, so the weights get `factor` times theirs,
    while the gradient sent back to the tokens is unchanged. Works under FSDP (whose
    `set_gradient_divide_factor` needs a pre-multiplied sum that gloo lacks) and activation
    checkpointing (the recompute reruns these hooks). Call after `apply_expert_parallel`.
    """
    for module in model.modules():
        if not hasattr(module, "_expert_parallel"):
            continue
        # Appended after the dispatch pre-hook; prepended before the combine forward hook.
        module.register_forward_pre_hook(
            lambda _, args: (_ScaleGrad.apply(args[0], 1.0 / factor), *args[1:])
        )
        module.register_forward_hook(
            lambda _, args, out: _ScaleGrad.apply(out, factor), prepend=True
        )


def sharded_expert_names(model: nn.Module) -> dict[str, ExpertParallel]:
    """Fully qualified names of the EP-sharded expert weights, each with its layer's EP hooks."""
    names = {}
    for prefix, module in model.named_modules():
        ep = getattr(module, "_expert_parallel", None)
        if ep is not None:
            names.update({f"{prefix}.{name}" if prefix else name: ep for name in EXPERT_WEIGHTS})
    return names


def clip_grad_norm_(model: nn.Module, max_norm: float) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` for a model whose experts are sharded over `ep`.

    Dense gradients are DTensors on the dense FSDP mesh; expert gradients are DTensors on the
    expert FSDP mesh and hold only this rank's ep slice. The global norm is
    sqrt(|dense|^2 + sum over the ep group of |expert slice|^2), the same on every rank.
    Returns it as a plain tensor.
    """
    experts = sharded_expert_names(model)
    dense, expert = [], []
    for name, param in model.named_parameters():
        if param.grad is not None:
            (expert if name in experts else dense).append(param.grad)
    if not experts:
        raise ValueError("clip_grad_norm_ for expert parallelism on a model without EP experts")
    group = next(iter(experts.values())).group
    dense_sq = _full(torch.nn.utils.get_total_norm(dense, foreach=True)) ** 2
    expert_sq = _full(torch.nn.utils.get_total_norm(expert, foreach=True)) ** 2
    dist.all_reduce(expert_sq, group=group)
    total = (dense_sq + expert_sq).sqrt()
    # As torch.nn.utils.clip_grads_with_norm_, with the coefficient as a Python number so that
    # it multiplies DTensors of either mesh.
    coef = float(torch.clamp(max_norm / (total + 1e-6), max=1.0))
    torch._foreach_mul_(dense + expert, coef)
    return total


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
